"""The training loop: DreamBooth-style LoRA training with prior preservation, on accelerate.

Read `train` top to bottom: check the inputs, load the base, add LoRA layers, cache what the frozen
parts compute, then step; the helpers below it are the pieces that the loop names.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from sdlora.adapters import AdapterFacts, lora_from_peft, trigger_words, write_lora
from sdlora.config import TrainConfig
from sdlora.data import (
    Bucket,
    Item,
    assign_bucket,
    bucket_batches,
    bucket_fit,
    fit_to_bucket,
    load_image,
    make_buckets,
    scan_folder,
)
from sdlora.errors import SdloraError
from sdlora.files import safe_name
from sdlora.generate import GenerationParams, Generator, save_png
from sdlora.models import bucket_step, family_of, load_base, native_resolution, resolve_base
from sdlora.train.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from sdlora.train.conditioning import Conditioning, SizeInfo, TextConditioner
from sdlora.train.events import EventHandler, EventLog
from sdlora.train.prior import default_class_dir, ensure_class_images
from sdlora.train.runs import RunFolder, find_run_to_resume, new_run

SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 5.0
COMPILE_TOLERANCE = 0.05  # relative gradient difference allowed between compiled and eager U-Nets


class TrainingError(SdloraError, RuntimeError):
    """Training stopped; the message says why and what to change."""


@dataclass
class TrainResult:
    adapter: Path
    run: Path
    steps: int
    final_loss: float
    elapsed_s: float
    cancelled: bool = False


@dataclass
class Example:
    """One image as the frozen VAE sees it: its latent distribution (and its mirror's), bucket, caption."""

    mean: torch.Tensor
    std: torch.Tensor
    flipped: tuple[torch.Tensor, torch.Tensor] | None
    size: SizeInfo
    caption: str
    repeats: int

    @property
    def bucket(self) -> Bucket:
        return self.size.bucket


def train(
    config: TrainConfig, *, on_event: EventHandler | None = None, cancel: threading.Event | None = None
) -> TrainResult:
    """Train a LoRA adapter as `config` says and write it to a .safetensors file."""
    # 1. Inputs: every check that needs no model runs first, so bad input fails fast and loses nothing.
    config.validate()
    items = scan_folder(config.data_dir, config.prompt)
    base = resolve_base(config.base)
    name = adapter_name(config)
    adapter_path = adapter_file(config)
    runs_dir = Path(config.outputs) / "runs"
    run = find_run_to_resume(runs_dir, name, config.resume) if config.resume else None

    # accelerate keeps one precision per process, but one process may run several jobs (the app's
    # queue runs them one at a time): each job starts that state afresh. The process group stays.
    AcceleratorState._reset_state()
    # cpu=True without CUDA lets torchrun/accelerate launch join CPU processes with gloo.
    accelerator = Accelerator(
        mixed_precision=_precision(config.mixed_precision),
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    if run is None:  # one run folder for all processes: the main one makes it and tells the others
        made = [str(new_run(runs_dir, name).path) if accelerator.is_main_process else None]
        run = RunFolder(Path(broadcast_object_list(made)[0]))
    events = EventLog(run.events, on_event, enabled=accelerator.is_main_process)
    try:
        return _train(config, items, base, name, adapter_path, run, accelerator, events, cancel)
    except Exception as error:
        events.emit("error", message=f"{type(error).__name__}: {error}")
        raise
    finally:
        if accelerator.num_processes > 1:
            # Leave the process group before the interpreter exits: gloo's worker threads can
            # otherwise abort the process during finalization (SIGABRT), failing a finished run.
            accelerator.end_training()


def _train(
    config: TrainConfig,
    items: list[Item],
    base: str,
    name: str,
    adapter_path: Path,
    run: RunFolder,
    accelerator: Accelerator,
    events: EventLog,
    cancel: threading.Event | None,
) -> TrainResult:
    set_seed(config.seed)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )

    # 2. The base model, frozen. The VAE stays in fp32: it runs once per image and fp16 VAEs overflow.
    pipe = load_base(base)
    resolution = config.resolution or native_resolution(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet, vae, conditioner = pipe.unet, pipe.vae, TextConditioner(pipe)
    for model, dtype in (
        (vae, torch.float32),
        (unet, weight_dtype),
        *((e, weight_dtype) for e in conditioner.encoders.values()),
    ):
        model.requires_grad_(False)
        model.to(device)
        if model.dtype != dtype:
            model.to(dtype=dtype)
    run.write_config(
        config,
        base=base,
        name=name,
        adapter=str(adapter_path),
        resolution=resolution,
        family=family_of(pipe).name,
        mixed_precision=accelerator.mixed_precision,
    )

    # 3. Class images for prior preservation, generated by the frozen base before any LoRA exists.
    class_items: list[Item] = []
    if config.prior_preservation:
        class_dir = (
            Path(config.class_dir)
            if config.class_dir
            else default_class_dir(Path(config.outputs), base, config.class_prompt, resolution)
        )
        with accelerator.main_process_first():
            paths, made = ensure_class_images(
                pipe,
                config.class_prompt,
                class_dir,
                config.num_class_images,
                resolution,
                config.seed,
                device=str(device),
            )
        events.emit("class_images", folder=str(class_dir), count=len(paths), generated=made)
        class_items = [Item(p, config.class_prompt) for p in paths]

    # 4. LoRA layers on the attention projections (and optionally the text encoder).
    unet.add_adapter(lora_config(config, unet_target_modules(unet, config.targets)))
    parts: dict[str, torch.nn.Module] = {"unet": unet}  # component name -> module being trained
    if config.text_encoder:
        for part, encoder in conditioner.encoders.items():
            encoder.add_adapter(lora_config(config, list(family_of(pipe).text_encoder_targets)))
            parts[part] = encoder
    if weight_dtype != torch.float32:
        cast_training_params(list(parts.values()), dtype=torch.float32)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for part, model in parts.items():
            if part != "unet":
                model.gradient_checkpointing_enable()
    speed = tune_for_speed(config, unet, device)

    # 5. Cache what frozen parts compute: latents always, text embeddings unless the text encoder trains.
    buckets = make_buckets(resolution, bucket_step(pipe))
    examples = encode_images(vae, items, buckets, config.flip, device)
    class_examples = encode_images(vae, class_items, buckets, config.flip, device)
    vae_scale = vae.config.scaling_factor
    vae.to("cpu")
    cached_text = None
    if not config.text_encoder:
        captions = sorted({e.caption for e in examples + class_examples})
        with torch.no_grad():
            encoded = conditioner.encode(captions, device)
        cached_text = {caption: encoded[i] for i, caption in enumerate(captions)}

    # 6. Optimizer and schedule; accelerate handles devices, mixed precision and accumulation.
    groups = [
        {
            "params": [p for p in model.parameters() if p.requires_grad],
            "lr": config.lr if part == "unet" else config.text_encoder_lr or config.lr,
        }
        for part, model in parts.items()
    ]
    optimizer = make_optimizer(config, groups, device)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps
    )
    prepared = accelerator.prepare(*parts.values(), optimizer)
    parts, optimizer = dict(zip(parts, prepared[:-1], strict=True)), prepared[-1]
    trainables = list(parts.values())
    params = [p for group in groups for p in group["params"]]
    noise_rng = torch.Generator(device=device).manual_seed(config.seed)

    # 7. Resume: LoRA weights, optimizer, schedule and random state from the newest checkpoint.
    if accelerator.is_main_process:
        run.cancel_file.unlink(missing_ok=True)  # a request that stopped the run before is done with
    accelerator.wait_for_everyone()
    start_step = 0
    checkpoint = run.latest_checkpoint() if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        restore_lora(accelerator, parts, state.lora)
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
        torch.set_rng_state(state.rng["torch"])
        noise_rng.set_state(state.rng["noise"])
        start_step = state.step
    # Batches are drawn at the global size; each process trains on its share (see diffusion_loss).
    global_batch = config.batch_size * accelerator.num_processes
    batches = training_batches(examples, class_examples, global_batch, config.seed)
    for _ in range(start_step * config.grad_accum):
        next(batches)  # replay the data order up to the checkpoint

    text_encoders = {part: model for part, model in parts.items() if part != "unet"}
    ctx = LossContext(
        config,
        parts["unet"],
        conditioner,
        text_encoders,
        noise_scheduler,
        cached_text,
        noise_rng,
        device,
        weight_dtype,
        vae_scale,
        accelerator.process_index,
        accelerator.num_processes,
    )
    for model in trainables:
        model.train()
    if config.compile:
        first = next(training_batches(examples, class_examples, global_batch, config.seed))  # not consumed
        compiled, error = compile_unet(ctx, first, params)
        error = accelerator.reduce(torch.tensor(error, device=device), "max").item()  # all processes agree
        if error <= COMPILE_TOLERANCE:
            ctx.unet = compiled
        else:
            message = (
                f"torch.compile changed the LoRA gradients by {error:.0%} on the first batch; "
                "training without it. Report it to PyTorch with your torch version and device."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            events.emit("warning", message=message)
        speed.update(compiled=ctx.unet is compiled, compile_gradient_error=round(error, 6))

    sampler = Generator(pipe, device=str(device)) if config.sample_prompt and config.sample_every else None
    events.emit(
        "start",
        run=str(run.path),
        base=base,
        steps=config.steps,
        start_step=start_step,
        images=len(examples),
        class_images=len(class_examples),
        resolution=resolution,
        buckets=sorted({f"{e.bucket.width}x{e.bucket.height}" for e in examples}),
        mixed_precision=accelerator.mixed_precision,
        **speed,
    )

    # 8. The loop.
    step, loss_value, started = start_step, float("nan"), time.perf_counter()
    progress = tqdm(
        total=config.steps,
        initial=start_step,
        desc=f"training {name}",
        disable=not accelerator.is_main_process,
    )
    while step < config.steps:
        window_loss = 0.0
        for _ in range(config.grad_accum):
            instance, prior = next(batches)
            with accelerator.accumulate(*trainables):
                try:
                    loss = diffusion_loss(ctx, instance, prior)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"The loss became {loss.item()} at step {step + 1}. "
                            f"{_last_good(run)}Lower --lr, or use --mixed-precision bf16 "
                            "or no instead of fp16."
                        )
                    accelerator.backward(loss)
                except torch.cuda.OutOfMemoryError as error:
                    raise TrainingError(
                        f"Out of GPU memory at step {step + 1} (batch {config.batch_size}, {resolution} px). "
                        f"{_last_good(run)}Try --gradient-checkpointing, a smaller --batch-size with "
                        "--grad-accum, a lower --resolution, --mixed-precision bf16, or --optimizer adamw8bit."
                    ) from error
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += accelerator.reduce(loss.detach(), "mean").item() / config.grad_accum
        lr_scheduler.step()
        step += 1
        loss_value = window_loss
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}")
        elapsed = time.perf_counter() - started
        per_step = elapsed / (step - start_step)
        events.emit(
            "step",
            step=step,
            total=config.steps,
            loss=loss_value,
            lr=lr_scheduler.get_last_lr()[0],
            elapsed_s=round(elapsed, 4),
            eta_s=round(per_step * (config.steps - step), 1),
            images_per_s=round(config.batch_size * config.grad_accum / per_step, 3),
        )

        cancelled = (cancel is not None and cancel.is_set()) or run.cancel_file.exists()
        if accelerator.num_processes > 1:  # every process must stop at the same step
            flag = torch.tensor(float(cancelled), device=device)
            cancelled = bool(accelerator.reduce(flag, "sum").item() > 0)
        periodic = config.save_every and (step % config.save_every == 0 or step == config.steps)
        if periodic or cancelled:  # a cancelled run always keeps a checkpoint to resume from
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                path = save_checkpoint(
                    run.checkpoints,
                    TrainingState(
                        step=step,
                        lora=lora_state(accelerator, parts),
                        optimizer=optimizer.state_dict(),
                        lr_scheduler=lr_scheduler.state_dict(),
                        rng={"torch": torch.get_rng_state(), "noise": noise_rng.get_state()},
                    ),
                    keep=config.keep_checkpoints,
                )
                events.emit("checkpoint", step=step, path=str(path))
        if (
            sampler
            and accelerator.is_main_process
            and (step % config.sample_every == 0 or step == config.steps)
        ):
            paths = make_samples(sampler, trainables, config, resolution, run.samples, step)
            events.emit("sample", step=step, paths=[str(p) for p in paths])
        if cancelled:
            progress.close()
            events.emit("cancelled", step=step)
            return TrainResult(adapter_path, run.path, step, loss_value, time.perf_counter() - started, True)
    progress.close()

    # 9. The adapter file, with the facts a user will want to see later.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        facts = AdapterFacts(
            name=name,
            base_model=base,
            family=family_of(pipe).name,
            rank=config.rank,
            alpha=config.lora_alpha,
            targets=config.targets,
            instance_prompt=config.prompt or "",
            class_prompt=config.class_prompt or "",
            trigger_words=trigger_words(config.prompt or "", config.class_prompt),
            steps=step,
            resolution=resolution,
            learning_rate=config.lr,
            image_count=len(examples),
            text_encoder=config.text_encoder,
            seed=config.seed,
            tag_frequency=json.dumps(tag_frequency(items)),
        )
        weights = {
            part: (get_peft_model_state_dict(accelerator.unwrap_model(model)), config.lora_alpha)
            for part, model in parts.items()
        }
        write_lora(lora_from_peft(weights, facts.to_metadata()), adapter_path, config.adapter_format)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    events.emit(
        "done",
        step=step,
        adapter=str(adapter_path),
        loss=loss_value,
        elapsed_s=round(elapsed, 3),
        peak_gpu_memory_mib=peak,
    )
    return TrainResult(adapter_path, run.path, step, loss_value, elapsed)


