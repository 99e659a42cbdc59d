"""The training loop: DreamBooth-style LoRA training with prior preservation, on accelerate.

Read `train` top to bottom: check the inputs, `setup` (load the base, add adapter layers, cache what
the frozen parts compute, resume), `loop` (step; save and sample when it is time), `finish` (write the
adapter). The pieces they name live in their own modules: loss, cache, networks, optimizers, speed.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from sdlora.adapters import AdapterFacts, LoraFile, trigger_words, write_lora
from sdlora.adapters.from_peft import modules_from_peft_model
from sdlora.config import TrainConfig
from sdlora.data import Item, make_buckets, missing_captions, scan_folder
from sdlora.errors import describe
from sdlora.files import DiskError, retry_until_written
from sdlora.generate import Generator
from sdlora.models import bucket_step, family_of, load_base, native_resolution, resolve_base
from sdlora.models.quantization import check_backend, is_quantized
from sdlora.outputs import Outputs
from sdlora.train.cache import Batch, Example, encode_captions, encode_images, training_batches
from sdlora.train.captions import varies_captions
from sdlora.train.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from sdlora.train.conditioning import TextConditioner
from sdlora.train.ema import ema_weights, make_ema
from sdlora.train.events import (
    CancelledEvent,
    CheckpointEvent,
    ClassImagesEvent,
    DoneEvent,
    ErrorEvent,
    EventHandler,
    EventLog,
    PhaseEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ValidationEvent,
    WarningEvent,
)
from sdlora.train.loss import LossContext, diffusion_loss, training_scheduler
from sdlora.train.naming import adapter_file, adapter_name
from sdlora.train.networks import adapter_state, add_adapters, check_ranks, restore_adapter_state
from sdlora.train.optimizers import evaluation_weights, make_optimizer, param_groups
from sdlora.train.prior import ensure_class_images
from sdlora.train.result import CancelledBeforeTraining, TrainingError, TrainResult
from sdlora.train.runs import RunFolder, find_run_to_resume, mark_running, mark_stopped, new_run
from sdlora.train.samples import make_samples
from sdlora.train.speed import COMPILE_TOLERANCE, Speed, compile_unet, tune_for_speed
from sdlora.train.tracking import Tracking, check_tracker, tracker_options, with_tracking
from sdlora.train.validation import Validation, needs_validation, split_validation, validation_loss

# A full or read-only disk at the final save: the trained weights wait in memory while the user frees space.
SAVE_WAIT_S = 15 * 60.0
SAVE_RETRY_S = 10.0


@dataclass
class Session:
    """What `setup` made for the loop and `finish`: the run, the trained parts and what drives them."""

    config: TrainConfig
    accelerator: Accelerator
    events: EventLog
    run: RunFolder
    name: str
    adapter_path: Path
    base: str
    family: str
    resolution: int
    items: list[Item]  # the training images, for the adapter's tag frequencies
    parts: dict[str, torch.nn.Module]  # component name -> module being trained (prepared by accelerate)
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    ctx: LossContext
    batches: Iterator[Batch]
    sampler: Generator | None
    start_step: int
    validation: Validation | None = None
    ema: EMAModel | None = None
    grad_norm: float | None = None  # of the last optimizer step, when clipping or logging measures it


def train(
    config: TrainConfig, *, on_event: EventHandler | None = None, cancel: threading.Event | None = None
) -> TrainResult:
    """Train a LoRA adapter as `config` says and write it to a .safetensors file."""
    # Every check that needs no model runs first, so bad input fails fast and loses nothing.
    config.validate()
    scanned = scan_folder(config.data_dir, config.prompt, caption_extension=config.caption_extension)
    items, validation_items = split_validation(scanned, config)
    base = resolve_base(config.base)
    outputs, name = Outputs(config.outputs), adapter_name(config)
    run = find_run_to_resume(outputs, name, config.resume) if config.resume else None

    check_tracker(config.log_with)
    check_backend(config.quantize_base)
    accelerator = _accelerator(config, run.path.parent if run else outputs.runs)
    if run is None:  # one run folder for all processes: the main one makes it and tells the others
        made = [str(new_run(outputs, name).path) if accelerator.is_main_process else None]
        run = RunFolder(Path(broadcast_object_list(made)[0]))
    tracking = Tracking(accelerator, run.path, config) if config.log_with != "none" else None
    events = EventLog(run.events, with_tracking(on_event, tracking), enabled=accelerator.is_main_process)
    if accelerator.is_main_process:
        run.cancel_file.unlink(missing_ok=True)  # a request that stopped the run before is done with
        mark_running(run)
    for message in missing_captions(scanned, config.caption_extension):
        _warn(events, message)
    try:
        events.emit(PhaseEvent(phase="loading", run=str(run.path)))
        return loop(setup(config, items, base, run, accelerator, events, validation_items, cancel), cancel)
    except CancelledBeforeTraining as stopped:
        _warn(events, str(stopped))
        events.emit(CancelledEvent(step=0, message=str(stopped)))
        return TrainResult(adapter_file(config), run.path, 0, float("nan"), 0.0, cancelled=True)
    except Exception as error:
        events.emit(ErrorEvent(message=describe(error)))
        raise
    finally:
        if tracking is not None:
            tracking.finish()
        if accelerator.is_main_process:
            mark_stopped(run)
        if accelerator.num_processes > 1:
            # Leave the process group before the interpreter exits: gloo's worker threads can
            # otherwise abort the process during finalization (SIGABRT), failing a finished run.
            accelerator.end_training()


def loop(s: Session, cancel: threading.Event | None) -> TrainResult:
    """Step until the last step or a cancel; checkpoint and sample when it is time; then finish."""
    config = s.config
    step, loss, started, cancelled = s.start_step, float("nan"), time.perf_counter(), False
    progress = tqdm(
        total=config.steps, initial=step, desc=f"training {s.name}", disable=not s.accelerator.is_main_process
    )
    while step < config.steps and not cancelled:
        step += 1
        loss = train_step(s, step)
        progress.update(1)
        s.events.emit(step_event(s, step, loss, time.perf_counter() - started))
        if needs_validation(config, s.validation, step):
            validate(s, step)
        progress.set_postfix(progress_figures(s, loss))
        if needs_sample(config, step) and s.accelerator.is_main_process:
            save_samples(s, step, cancel)

        # A cancel at the last step changes nothing: every step is trained, so the adapter is written.
        cancelled = cancel_requested(s, cancel) and step < config.steps
        if needs_checkpoint(config, step, cancelled):
            save_state(s, step, cancelled)
    progress.close()

    if cancelled:
        s.events.emit(CancelledEvent(step=step))
        return TrainResult(
            s.adapter_path, s.run.path, step, loss, time.perf_counter() - started, cancelled=True
        )
    return finish(s, step, loss, time.perf_counter() - started, cancel)


def needs_checkpoint(config: TrainConfig, step: int, cancelled: bool) -> bool:
    """Every --save-every steps and at the last step; a cancelled run always keeps one to resume from."""
    periodic = bool(config.save_every) and (step % config.save_every == 0 or step == config.steps)
    return periodic or cancelled


def needs_sample(config: TrainConfig, step: int) -> bool:
    """Every --sample-every steps and at the last step, when there are sample prompts."""
    wanted = bool(config.sample_prompt and config.sample_every)
    return wanted and (step % config.sample_every == 0 or step == config.steps)


def progress_figures(s: Session, loss: float) -> dict[str, str]:
    """The progress line's numbers: the step's loss, and the latest validation loss once measured."""
    figures = {"loss": f"{loss:.4f}"}
    if s.validation and s.validation.losses:
        figures["val"] = f"{s.validation.losses[max(s.validation.losses)]:.4f}"
    return figures


def validate(s: Session, step: int) -> None:
    """Measure the validation loss on the evaluation weights and report it with the best so far."""
    with evaluation(s):
        loss = validation_loss(s.ctx, s.validation.examples, s.parts.values())
    s.validation.losses[step] = loss
    best = s.validation.best_step(s.validation.losses)
    s.events.emit(ValidationEvent(step=step, loss=loss, best_step=best, best_loss=s.validation.losses[best]))


def stop_asked(run: RunFolder, cancel: threading.Event | None) -> Callable[[], bool]:
    """Whether the caller's cancel event is set or the run's CANCEL file exists: asked between images."""
    return lambda: (cancel is not None and cancel.is_set()) or run.cancel_file.exists()


def cancel_requested(s: Session, cancel: threading.Event | None) -> bool:
    """The caller's cancel event or the run's CANCEL file; with several processes, all stop at one step."""
    cancelled = stop_asked(s.run, cancel)()
    if s.accelerator.num_processes > 1:
        flag = torch.tensor(float(cancelled), device=s.accelerator.device)
        cancelled = bool(s.accelerator.reduce(flag, "sum").item() > 0)
    return cancelled


def train_step(s: Session, step: int) -> float:
    """One optimizer step over --grad-accum micro-batches; returns its loss, averaged over processes."""
    config, accelerator = s.config, s.accelerator
    loss_value = 0.0
    for _ in range(config.grad_accum):
        instance, prior = next(s.batches)
        with accelerator.accumulate(*s.parts.values()):
            loss = _backward(s, step, instance, prior)
            if accelerator.sync_gradients and (config.max_grad_norm > 0 or config.log_with != "none"):
                # with no clipping asked, an infinite bound only measures the norm for the log
                norm = accelerator.clip_grad_norm_(s.params, config.max_grad_norm or math.inf)
                s.grad_norm = None if norm is None else float(norm)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        loss_value += accelerator.reduce(loss.detach(), "mean").item() / config.grad_accum
    s.lr_scheduler.step()
    if s.ema is not None:
        s.ema.step(s.params)
    return loss_value


def _backward(s: Session, step: int, instance: list[Example], prior: list[Example]) -> torch.Tensor:
    """The loss of one micro-batch, back-propagated; a non-finite loss or no memory stops with advice."""
    try:
        loss = diffusion_loss(s.ctx, instance, prior)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"The loss became {loss.item()} at step {step}. "
                f"{_last_good(s.run)}Lower --lr, or use --mixed-precision bf16 or no instead of fp16."
            )
        s.accelerator.backward(loss)
    except torch.cuda.OutOfMemoryError as error:
        raise TrainingError(
            f"Out of GPU memory at step {step} (batch {s.config.batch_size}, {s.resolution} px). "
            f"{_last_good(s.run)}Try --gradient-checkpointing, a smaller --batch-size with "
            "--grad-accum, a lower --resolution, --mixed-precision bf16, or --optimizer adamw8bit."
        ) from error
    return loss


def _last_good(run: RunFolder) -> str:
    latest = run.latest_checkpoint()
    return f"The last good checkpoint is {latest} (continue with --resume). " if latest else ""


def step_event(s: Session, step: int, loss: float, elapsed: float) -> StepEvent:
    per_step = elapsed / (step - s.start_step)
    return StepEvent(
        step=step,
        total=s.config.steps,
        loss=loss,
        lr=s.lr_scheduler.get_last_lr()[0],
        elapsed_s=round(elapsed, 4),
        eta_s=round(per_step * (s.config.steps - step), 1),
        images_per_s=round(s.config.batch_size * s.config.grad_accum / per_step, 3),
        grad_norm=s.grad_norm,
    )


def save_state(s: Session, step: int, cancelled: bool = False) -> None:
    """A checkpoint to resume from: adapter weights, optimizer, schedule and random state.

    On a full or read-only disk a cancelled run stops with `DiskError` naming the last good checkpoint;
    otherwise training goes on with a warning (the weights are in memory, the next save may fit)."""
    s.accelerator.wait_for_everyone()
    if not s.accelerator.is_main_process:
        return
    s.events.emit(PhaseEvent(phase="saving"))
    try:
        with evaluation_weights(s.optimizer):  # written inside: the state's tensors are the live weights
            state = TrainingState(
                step=step,
                lora=adapter_state(s.accelerator, s.parts),
                optimizer=s.optimizer.state_dict(),
                lr_scheduler=s.lr_scheduler.state_dict(),
                rng={"torch": torch.get_rng_state(), "noise": s.ctx.rng.get_state()},
                ema=s.ema.state_dict() if s.ema is not None else None,
            )
            path = save_checkpoint(s.run.checkpoints, state, s.config.keep_checkpoints, _best_step(s, step))
    except DiskError as error:
        if cancelled:
            raise
        _warn(s.events, f"{error} Training goes on with the weights in memory.")
        return
    if s.validation:
        s.validation.checkpoints[step] = str(path)
    s.events.emit(CheckpointEvent(step=step, path=str(path)))


def _best_step(s: Session, step: int) -> int | None:
    """The checkpoint step with the lowest validation loss, counting the one being written."""
    return s.validation.best_step({*s.validation.checkpoints, step}) if s.validation else None


@contextmanager
def evaluation(s: Session) -> Iterator[None]:
    """The weights to sample, validate and write the adapter with: the EMA's when --ema is on, the
    schedule-free average with that optimizer, else the trained ones."""
    with evaluation_weights(s.optimizer), ema_weights(s.ema, s.params):
        yield


def save_samples(s: Session, step: int, cancel: threading.Event | None) -> None:
    """The sample images of this step; a cancel stops them between images, and a full or read-only disk
    skips them with a warning (they are a view of the training, which goes on)."""

    def progress(done: int, total: int) -> None:
        s.events.emit(PhaseEvent(phase="samples", done=done, total=total))

    try:
        with evaluation(s):
            paths = make_samples(
                s.sampler,
                s.parts.values(),
                s.config,
                s.resolution,
                s.run.samples,
                step,
                progress,
                should_stop=stop_asked(s.run, cancel),
            )
    except DiskError as error:
        _warn(s.events, f"{error} The samples of step {step} were skipped.")
        return
    s.events.emit(SampleEvent(step=step, paths=[str(p) for p in paths]))


def finish(
    s: Session, step: int, loss: float, elapsed: float, cancel: threading.Event | None = None
) -> TrainResult:
    """The adapter file, with the facts a user will want to see later."""
    s.accelerator.wait_for_everyone()
    if s.accelerator.is_main_process:
        s.events.emit(PhaseEvent(phase="saving"))
        with evaluation(s):
            save_adapter(s, trained_lora(s, step), cancel)
    device = s.accelerator.device
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    best = s.validation.best_checkpoint if s.validation else None
    s.events.emit(
        DoneEvent(
            step=step,
            adapter=str(s.adapter_path),
            loss=loss,
            elapsed_s=round(elapsed, 3),
            peak_gpu_memory_mib=peak,
            best_checkpoint=best[1] if best else None,
            best_validation_loss=s.validation.losses[best[0]] if best else None,
        )
    )
    return TrainResult(
        s.adapter_path, s.run.path, step, loss, elapsed, best_checkpoint=Path(best[1]) if best else None
    )


def save_adapter(s: Session, lora: LoraFile, cancel: threading.Event | None) -> None:
    """Write the adapter. On a full or read-only disk the trained weights stay in memory and the write is
    tried again while the user frees space (or a cancel gives up); failing that, a copy goes to the
    system's temporary folder and `DiskError` says what was kept."""

    def wait(error: DiskError) -> None:
        _warn(
            s.events,
            f"{error} The trained weights are kept in memory and saving is tried again every "
            f"{SAVE_RETRY_S:g} s for {SAVE_WAIT_S / 60:g} min (cancel to give up).",
        )
        s.events.emit(PhaseEvent(phase="waiting_for_disk"))

    def write(path: Path) -> Callable[[], Path]:
        return lambda: write_lora(lora, path, s.config.adapter_format)

    try:
        retry_until_written(
            write(s.adapter_path),
            wait_s=SAVE_WAIT_S,
            every_s=SAVE_RETRY_S,
            on_first_failure=wait,
            should_stop=stop_asked(s.run, cancel),
        )
    except DiskError as error:
        kept = []
        latest = s.run.latest_checkpoint()
        if latest:
            kept.append(
                f"the checkpoint {latest} (make an adapter of it in the Runs tab, or run again with "
                f"--resume {s.run.path})"
            )
        with contextlib.suppress(OSError):  # a private new folder: other users can't plant a link there
            rescue = Path(tempfile.mkdtemp(prefix="sdlora-unsaved-"))
            try:
                kept.append(
                    f"the adapter, in {write(rescue / s.adapter_path.name)()} (move it to {s.adapter_path.parent})"
                )
            except DiskError:
                rescue.rmdir()
        said = f"Kept: {' and '.join(kept)}." if kept else "Nothing could be kept."
        raise DiskError(error.errno, f"{error} {said}") from error


