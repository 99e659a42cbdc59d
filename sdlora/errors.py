"""One base class for every mistake a user can fix: the CLI and the app catch this and show the message."""


class SdloraError(Exception):
    """A problem with the user's input, files or installed packages; the message says what to change."""


def describe(error: BaseException) -> str:
    """How a failure reads on a job line or in the event log: a user's mistake as its plain message,
    anything unexpected with its type, so a bug report says what went wrong."""
    return str(error) if isinstance(error, SdloraError) else f"{type(error).__name__}: {error}"