def _last_good(run: RunFolder) -> str:
    latest = run.latest_checkpoint()
    return f"The last good checkpoint is {latest} (continue with --resume). " if latest else ""


def tag_frequency(items: list[Item]) -> dict[str, int]:
    """How many training images carry each comma-separated caption tag (kohya's ss_tag_frequency)."""
    return dict(Counter(tag.strip() for item in items for tag in set(item.caption.split(",")) if tag.strip()))


def adapter_file(config: TrainConfig) -> Path:
    """Where the finished adapter goes: --out, else OUTPUTS/adapters/NAME.safetensors."""
    return (
        Path(config.out)
        if config.out
        else Path(config.outputs) / "adapters" / f"{adapter_name(config)}.safetensors"
    )


def adapter_name(config: TrainConfig) -> str:
    if config.name:
        return safe_name(config.name)
    if config.out:
        return safe_name(Path(config.out).stem)
    return safe_name(Path(config.data_dir).resolve().name)


def tune_for_speed(config: TrainConfig, unet: torch.nn.Module, device: torch.device) -> dict[str, str | bool]:
    """Switch on what makes a U-Net step fast on this device; returns what was chosen, for the event log.

    Attention already goes through PyTorch's fused scaled_dot_product_attention (diffusers' default
    processor), which picks flash or memory-efficient kernels on a GPU; it is reported, not changed.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    attention = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return {
        "attention": ",".join(attention),
        "tf32": config.tf32 and device.type == "cuda",
        "channels_last": config.channels_last,
        "compiled": False,
    }


def compile_unet(
    ctx: LossContext, batch: tuple[list[Example], list[Example]], params: list[torch.nn.Parameter]
) -> tuple[torch.nn.Module, float]:
    """torch.compile the U-Net; returns it with how far one step's LoRA gradients are from the eager ones.

    Compilers can be silently wrong (inductor on the CPU, torch 2.13, zeroed the mid-block LoRA
    gradients of a small U-Net), and a wrong gradient wastes a whole run: one extra step at the start
    is the cheap way to know. Static shapes: one graph per bucket size. The module in `ctx` is left
    as it was, so parameter names (checkpoints, adapters) never see the compiler's wrapper.
    """
    eager, compiled = ctx.unet, torch.compile(ctx.unet, dynamic=False)
    noise_state, grads = ctx.rng.get_state(), []
    for unet in (eager, compiled):
        ctx.rng.set_state(noise_state)  # the same noise and timesteps for both
        diffusion_loss(replace(ctx, unet=unet), *batch).backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        for p in params:
            p.grad = None
    ctx.rng.set_state(noise_state)
    error = max(
        ((c - e).norm() / torch.maximum(e.norm(), c.norm()).clamp_min(1e-30)).item()
        for e, c in zip(*grads, strict=True)
    )
    return compiled, error


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


def lora_config(config: TrainConfig, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )


def unet_target_modules(unet: torch.nn.Module, targets: str) -> list[str]:
    """Module names for LoRA: every attention projection, or only the cross-attention (`attn2`) ones."""
    if targets == "all":
        return list(family_of(unet).unet_targets)
    return sorted(
        name
        for name, _ in unet.named_modules()
        if name.rpartition("attn2.")[2] in family_of(unet).unet_targets and ".attn2." in name
    )


@torch.no_grad()
def encode_images(vae, items: list[Item], buckets: list[Bucket], flip: bool, device) -> list[Example]:
    """Each image fitted to its bucket and encoded once; the mirror image too when flips are on."""
    examples = []
    for item in tqdm(items, desc="caching latents", leave=False, disable=len(items) < 8):
        image = load_image(item.path)
        bucket = assign_bucket(image.width, image.height, buckets)
        pixels = _to_tensor(fit_to_bucket(image, bucket)).to(device)
        batch = torch.stack([pixels, pixels.flip(-1)]) if flip else pixels[None]
        dist = vae.encode(batch).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        size = SizeInfo((image.height, image.width), bucket_fit(image.size, bucket)[1], bucket)
        examples.append(
            Example(mean[0], std[0], (mean[1], std[1]) if flip else None, size, item.caption, item.repeats)
        )
    return examples


def _to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def training_batches(examples: list[Example], class_examples: list[Example], batch_size: int, seed: int):
    """Endless (instance examples, class examples) pairs: one bucket per batch, one class image per instance."""
    instance_order = bucket_batches(
        [e.bucket for e in examples], [e.repeats for e in examples], batch_size, seed
    )
    class_order = (
        bucket_batches([e.bucket for e in class_examples], [1] * len(class_examples), 1, seed + 1)
        if class_examples
        else None
    )
    for indices in instance_order:
        instance = [examples[i] for i in indices]
        prior = [class_examples[next(class_order)[0]] for _ in indices] if class_order else []
        yield instance, prior


@dataclass
class LossContext:
    """What the loss needs besides the batch: the trained parts, the frozen encoders' caches, the noise RNG."""

    config: TrainConfig
    unet: torch.nn.Module
    conditioner: TextConditioner
    text_encoders: dict[str, torch.nn.Module]  # the ones being trained (wrapped by accelerate)
    scheduler: DDPMScheduler
    cached_text: dict[str, Conditioning] | None
    rng: torch.Generator
    device: torch.device
    weight_dtype: torch.dtype
    vae_scale: float
    rank: int = 0  # this process among `world` data-parallel processes
    world: int = 1


