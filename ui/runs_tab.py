"""The Runs tab: every run folder on disk with its state, and what can be done with it: resume, cancel,
turn a checkpoint into an adapter, compare the samples of its checkpoints."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from sdlora.jobs import loss_curves
from sdlora.train.runs import (
    RUN_COLUMNS,
    RunInfo,
    RunState,
    checkpoint_adapter,
    list_runs,
    run_info,
    run_row,
    run_summary,
    sample_grid,
    settings_lines,
)
from ui.common import USER_ERRORS, AppContext, problem, settings_box

POLL_SECONDS = 2.0


def build_runs_tab(ctx: AppContext, tab: gr.Tab) -> None:
    """Lay out the tab inside the current Blocks; the list refreshes when the tab is opened."""
    with gr.Row(equal_height=True):
        table = gr.Dataframe(
            headers=RUN_COLUMNS,
            type="array",
            interactive=False,
            label="Runs in outputs/runs (newest first)",
            max_height=260,
            elem_id="runs",
            scale=5,
        )
        refresh = gr.Button("Refresh", scale=1, elem_id="runs-refresh")
    picker = gr.Dropdown([], value=None, label="Run", elem_id="run-pick")
    summary = gr.Markdown(elem_id="run-summary")
    with gr.Row():
        resume = gr.Button("Resume from its last checkpoint", elem_id="run-resume")
        cancel = gr.Button("Cancel…", variant="stop", visible=False, elem_id="run-cancel")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown()
        confirm = gr.Button("Yes, cancel it", variant="stop", elem_id="run-confirm-cancel")
        keep = gr.Button("No, keep it running", elem_id="run-keep")
    with gr.Row(equal_height=True):
        checkpoint = gr.Dropdown([], value=None, label="Checkpoint", elem_id="run-checkpoint", scale=3)
        to_adapter = gr.Button("Make an adapter of it", elem_id="run-to-adapter", scale=1)
    message = gr.Markdown(elem_id="run-message")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", color="curve", title="Loss", height=260, elem_id="run-loss")
        grid = gr.Gallery(
            label="Samples: one column per sampled step, one row per sample prompt",
            columns=1,
            height=360,
            object_fit="contain",
            elem_classes=["pixelated"],
            elem_id="run-samples",
        )
    with gr.Accordion("Settings", open=False):
        settings = settings_box("run-settings")
    timer = gr.Timer(POLL_SECONDS)

    def listed(selected: str | None) -> tuple:
        infos = list_runs(ctx.outputs)
        choices = [(f"{info.folder.path.name} · {info.state}", str(info.folder.path)) for info in infos]
        paths = [value for _, value in choices]
        if selected not in paths:
            selected = paths[0] if paths else None
        return [run_row(info) for info in infos], gr.Dropdown(choices=choices, value=selected)

    tab.select(listed, picker, [table, picker])
    refresh.click(listed, picker, [table, picker])

    def cancellable(info: RunInfo) -> gr.Button:
        """Cancel is offered only for a run that is running or queued."""
        running = info.state is RunState.RUNNING or ctx.queue.job_for_run(info.folder.path) is not None
        return gr.Button(visible=running)

    def shown(path: str | None) -> tuple:
        if not path or not Path(path).is_dir():
            empty = ("No run selected.", gr.Dropdown(choices=[], value=None), None, [], gr.skip(), "")
            return *empty, gr.Button(visible=False), "", gr.Row(visible=False)
        info = run_info(Path(path))
        cells, columns = sample_grid(info)
        best = info.best_checkpoint
        names = [
            (f"{c.name} (best validation loss)" if c == best else c.name, str(c)) for c in info.checkpoints
        ]
        frame = pd.DataFrame(
            loss_curves(info.losses, info.validation_losses), columns=["step", "loss", "curve"]
        )
        chosen = best or (info.checkpoints[-1] if info.checkpoints else None)
        return (
            run_summary(info),
            gr.Dropdown(choices=names, value=str(chosen) if chosen else None),
            frame,
            [(str(p), caption) for p, caption in cells],
            gr.Gallery(columns=columns),
            settings_lines(info.settings),
            cancellable(info),
            "",  # a message about the previously picked run no longer applies
            gr.Row(visible=False),
        )

    details = [summary, checkpoint, loss, grid, grid, settings, cancel, message, confirm_row]
    picker.change(shown, picker, details)

    def polled(path: str | None) -> tuple:
        """Follow a running run, and hide Cancel once it has ended; anything else stays as it is."""
        if not path or not Path(path).is_dir():
            return (gr.skip(),) * 3
        info = run_info(Path(path))
        if info.state is not RunState.RUNNING:
            return gr.skip(), gr.skip(), cancellable(info)
        return run_summary(info), [(str(p), c) for p, c in sample_grid(info)[0]], cancellable(info)

    timer.tick(polled, picker, [summary, grid, cancel], show_progress="hidden")

    def resumed(path: str | None) -> tuple:
        try:
            job = ctx.queue.resume_run(Path(path or ""))
        except USER_ERRORS as error:
            return problem(error), *listed(path), gr.skip()
        submitted = f"Job {job.id} submitted: resuming `{job.config.name}` from its last checkpoint."
        return submitted, *listed(path), gr.Button(visible=True)

    resume.click(resumed, picker, [message, table, picker, cancel])

    def asked(path: str | None) -> tuple:
        if not path:
            return "No run selected.", gr.skip(), gr.Row(visible=False)
        info = run_info(Path(path))
        if info.state is not RunState.RUNNING and ctx.queue.job_for_run(Path(path)) is None:
            return f"{info.folder.path.name} is {info.state}, not running.", gr.skip(), gr.Row(visible=False)
        return gr.skip(), f"Cancel {info.folder.path.name}?", gr.Row(visible=True)

    cancel.click(asked, picker, [message, confirm_text, confirm_row])
    keep.click(lambda: gr.Row(visible=False), None, confirm_row)

    def cancelled(path: str | None) -> tuple:
        try:
            ctx.queue.cancel_run(Path(path or ""))
        except USER_ERRORS as error:
            return problem(error), gr.Row(visible=False)
        name = Path(path or "").name
        return f"Cancelling {name}: it stops after the current step and keeps a checkpoint.", gr.Row(
            visible=False
        )

    confirm.click(cancelled, picker, [message, confirm_row])

    def made(path: str | None, chosen: str | None) -> str:
        if not path or not chosen:
            return problem("Choose a run and one of its checkpoints first.")
        try:
            adapter = checkpoint_adapter(run_info(Path(path)).folder, Path(chosen), ctx.outputs)
        except USER_ERRORS as error:
            return problem(error)
        return f"Saved `{adapter.name}` from {Path(chosen).name}; it is in the Generate and Adapters tabs."

    to_adapter.click(made, [picker, checkpoint], message)
