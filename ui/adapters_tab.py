"""The Adapters tab: the library table, one adapter's details, download, import, rename, delete."""

from __future__ import annotations

import gradio as gr

from sdlora.adapters.library import (
    COLUMNS,
    adapter_names,
    adapter_path,
    delete_adapter,
    describe,
    import_adapter,
    list_adapters,
    rename_adapter,
)
from ui.common import USER_ERRORS, AppContext, problem
from ui.guard import client_owner


def build_adapters_tab(ctx: AppContext, tab: gr.Tab) -> None:
    """Lay out the tab inside the current Blocks; the table refreshes whenever the tab is opened."""
    table = gr.Dataframe(
        headers=COLUMNS,
        type="array",
        interactive=False,
        label="Adapters in outputs/adapters",
        max_height=300,
        elem_id="library",
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            picker = gr.Dropdown([], value=None, label="Adapter", elem_id="library-pick")
            details = gr.Markdown(elem_id="library-details")
            download = gr.DownloadButton("Download .safetensors", interactive=False, elem_id="download")
            with gr.Row(equal_height=True):
                new_name = gr.Textbox(label="New name", scale=3, elem_id="new-name")
                rename = gr.Button("Rename", scale=1, elem_id="rename")
            delete = gr.Button("Delete…", variant="stop", elem_id="delete")
            with gr.Row(visible=False) as confirm_row:
                confirm_text = gr.Markdown()
                confirm = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete")
                keep = gr.Button("Keep it", elem_id="keep")
        with gr.Column(scale=1):
            sample = gr.Image(
                label="Sample from training",
                interactive=False,
                elem_classes=["pixelated"],
                height=220,
                elem_id="library-sample",
            )
    importer = gr.File(
        file_count="single", label="Import an adapter (.safetensors)", height=110, elem_id="import"
    )
    message = gr.Markdown(elem_id="library-message")

    def refreshed(selected: str | None) -> tuple:
        names = adapter_names(ctx.outputs)
        if selected not in names:
            selected = names[0] if names else None
        return [info.row() for info in list_adapters(ctx.outputs)], gr.Dropdown(choices=names, value=selected)

    tab.select(refreshed, picker, [table, picker])

    def shown(name: str | None) -> tuple:
        try:
            info = describe(adapter_path(ctx.outputs, name), ctx.outputs) if name else None
        except USER_ERRORS:
            info = None
        if info is None:
            return "No adapter selected.", gr.DownloadButton(value=None, interactive=False), None, ""
        lines = [f"**{info.name}** · {info.path.stat().st_size / 1024:.0f} KiB · `{info.path}`"]
        lines += [
            f"- {label}: {value}" for label, value in zip(COLUMNS[1:], info.row()[1:], strict=True) if value
        ]
        return (
            "\n".join(lines),
            gr.DownloadButton(value=str(info.path), interactive=True),
            str(info.sample) if info.sample else None,
            info.name,
        )

    picker.change(shown, picker, [details, download, sample, new_name])

    def imported(upload: str | None, request: gr.Request) -> tuple:
        if not upload:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        owner = client_owner(request)
        try:
            files = ctx.uploads.check(owner, [upload])
            path = import_adapter(files[0], ctx.outputs)
        except USER_ERRORS as error:
            return problem(error), None, gr.skip(), gr.skip()
        ctx.uploads.discard(owner, files)
        try:
            fit = ctx.studio.fit(path)
        except USER_ERRORS as error:  # kept: it may suit another base, but say so now, not at generation
            return problem(f"Imported `{path.name}`, but {error}"), None, *refreshed(path.stem)
        return (
            f"Imported `{path.name}`; it is now offered in the Generate tab. {fit}",
            None,
            *refreshed(path.stem),
        )

    importer.upload(imported, importer, [message, importer, table, picker])

    def renamed(name: str | None, wanted: str) -> tuple:
        try:
            path = rename_adapter(ctx.outputs, name or "", wanted)
        except USER_ERRORS as error:
            return problem(error), gr.skip(), gr.skip()
        if path.stem == name:
            return f"`{name}` already has that name.", gr.skip(), gr.skip()
        return f"Renamed `{name}` to `{path.stem}`.", *refreshed(path.stem)

    rename.click(renamed, [picker, new_name], [message, table, picker])

    def asked(name: str | None) -> tuple:
        if not name:
            return problem("Pick an adapter to delete."), gr.skip(), gr.skip()
        return "", f"Delete **{name}**? The file can't be recovered.", gr.Row(visible=True)

    delete.click(asked, picker, [message, confirm_text, confirm_row])
    keep.click(lambda: gr.Row(visible=False), None, confirm_row)

    def deleted(name: str | None) -> tuple:
        try:
            delete_adapter(ctx.outputs, name or "")
        except USER_ERRORS as error:
            return problem(error), gr.Row(visible=False), gr.skip(), gr.skip()
        return f"Deleted `{name}`.", gr.Row(visible=False), *refreshed(None)

    confirm.click(deleted, picker, [message, confirm_row, table, picker])