def diffusion_loss(ctx: LossContext, instance: list[Example], prior: list[Example]) -> torch.Tensor:
    """The denoising loss of the instance examples plus the prior-weighted loss of the class examples.

    With several processes, `instance` and `prior` are the global batch: every process draws the same
    noise for all of it and trains on every `world`-th example, so N processes at batch B see exactly
    what one process at batch N·B sees (DDP then averages their gradients).
    """
    mine = [i for i in range(len(instance)) if i % ctx.world == ctx.rank]
    mine_prior = [i for i in range(len(prior)) if i % ctx.world == ctx.rank]
    if prior and prior[0].mean.shape == instance[0].mean.shape:  # one forward pass when the shapes allow it
        per_example = _per_example_loss(ctx, instance + prior, mine + [len(instance) + i for i in mine_prior])
    else:
        per_example = torch.cat(
            [
                _per_example_loss(ctx, group, keep)
                for group, keep in ((instance, mine), (prior, mine_prior))
                if group
            ]
        )
    instance_loss = per_example[: len(mine)].mean()
    if not prior:
        return instance_loss
    prior_weight = 1.0 if ctx.config.prior_weight is None else ctx.config.prior_weight
    return instance_loss + prior_weight * per_example[len(mine) :].mean()


def _per_example_loss(ctx: LossContext, group: list[Example], keep: list[int]) -> torch.Tensor:
    """Noise is drawn for the whole group (the same on every process); the U-Net runs on `keep` only."""
    config, scheduler, rng, device = ctx.config, ctx.scheduler, ctx.rng, ctx.device
    latents = torch.stack([_sample_latent(e, config.flip, rng, device) for e in group]) * ctx.vae_scale
    noise = torch.randn(latents.shape, generator=rng, device=device)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=rng, device=device
        )
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=rng, device=device
    )
    index = torch.tensor(keep, dtype=torch.long, device=device)
    latents, noise, timesteps = latents[index], noise[index], timesteps[index]
    group = [group[i] for i in keep]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    captions = [e.caption for e in group]
    if ctx.cached_text is not None:
        conditioning = Conditioning.stack([ctx.cached_text[c] for c in captions])
    else:
        conditioning = ctx.conditioner.encode(captions, device, ctx.text_encoders)
    unet_inputs = ctx.conditioner.unet_kwargs(conditioning, [e.size for e in group], ctx.weight_dtype)
    noisy = noisy.to(
        ctx.weight_dtype,
        memory_format=torch.channels_last if ctx.config.channels_last else torch.contiguous_format,
    )
    prediction = ctx.unet(noisy, timesteps, **unet_inputs).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if config.snr_gamma:
        # Min-SNR-gamma (Hang et al. 2023); for v-prediction the weight is relative to snr + 1.
        snr = compute_snr(scheduler, timesteps)
        loss = loss * torch.clamp(snr, max=config.snr_gamma) / (snr + 1 if v_prediction else snr)
    return loss