def trained_lora(s: Session, step: int) -> LoraFile:
    """The trained layers as neutral modules (any network type), with the run's facts."""
    modules = {
        f"{part}.{name}": module
        for part, model in s.parts.items()
        for name, module in modules_from_peft_model(s.accelerator.unwrap_model(model)).items()
    }
    return LoraFile(modules, adapter_facts(s, step).to_metadata())


def adapter_facts(s: Session, step: int) -> AdapterFacts:
    config = s.config
    return AdapterFacts(
        name=s.name,
        base_model=s.base,
        family=s.family,
        rank=config.rank,
        alpha=config.lora_alpha,
        targets=config.targets,
        instance_prompt=config.prompt or "",
        class_prompt=config.class_prompt or "",
        trigger_words=trigger_words(config.prompt or "", config.class_prompt),
        steps=step,
        resolution=s.resolution,
        learning_rate=config.lr,
        image_count=len(s.items),
        text_encoder=config.text_encoder,
        seed=config.seed,
        network=config.network,
        dora=config.dora,
        rslora=config.rslora,
        tag_frequency=json.dumps(tag_frequency(s.items)),
    )


def tag_frequency(items: list[Item]) -> dict[str, int]:
    """How many training images carry each comma-separated caption tag (kohya's ss_tag_frequency)."""
    return dict(Counter(tag.strip() for item in items for tag in set(item.caption.split(",")) if tag.strip()))


