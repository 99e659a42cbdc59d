"""The Train tab: upload, captions, settings (every TrainConfig option), and a job's progress."""

from __future__ import annotations

import html
import time

import gradio as gr
import pandas as pd

from sdlora.config import TrainConfig, option_help
from sdlora.data.uploads import caption_rows, save_captions, stage_upload, thumbnails
from sdlora.demo import base_spec
from sdlora.forms import FORM_FIELDS, MAIN_OPTIONS, OPTION_FIELDS, TrainForm, make_config
from sdlora.jobs import JobView, job_view, pending_names
from sdlora.presets import PRESETS, preset_family, preset_values
from sdlora.train.launch import gpu_count
from ui.common import USER_ERRORS, AppContext, problem, settings_box
from ui.guard import client_owner
from ui.options import option_control, option_value

POLL_SECONDS = 1.0
ADVANCED_PER_ROW = 3
MAIN_PER_ROW = 3
GPUS = gpu_count()  # the app offers data-parallel training when it sees several
OPTIONS = {option.name: option for option in OPTION_FIELDS}


def build_train_tab(app: gr.Blocks, ctx: AppContext, base_box: gr.Textbox, initial_base: str | None) -> None:
    """Lay out the tab inside the current Blocks and wire its events; a page load shows the queue's job."""
    first_preset = next(iter(PRESETS))
    preset = preset_form_values(first_preset, initial_base)
    folder = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown(
                "### 1. Training images\nDrop a folder of images (same-name `.txt` files are their "
                "captions; kohya `N_words` sub-folders keep their repeats and prompts), or a `.zip` of "
                "them. Captions can be edited below before training."
            )
            with gr.Row():
                folder_in = gr.File(
                    file_count="directory", label="Image folder", height=120, elem_id="upload-folder"
                )
                zip_in = gr.File(file_count="single", label="…or a .zip", height=120, elem_id="upload-zip")
            upload_msg = gr.HTML(elem_id="upload-message")  # escaped text: file names are the user's
            gallery = gr.Gallery(
                label="Images and captions",
                columns=4,
                height=240,
                object_fit="contain",
                elem_classes=["pixelated"],
                elem_id="thumbnails",
            )
            captions = gr.Dataframe(
                headers=["image", "caption"],
                datatype=["str", "str"],
                type="array",
                interactive=True,
                static_columns=[0],
                label="Captions (editable)",
                column_widths=["30%", "70%"],
                max_height=260,
                elem_id="captions",
            )
        with gr.Column(scale=1):
            gr.Markdown("### 2. Settings")
            preset_in = gr.Radio(
                list(PRESETS),
                value=first_preset,
                label="Preset",
                info="Fills every setting below (Advanced included) for the base model's family.",
                elem_id="preset",
            )
            fields = {
                "folder": folder,
                "name": gr.Textbox(
                    label="Adapter name",
                    info="Saved as outputs/adapters/NAME.safetensors; a taken name gets a _2 suffix.",
                    elem_id="adapter-name",
                ),
                "prompt": gr.Textbox(
                    label="Instance prompt (with the trigger word)",
                    info=option_help(TrainConfig, "prompt"),
                    elem_id="instance-prompt",
                ),
            }
            with gr.Row():
                fields["prior"] = gr.Checkbox(
                    value=preset["prior"],
                    label="Prior preservation",
                    elem_id="prior",
                    info="Keeps the class looking normal (DreamBooth).",
                )
                fields["class_prompt"] = gr.Textbox(
                    label="Class prompt",
                    info=option_help(TrainConfig, "class_prompt"),
                    elem_id="class-prompt",
                )
            options: dict[str, gr.components.Component] = {}
            for first in range(0, len(MAIN_OPTIONS), MAIN_PER_ROW):
                with gr.Row():
                    for name in MAIN_OPTIONS[first : first + MAIN_PER_ROW]:
                        options[name] = option_control(OPTIONS[name], preset.get(name, OPTIONS[name].default))
            with gr.Accordion("Advanced: every training option", open=False, elem_id="advanced"):
                rest = [option for option in OPTION_FIELDS if option.name not in options]
                for first in range(0, len(rest), ADVANCED_PER_ROW):
                    with gr.Row():
                        for option in rest[first : first + ADVANCED_PER_ROW]:
                            value = option_value(option, preset.get(option.name, option.default))
                            options[option.name] = option_control(option, value)
            gpus = gr.Number(
                max(GPUS, 1),
                minimum=1,
                maximum=max(GPUS, 1),
                precision=0,
                visible=GPUS > 1,
                elem_id="gpus",
                label=f"GPUs to use ({GPUS} visible)",
                info="More than one trains data-parallel through accelerate/torchrun; the batch is per GPU.",
            )
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                resume = gr.Button("Resume", elem_id="resume")
            with gr.Row(visible=False) as confirm_row:
                confirm_text = gr.Markdown()
                confirm = gr.Button("Yes, cancel it", variant="stop", elem_id="confirm-cancel")
                keep = gr.Button("No, keep training", elem_id="keep-training")
            start_msg = gr.Markdown(elem_id="start-message")
    gr.Markdown("### 3. Progress")
    status = gr.Markdown(elem_id="job-status")
    progress = gr.HTML(elem_id="job-progress")
    with gr.Row():
        loss = gr.LinePlot(
            x="step",
            y="loss",
            color="curve",
            title="Loss",
            height=260,
            label="Loss",
            elem_id="loss-plot",
        )
        samples = gr.Gallery(
            label="Samples (newest first)",
            columns=4,
            height=260,
            object_fit="contain",
            elem_classes=["pixelated"],
            elem_id="samples",
        )
    with gr.Accordion("This job's settings", open=False):
        settings = settings_box("job-settings")
    timer = gr.Timer(POLL_SECONDS, active=False)
    seen = gr.State("")  # what the page shows, so an unchanged job sends nothing
    mine = gr.State(None)  # the id of the job this page started: the one it shows and cancels
    shown = gr.State(None)  # the id of the job the page shows (its own, else the queue's current one)
    option_names = list(options)

    def staged(paths: list[str] | str | None, request: gr.Request) -> tuple:
        owner = client_owner(request)
        try:
            files = ctx.uploads.check(owner, [paths] if isinstance(paths, str) else paths or [])
            upload = stage_upload(files, ctx.outputs)
        except USER_ERRORS as error:
            return None, problem(error), [], [], gr.skip()
        ctx.uploads.discard(owner, files)  # copied into outputs/uploads: the cached copies are not needed
        message = f"{upload.images} image(s) ready."
        if upload.skipped:
            message = problem(f"{upload.left_out()} {message}")
        return (
            str(upload.folder),
            message,
            thumbnails(upload.folder),
            caption_rows(upload.folder),
            upload.name,
        )

    for source in (folder_in, zip_in):
        source.upload(staged, source, [folder, upload_msg, gallery, captions, fields["name"]])

    def edited(folder_path: str | None, rows: list[list[str]]) -> list:
        if not folder_path:
            return gr.skip()
        save_captions(folder_path, rows)
        return thumbnails(folder_path)

    captions.input(edited, [folder, captions], gallery)

    def preset_chosen(name: str, base_text: str) -> list:
        values = preset_form_values(name, base_text)
        return [values["prior"]] + [
            option_value(OPTIONS[key], values[key]) if key in values else gr.skip() for key in option_names
        ]

    preset_in.change(
        preset_chosen, [preset_in, base_box], [fields["prior"], *(options[key] for key in option_names)]
    )

    def started(base_text: str, rows: list[list[str]], processes: float, *values) -> tuple:
        named = dict(zip([*FORM_FIELDS, *option_names], values, strict=True))
        form = TrainForm(
            **{key: named[key] for key in FORM_FIELDS}, options={k: named[k] for k in option_names}
        )
        try:
            if form.folder:
                save_captions(form.folder, rows)
            config = make_config(form, base_spec(base_text), ctx.outputs, pending_names(ctx.queue.jobs()))
            job = ctx.queue.submit(config, processes=int(processes or 1))
        except USER_ERRORS as error:
            return problem(error), gr.skip(), gr.skip()
        return (
            f"Job {job.id} submitted: training `{config.name}` (seed {config.seed}).",
            gr.Timer(active=True),
            job.id,
        )

    start.click(
        started,
        [base_box, captions, gpus, *(fields[key] for key in FORM_FIELDS), *options.values()],
        [start_msg, timer, mine],
    )

    def asked(job_id: int | None) -> tuple:
        """Name the job a click would cancel, and wait for the confirmation."""
        job = next((j for j in ctx.queue.jobs() if j.id == job_id), None)
        if job is None or job.finished:
            return "No job of this page is running.", gr.skip(), gr.Row(visible=False)
        return gr.skip(), f"Cancel job {job.id} ({job.config.name})?", gr.Row(visible=True)

    cancel.click(asked, shown, [start_msg, confirm_text, confirm_row])
    keep.click(lambda: gr.Row(visible=False), None, confirm_row)

    def cancelled(job_id: int | None) -> tuple:
        """Cancel the job the page showed when asked (never whichever runs by the time the click arrives)."""
        job = next((j for j in ctx.queue.jobs() if j.id == job_id), None)
        if job is None or job.finished:
            return "That job has already ended.", gr.Row(visible=False)
        ctx.queue.cancel(job.id)
        return f"Cancelling job {job.id}: it stops after the current step and keeps a checkpoint.", gr.Row(
            visible=False
        )

    confirm.click(cancelled, shown, [start_msg, confirm_row])

    def resumed(job_id: int | None) -> tuple:
        """Continue the job the page shows (cancelled or failed) from its newest checkpoint."""
        try:
            job = ctx.queue.resume(job_id)
        except USER_ERRORS as error:
            return problem(error), gr.skip(), gr.skip()
        message = f"Job {job.id} submitted: resuming `{job.config.name}` from its checkpoint."
        return message, gr.Timer(active=True), job.id

    resume.click(resumed, shown, [start_msg, timer, mine])

    def polled(last: str, own: int | None) -> tuple:
        jobs = ctx.queue.jobs()
        job = next((j for j in jobs if j.id == own), None) or ctx.queue.current()
        key = f"{job.id}:{len(job.events)}:{job.status}:{int(time.time())}" if job else "none"
        if key == last:
            return (gr.skip(),) * 8
        view = job_view(job, jobs)
        return (
            view.status,
            progress_bar(view),
            loss_frame(view),
            view.samples,
            view.settings,
            gr.Timer(active=view.active),
            key,
            job.id if job else None,
        )

    poll_outputs = [status, progress, loss, samples, settings, timer, seen, shown]
    timer.tick(polled, [seen, mine], poll_outputs, show_progress="hidden")
    app.load(polled, [seen, mine], poll_outputs, show_progress="hidden")


def preset_form_values(name: str, base_text: str | None) -> dict:
    """Every setting a preset makes for the base the page names (its family's values), and `prior`."""
    return {"prior": PRESETS[name].prior, **preset_values(name, preset_family(base_text))}


def progress_bar(view: JobView) -> str:
    """The job's progress as an HTML bar with its step count (nothing when there is no job)."""
    if not view.total:
        return ""
    done, total = view.done, view.total
    percent = 100 * done / max(total, 1)
    return (
        f'<div class="sdlora-progress"><progress max="{total}" value="{done}"></progress>'
        f"<span>{html.escape(f'{done}/{total} steps ({percent:.0f}%)')}</span></div>"
    )


def loss_frame(view: JobView) -> pd.DataFrame:
    """The loss chart's curves (raw, smoothed, validation), told apart by the `curve` column."""
    return pd.DataFrame(view.curves, columns=["step", "loss", "curve"])
