"""The Train tab: upload, captions, settings, and a job's progress polled from the shared queue."""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from sdlora.config import TrainConfig, option_default, option_help
from sdlora.data.uploads import caption_rows, save_captions, stage_upload, thumbnails
from sdlora.demo import base_spec
from sdlora.forms import FORM_FIELDS, TrainForm, make_config
from sdlora.jobs import JobView, job_view, pending_names
from sdlora.presets import PRESETS, preset_family, preset_values
from sdlora.train.launch import gpu_count
from ui.common import USER_ERRORS, AppContext, problem
from ui.guard import client_owner

POLL_SECONDS = 1.0
# The form fields a preset fills: whether prior preservation is on, then its TrainConfig settings.
PRESET_FIELDS = ("prior", *(f for f in next(iter(PRESETS.values())).settings if f in FORM_FIELDS))


GPUS = gpu_count()  # the app offers data-parallel training when it sees several


def build_train_tab(app: gr.Blocks, ctx: AppContext, base_box: gr.Textbox, initial_base: str | None) -> None:
    """Lay out the tab inside the current Blocks and wire its events; a page load shows the queue's job."""
    first_preset = next(iter(PRESETS))
    preset = preset_form_values(first_preset, initial_base)
    folder = gr.State(None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            gr.Markdown(
                "### 1. Training images\nDrop a folder of images (same-name `.txt` files are their "
                "captions), or a `.zip` of them. Captions can be edited below before training."
            )
            with gr.Row():
                folder_in = gr.File(
                    file_count="directory", label="Image folder", height=120, elem_id="upload-folder"
                )
                zip_in = gr.File(file_count="single", label="…or a .zip", height=120, elem_id="upload-zip")
            upload_msg = gr.Markdown(elem_id="upload-message")
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
                list(PRESETS), value=first_preset, label="Preset", info="Fills the settings below."
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
                fields["num_class_images"] = gr.Number(
                    preset["num_class_images"],
                    label="Class images",
                    precision=0,
                    minimum=1,
                    elem_id="class-images",
                    info=option_help(TrainConfig, "num_class_images"),
                )
            fields["class_prompt"] = gr.Textbox(
                label="Class prompt", info=option_help(TrainConfig, "class_prompt"), elem_id="class-prompt"
            )
            with gr.Row():
                fields["rank"] = gr.Number(preset["rank"], label="Rank", precision=0, minimum=1)
                fields["alpha"] = gr.Number(
                    preset["alpha"], label="Alpha", minimum=0, info="0: equal to the rank."
                )
                fields["steps"] = gr.Number(
                    preset["steps"], label="Steps", precision=0, minimum=1, elem_id="steps"
                )
            with gr.Row():
                fields["lr"] = gr.Number(preset["lr"], label="Learning rate", minimum=0, elem_id="lr")
                fields["resolution"] = gr.Number(
                    0, label="Resolution", precision=0, minimum=0, info="0: the base model's native size."
                )
                fields["seed"] = gr.Number(option_default(TrainConfig, "seed"), label="Seed", precision=0)
            with gr.Row():
                fields["text_encoder"] = gr.Checkbox(
                    preset["text_encoder"],
                    label="Text-encoder LoRA",
                    info=option_help(TrainConfig, "text_encoder"),
                )
                fields["sample_every"] = gr.Number(
                    preset["sample_every"],
                    label="Sample every N steps",
                    precision=0,
                    minimum=0,
                    info="0: no samples.",
                    elem_id="sample-every",
                )
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
            start_msg = gr.Markdown(elem_id="start-message")
    gr.Markdown("### 3. Progress")
    status = gr.Markdown(elem_id="job-status")
    progress = gr.HTML(elem_id="job-progress")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", title="Loss", height=260, label="Loss", elem_id="loss-plot")
        samples = gr.Gallery(
            label="Samples (newest first)",
            columns=4,
            height=260,
            object_fit="contain",
            elem_classes=["pixelated"],
            elem_id="samples",
        )
    timer = gr.Timer(POLL_SECONDS, active=False)
    seen = gr.State("")  # what the page shows, so an unchanged job sends nothing
    shown = gr.State(None)  # the id of the job the page shows

    def staged(paths: list[str] | str | None, request: gr.Request) -> tuple:
        owner = client_owner(request)
        try:
            files = ctx.uploads.check(owner, [paths] if isinstance(paths, str) else paths or [])
            upload = stage_upload(files, ctx.outputs)
        except USER_ERRORS as error:
            return None, problem(error), [], [], gr.skip()
        ctx.uploads.discard(owner, files)  # copied into outputs/uploads: the cached copies are not needed
        message = f"{upload.images} image(s) ready in `{upload.folder}`."
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
        return [values[key] for key in PRESET_FIELDS]

    preset_in.change(preset_chosen, [preset_in, base_box], [fields[key] for key in PRESET_FIELDS])

    def started(base_text: str, rows: list[list[str]], processes: float, *values) -> tuple:
        form = TrainForm(**dict(zip(FORM_FIELDS, values, strict=True)))
        try:
            if form.folder:
                save_captions(form.folder, rows)
            config = make_config(form, base_spec(base_text), ctx.outputs, pending_names(ctx.queue.jobs()))
            job = ctx.queue.submit(config, processes=int(processes or 1))
        except USER_ERRORS as error:
            return problem(error), gr.skip()
        return f"Job {job.id} submitted: training `{config.name}`.", gr.Timer(active=True)

    start.click(
        started, [base_box, captions, gpus, *(fields[key] for key in FORM_FIELDS)], [start_msg, timer]
    )

    def cancelled(job_id: int | None) -> str:
        """Cancel the job the page shows (not whichever runs by the time the click arrives)."""
        job = next((j for j in ctx.queue.jobs() if j.id == job_id), None)
        if job is None or job.finished:
            return "No job is running."
        ctx.queue.cancel(job.id)
        return f"Cancelling job {job.id}: it stops after the current step."

    cancel.click(cancelled, shown, start_msg)

    def resumed(job_id: int | None) -> tuple:
        """Continue the job the page shows (cancelled or failed) from its newest checkpoint."""
        try:
            job = ctx.queue.resume(job_id)
        except USER_ERRORS as error:
            return problem(error), gr.skip()
        return f"Job {job.id} submitted: resuming `{job.config.name}` from its checkpoint.", gr.Timer(
            active=True
        )

    resume.click(resumed, shown, [start_msg, timer])

    def polled(last: str) -> tuple:
        job = ctx.queue.current()
        key = f"{job.id}:{len(job.events)}:{job.status}" if job else "none"
        if key == last:
            return (gr.skip(),) * 7
        view = job_view(job, ctx.queue.jobs())
        return (
            view.status,
            progress_bar(view),
            loss_frame(view),
            view.samples,
            gr.Timer(active=view.active),
            key,
            job.id if job else None,
        )

    poll_outputs = [status, progress, loss, samples, timer, seen, shown]
    timer.tick(polled, seen, poll_outputs, show_progress="hidden")
    app.load(polled, seen, poll_outputs, show_progress="hidden")


def preset_form_values(name: str, base_text: str | None) -> dict:
    """The form values a preset sets, scaled down when the base field names the demo model."""
    values = preset_values(name, preset_family(base_text))
    return {"prior": PRESETS[name].prior, **{k: v for k, v in values.items() if k in PRESET_FIELDS}}


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
    return pd.DataFrame(view.losses, columns=["step", "loss"])