def _sample_latent(example: Example, flip: bool, rng: torch.Generator, device) -> torch.Tensor:
    mean, std = example.mean, example.std
    if flip and example.flipped is not None and torch.rand((), generator=rng, device=device) < 0.5:
        mean, std = example.flipped
    mean, std = mean.to(device), std.to(device)
    return mean + std * torch.randn(mean.shape, generator=rng, device=device)


def make_optimizer(config: TrainConfig, groups: list[dict], device) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        if torch.device(device).type != "cuda":
            raise TrainingError("--optimizer adamw8bit needs a CUDA GPU; use --optimizer adamw on the CPU.")
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise TrainingError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'sdlora[cuda]'."
            ) from error
        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    # The fused kernel updates every LoRA tensor in one pass (CPU and CUDA); the default loops over
    # them one by one on the CPU, which costs more than the update itself for small LoRAs.
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)


def lora_state(accelerator: Accelerator, parts: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The LoRA weights of every trained part, keyed 'unet.…' / 'text_encoder.…' (peft names)."""
    state = {}
    for prefix, model in parts.items():
        for key, value in get_peft_model_state_dict(accelerator.unwrap_model(model)).items():
            state[f"{prefix}.{key}"] = value
    return state


def restore_lora(
    accelerator: Accelerator, parts: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]
) -> None:
    for prefix, model in parts.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        result = set_peft_model_state_dict(accelerator.unwrap_model(model), part)
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"Checkpoint does not match the {prefix} LoRA: {result.unexpected_keys[:3]}")


def make_samples(
    sampler: Generator, trainables, config: TrainConfig, resolution: int, folder: Path, step: int
) -> list[Path]:
    """Images for the sample prompts with the adapter as it is now; the same seed every time."""
    for model in trainables:
        model.eval()
    paths = []
    for index, prompt in enumerate(config.sample_prompt):
        params = GenerationParams(
            prompt,
            seed=config.seed,
            steps=SAMPLE_STEPS,
            guidance=SAMPLE_GUIDANCE,
            width=resolution,
            height=resolution,
        )
        paths.append(save_png(sampler.generate(params), folder / f"step-{step:06d}-{index}.png"))
    for model in trainables:
        model.train()
    return paths
