"""One base class for every mistake a user can fix: the CLI and the app catch this and show the message."""


class SdloraError(Exception):
    """A problem with the user's input, files or installed packages; the message says what to change."""