# --- setup ------------------------------------------------------------------------------------------


def setup(
    config: TrainConfig,
    items: list[Item],
    base: str,
    run: RunFolder,
    accelerator: Accelerator,
    events: EventLog,
    validation_items: list[Item],
    cancel: threading.Event | None = None,
) -> Session:
    """Load the frozen base, add adapter layers, cache what the frozen parts compute, resume; emit 'start'."""
    set_seed(config.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    # The base model, frozen (quantized as it loads with --quantize-base, computing in weight_dtype).
    pipe = load_base(base, **_quantized(config, weight_dtype))
    conditioner = TextConditioner(pipe)
    _freeze(pipe, conditioner, weight_dtype, device)
    check_ranks(config, pipe.unet, conditioner.encoders)
    resolution = config.resolution or native_resolution(pipe)
    name, adapter_path, family = adapter_name(config), adapter_file(config), family_of(pipe).name
    run.write_config(
        config,
        base=base,
        name=name,
        adapter=str(adapter_path),
        resolution=resolution,
        family=family,
        mixed_precision=accelerator.mixed_precision,
    )
    class_items = _class_items(config, pipe, base, resolution, accelerator, events, stop_asked(run, cancel))

    # Adapter layers: the only weights that train.
    parts = _trainable_parts(config, pipe, conditioner, weight_dtype)
    speed = tune_for_speed(config, pipe.unet, device)

    # Cache what frozen parts compute: latents always, text embeddings unless the text encoder trains.
    events.emit(PhaseEvent(phase="caching"))
    buckets = make_buckets(resolution, bucket_step(pipe))
    examples = encode_images(pipe.vae, items, buckets, config.flip, device)
    class_examples = encode_images(pipe.vae, class_items, buckets, config.flip, device)
    validation_examples = encode_images(pipe.vae, validation_items, buckets, False, device)
    pipe.vae.to("cpu")
    cached_text = (
        None
        if config.text_encoder or varies_captions(config)  # then each step encodes its own captions
        else encode_captions(conditioner, examples + class_examples + validation_examples, device)
    )

    # Optimizer and schedule; accelerate handles devices, mixed precision and accumulation.
    optimizer, lr_scheduler, params = _optimizer(config, parts, device)
    prepared = accelerator.prepare(*parts.values(), optimizer)
    parts, optimizer = dict(zip(parts, prepared[:-1], strict=True)), prepared[-1]
    ctx = LossContext(
        config,
        parts["unet"],
        conditioner,
        {part: model for part, model in parts.items() if part != "unet"},
        training_scheduler(config, pipe.scheduler.config),
        cached_text,
        torch.Generator(device=device).manual_seed(config.seed),
        device,
        weight_dtype,
        pipe.vae.config.scaling_factor,
        accelerator.process_index,
        accelerator.num_processes,
    )
    # Batches are drawn at the global size; each process trains on its share (see diffusion_loss).
    global_batch = config.batch_size * accelerator.num_processes
    s = Session(
        config=config,
        accelerator=accelerator,
        events=events,
        run=run,
        name=name,
        adapter_path=adapter_path,
        base=base,
        family=family,
        resolution=resolution,
        items=items,
        parts=parts,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        ctx=ctx,
        batches=training_batches(examples, class_examples, global_batch, config.seed),
        sampler=None,
        start_step=0,
        validation=Validation(validation_examples) if validation_examples else None,
        ema=make_ema(config, params),
    )
    s.start_step = _resume(s)
    for _ in range(s.start_step * config.grad_accum):
        next(s.batches)  # replay the data order up to the checkpoint
    for model in parts.values():
        model.train()
    if config.compile:
        first = next(training_batches(examples, class_examples, global_batch, config.seed))  # not consumed
        speed = _compile(s, first, speed)
    if needs_sample(config, config.steps):  # the last step samples whenever any step does
        s.sampler = Generator(pipe, device=str(device))
    events.emit(_start_event(s, examples, class_examples, speed))
    return s


def _accelerator(config: TrainConfig, runs: Path) -> Accelerator:
    # accelerate keeps one precision per process, but one process may run several jobs (the app's
    # queue runs them one at a time): each job starts that state afresh. The process group stays.
    AcceleratorState._reset_state()
    # cpu=True without CUDA lets torchrun/accelerate launch join CPU processes with gloo.
    return Accelerator(
        mixed_precision=_precision(config.mixed_precision),
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
        **tracker_options(config, runs),
    )


def _precision(requested: str) -> str:
    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():  # bf16 autocast also runs on CPUs
            raise TrainingError(
                "--mixed-precision fp16 needs a CUDA GPU; use bf16, 'no' or 'auto' on the CPU."
            )
        return requested
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _quantized(config: TrainConfig, weight_dtype: torch.dtype) -> dict:
    """load_base's options for --quantize-base: the quantized parts load straight into the training
    precision (a quantized model can't be cast afterwards), the VAE in fp32 as `_freeze` keeps it."""
    if config.quantize_base == "none":
        return {}
    return {"quantize": config.quantize_base, "dtype": {"vae": torch.float32, "default": weight_dtype}}


def _freeze(
    pipe: DiffusionPipeline, conditioner: TextConditioner, weight_dtype: torch.dtype, device: torch.device
) -> None:
    """The base's weights frozen on the device; the VAE in fp32: it runs once per image and fp16 VAEs
    overflow, while the U-Net and the text encoders run every step in the training precision."""
    models = [
        (pipe.vae, torch.float32),
        *((m, weight_dtype) for m in (pipe.unet, *conditioner.encoders.values())),
    ]
    for model, dtype in models:
        model.requires_grad_(False)
        model.to(device)
        if model.dtype != dtype and not is_quantized(model):
            model.to(dtype=dtype)


def _trainable_parts(
    config: TrainConfig, pipe: DiffusionPipeline, conditioner: TextConditioner, weight_dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """The parts with adapter layers; those layers stay in fp32 under mixed precision."""
    parts = add_adapters(config, pipe.unet, conditioner.encoders)
    if weight_dtype != torch.float32:
        cast_training_params(list(parts.values()), dtype=torch.float32)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for part, model in parts.items():
            if part != "unet":
                model.gradient_checkpointing_enable()
    return parts


def _optimizer(
    config: TrainConfig, parts: dict[str, torch.nn.Module], device: torch.device
) -> tuple[torch.optim.Optimizer, LRScheduler, list[torch.nn.Parameter]]:
    """The optimizer over the adapter weights, its schedule, and the parameters it updates."""
    groups = param_groups(config, parts)
    optimizer = make_optimizer(config, groups, device)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    return optimizer, lr_scheduler, [p for group in groups for p in group["params"]]


def _class_items(
    config: TrainConfig,
    pipe: DiffusionPipeline,
    base: str,
    resolution: int,
    accelerator: Accelerator,
    events: EventLog,
    should_stop: Callable[[], bool],
) -> list[Item]:
    """Class images for prior preservation, generated by the frozen base before any adapter exists.

    The main process makes the missing ones and decides for all whether a cancel stopped it; the
    others then find them made."""
    if not config.prior_preservation:
        return []
    class_dir = (
        Path(config.class_dir)
        if config.class_dir
        else Outputs(config.outputs).class_images(base, config.class_prompt, resolution)
    )

    def ensure(stop: Callable[[], bool] | None) -> tuple[list[Path], int]:
        return ensure_class_images(
            pipe,
            config.class_prompt,
            class_dir,
            config.num_class_images,
            resolution,
            config.seed,
            device=str(accelerator.device),
            on_progress=lambda done, total: events.emit(
                PhaseEvent(phase="class_images", done=done, total=total)
            ),
            should_stop=stop,
        )

    stopped = None
    if accelerator.is_main_process:
        try:
            paths, made = ensure(should_stop)
        except CancelledBeforeTraining as cancelled:
            stopped = str(cancelled)
    stopped = broadcast_object_list([stopped])[0]
    if stopped:
        raise CancelledBeforeTraining(stopped)
    if not accelerator.is_main_process:
        paths, made = ensure(None)
    events.emit(ClassImagesEvent(folder=str(class_dir), count=len(paths), generated=made))
    return [Item(p, config.class_prompt) for p in paths]


def _resume(s: Session) -> int:
    """The step to start from: that of the newest checkpoint when resuming, whose state is loaded, else 0."""
    s.accelerator.wait_for_everyone()  # the main process removed an earlier cancel request (`train`)
    checkpoint = s.run.latest_checkpoint() if s.config.resume else None
    if checkpoint is None:
        return 0
    state = load_checkpoint(checkpoint)
    with evaluation_weights(s.optimizer):  # checkpoints hold the evaluation weights (schedule-free)
        restore_adapter_state(s.accelerator, s.parts, state.lora)
        s.optimizer.load_state_dict(state.optimizer)
    s.lr_scheduler.load_state_dict(state.lr_scheduler)
    if s.ema is not None and state.ema is not None:
        s.ema.load_state_dict(state.ema)
        s.ema.to(s.accelerator.device)
    torch.set_rng_state(state.rng["torch"])
    s.ctx.rng.set_state(state.rng["noise"])
    return state.step


def _start_event(
    s: Session, examples: list[Example], class_examples: list[Example], speed: Speed
) -> StartEvent:
    return StartEvent(
        run=str(s.run.path),
        base=s.base,
        steps=s.config.steps,
        start_step=s.start_step,
        images=len(examples),
        class_images=len(class_examples),
        resolution=s.resolution,
        buckets=sorted({f"{e.bucket.width}x{e.bucket.height}" for e in examples}),
        mixed_precision=s.accelerator.mixed_precision,
        **asdict(speed),
    )


def _warn(events: EventLog, message: str) -> None:
    """A warning the terminal shows (Python's warnings) and the run's events keep."""
    warnings.warn(message, UserWarning, stacklevel=3)
    events.emit(WarningEvent(message=message))


def _compile(s: Session, first: Batch, speed: Speed) -> Speed:
    """Use the compiled U-Net only if its gradients match the eager ones (all processes agree)."""
    compiled, error = compile_unet(s.ctx, first, s.params)
    error = s.accelerator.reduce(torch.tensor(error, device=s.accelerator.device), "max").item()
    if error <= COMPILE_TOLERANCE:
        s.ctx.unet = compiled
    else:
        message = (
            f"torch.compile changed the LoRA gradients by {error:.0%} on the first batch; "
            "training without it. Report it to PyTorch with your torch version and device."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        s.events.emit(WarningEvent(message=message))
    return replace(speed, compiled=s.ctx.unet is compiled, compile_gradient_error=round(error, 6))
