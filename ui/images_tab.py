"""The PNG info and History tabs: any PNG's parameters read back, past images browsed, and either one's
settings sent to the Generate tab (AUTOMATIC1111's "PNG Info" / "Send to txt2img" habit)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from sdlora.adapters.library import adapter_names
from sdlora.generate.images import parameters_text
from sdlora.generate.studio import recall
from ui.common import USER_ERRORS, AppContext, problem
from ui.generate_tab import GenerateForm, filled
from ui.guard import client_owner

GENERATE_TAB = "generate"


def send_to_generate(ctx: AppContext, form: GenerateForm, tabs: gr.Tabs, button: gr.Button, text: gr.Textbox):
    """Wire `button` to fill the Generate form from the parameters `text` shows, and open that tab."""

    def sent(parameters: str) -> list:
        if not (parameters or "").strip():
            return [gr.skip()] * (len(form.fields) + 1)
        return [*filled(recall(parameters), adapter_names(ctx.outputs)), gr.Tabs(selected=GENERATE_TAB)]

    button.click(sent, text, [*form.fields, tabs])


def build_png_info_tab(ctx: AppContext, form: GenerateForm, tabs: gr.Tabs) -> None:
    """Drop a PNG, read its parameters text (sdlora's, AUTOMATIC1111's, Forge's, ComfyUI's A1111 saver)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            dropped = gr.Image(
                type="filepath",
                image_mode=None,  # the file as dropped: a converted copy would lose its text chunks
                label="Drop a PNG",
                sources=["upload", "clipboard"],
                height=320,
                elem_classes=["pixelated"],
                elem_id="png-drop",
            )
        with gr.Column(scale=2):
            text = gr.Textbox(
                label="Parameters", lines=10, buttons=["copy"], interactive=False, elem_id="png-parameters"
            )
            send = gr.Button("Send to Generate", variant="primary", elem_id="png-send")

    def read(path: str | None, request: gr.Request) -> str:
        if not path:
            return ""
        try:
            (checked,) = ctx.uploads.check(client_owner(request), [path])
        except USER_ERRORS as error:
            return problem(error)
        return parameters_text(checked) or "This image carries no generation parameters."

    dropped.change(read, dropped, text)
    send_to_generate(ctx, form, tabs, send, text)


def build_history_tab(ctx: AppContext, form: GenerateForm, tab: gr.Tab, tabs: gr.Tabs) -> None:
    """Images generated here (outputs/images, newest first): pick one to see and re-use its settings."""
    gallery = gr.Gallery(
        label="Generated images, newest first (outputs/images)",
        columns=8,
        height=420,
        object_fit="contain",
        allow_preview=False,
        elem_classes=["pixelated"],
        elem_id="history",
    )
    with gr.Row(equal_height=False):
        text = gr.Textbox(
            label="Parameters", lines=6, interactive=False, elem_id="history-parameters", scale=3
        )
        with gr.Column(scale=1):
            send = gr.Button("Send to Generate", variant="primary", elem_id="history-send")
            refresh = gr.Button("Refresh", elem_id="history-refresh")
    paths = gr.State([])

    def listed() -> tuple:
        history = ctx.studio.history()
        shown = [(str(path), fields.get("Prompt", "")[:60]) for path, fields in history]
        return shown, [str(path) for path, _ in history], ""

    gr.on([tab.select, refresh.click], listed, None, [gallery, paths, text])

    def picked(known: list[str], event: gr.SelectData) -> str:
        if event.index is None or event.index >= len(known):
            return ""
        return parameters_text(Path(known[event.index]))

    gallery.select(picked, paths, text)
    send_to_generate(ctx, form, tabs, send, text)
