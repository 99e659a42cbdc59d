"""What the tabs share: the app's long-lived objects and the way a user's mistake is shown in the page."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from sdlora.data.uploads import UploadLedger
from sdlora.errors import SdloraError
from sdlora.generate.studio import Studio
from sdlora.jobs import JobQueue
from sdlora.outputs import Outputs

# Errors whose message tells the user what to change; anything else is a bug and Gradio shows it as one.
USER_ERRORS = (SdloraError,)


@dataclass
class AppContext:
    """One per app, shared by every session: state that must survive a page reload lives here."""

    outputs: Outputs
    queue: JobQueue
    studio: Studio
    uploads: UploadLedger  # which files each client uploaded: the only ones its requests may name


def problem(error: Exception | str) -> str:
    """Show a message as a toast and return it for the tab's status line, so it stays readable after the
    toast fades."""
    message = str(error)
    gr.Warning(html.escape(message))  # the toast renders HTML; file names come from the user
    return f"⚠️ {message}"


def settings_box(elem_id: str) -> gr.Textbox:
    """A read-only, copyable box of 'option = value' lines: all of them are in the page (an editor would
    draw only the lines in view), so the browser's find and the Copy button see every setting."""
    return gr.Textbox(
        lines=12,
        max_lines=12,
        interactive=False,
        show_label=False,
        buttons=["copy"],
        elem_id=elem_id,
        elem_classes=["sdlora-settings"],
    )
