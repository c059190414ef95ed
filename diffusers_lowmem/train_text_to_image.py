"""Fine-tune Stable Diffusion with LyCORIS adapters on a (optionally) quantized frozen base.

A drop-in replacement for diffusers' `examples/text_to_image/train_text_to_image_lora.py`: every upstream flag
works the same, plus `--adapter {lora,loha,lokr,locon}`, `--quant {8bit,nf4}` and memory options. Run it as

    accelerate launch -m diffusers_lowmem.train_text_to_image --pretrained_model_name_or_path PATH \\
        --train_data_dir DATA --adapter lokr --quant nf4 --output_dir OUT

The recipe reads top to bottom like the upstream script; each step is a call into a component.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from diffusers_lowmem import adapters, data, memory, quantization, training
from diffusers_lowmem import args as arg_groups

logger = get_logger(__name__, log_level="INFO")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line; every error is raised here, before any model is loaded."""
    parser = arg_groups.text_to_image_parser()
    args = parser.parse_args(argv)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    arg_groups.validate_text_to_image_args(args, parser)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Steps of the recipe
# ----------------------------------------------------------------------------------------------------------------


def setup_accelerator(args) -> Accelerator:
    logging_dir = Path(args.output_dir, args.logging_dir)
    project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=project_config,
    )
    training.configure_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    return accelerator


def load_tokenizer(args):
    """The CLIP tokenizer (files only: cheap, so the data can be checked before any model is loaded)."""
    if args.pretrained_model_name_or_path.startswith(arg_groups.ARCHITECTURE_PREFIX):
        from diffusers_lowmem import architectures

        return architectures.build_tokenizer(args.pretrained_model_name_or_path[len(arg_groups.ARCHITECTURE_PREFIX) :])
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision
    )


def load_models(args, weight_dtype: torch.dtype):
    """Text encoder, VAE, UNet and noise scheduler, on the CPU in `weight_dtype` (meta for architectures).

    `--pretrained_model_name_or_path architecture:NAME` builds a real architecture (e.g. `sd15`) with random
    weights on the meta device, for memory profiling without a download.
    """
    if args.pretrained_model_name_or_path.startswith(arg_groups.ARCHITECTURE_PREFIX):
        from diffusers_lowmem import architectures

        name = args.pretrained_model_name_or_path[len(arg_groups.ARCHITECTURE_PREFIX) :]
        return (
            architectures.build_on_meta(name, "text_encoder"),
            architectures.build_on_meta(name, "vae"),
            architectures.build_on_meta(name, "unet"),
            architectures.build_scheduler(name),
        )

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(
        path, subfolder="text_encoder", revision=revision, variant=variant, torch_dtype=weight_dtype
    )
    vae = AutoencoderKL.from_pretrained(
        path, subfolder="vae", revision=revision, variant=variant, torch_dtype=weight_dtype
    )
    unet = UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", revision=revision, variant=variant, torch_dtype=weight_dtype
    )
    return text_encoder, vae, unet, noise_scheduler


def place_frozen_model(model, args, weight_dtype, device, skip=(), quant_storage=torch.uint8):
    """Freezes `model` and moves it to `device`: quantized layer by layer with `--quant`, else cast as a whole."""
    model.requires_grad_(False)
    if args.quant:
        return quantization.quantize_model(
            model,
            args.quant,
            compute_dtype=weight_dtype,
            skip=skip,
            device=device,
            compute_errors=False,
            quant_storage=quant_storage,
        )
    quantization.materialize_meta_(model, device, weight_dtype)
    model.to(device, dtype=weight_dtype)
    return None


def attach_adapters(args, unet, text_encoder) -> dict:
    """LyCORIS networks on the UNet (and the text encoder with `--train_text_encoder`), adapter weights in fp32."""
    config = arg_groups.adapter_config_from_args(args)
    networks = {"unet": adapters.attach_adapter(unet, config, role="unet")}
    if args.train_text_encoder:
        networks["text_encoder"] = adapters.attach_adapter(text_encoder, config, role="text_encoder")
    # attach_adapter registers each network as a child of its model (so DDP, autocast and accelerate's hooks see
    # it) and keeps it in fp32 under fp16/bf16 mixed precision.
    return networks


def enable_gradient_checkpointing(args, unet, text_encoder) -> None:
    if not args.gradient_checkpointing:
        return
    unet.enable_gradient_checkpointing()
    if args.train_text_encoder:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_attention_backend(args, unet) -> None:
    """SDPA is diffusers' default; xformers only when asked."""
    if not args.enable_xformers_memory_efficient_attention:
        return
    try:
        import xformers  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers"
        ) from error
    unet.enable_xformers_memory_efficient_attention()


def build_dataset(args, tokenizer, seed: int) -> training.PerSampleSeedDataset:
    """The image-caption dataset with upstream preprocessing; augmentations depend on (seed, epoch, index) only."""
    raw_dataset = data.load_image_caption_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        cache_dir=args.cache_dir,
        image_column=args.image_column,
        caption_column=args.caption_column,
    )
    preprocessor = data.ImagePreprocessor(
        args.resolution, args.center_crop, args.random_flip, interpolation=args.image_interpolation_mode
    )
    train_dataset = data.make_text_to_image_dataset(
        raw_dataset,
        [tokenizer],
        preprocessor,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_train_samples=args.max_train_samples,
        seed=seed,
        strict=args.strict_data,
    )
    return training.PerSampleSeedDataset(train_dataset, seed)


def build_dataloader(args, dataset, seed: int, collate_fn=data.collate_text_to_image):
    """A loader whose order depends only on (seed, epoch)."""
    return torch.utils.data.DataLoader(
        dataset,
        sampler=training.EpochShuffleSampler(len(dataset), seed),
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )


@torch.no_grad()
def encode_latents(vae, pixel_values, weight_dtype):
    latents = vae.encode(pixel_values.to(device=vae.device, dtype=weight_dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


@torch.no_grad()
def cache_latents(dataset, vae, weight_dtype, batch_size: int) -> list[dict]:
    """Encodes every sample once; augmentations are fixed at caching time, as in kohya's scripts."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate_text_to_image)
    cached = []
    for batch in tqdm(loader, desc="Caching latents"):
        latents = encode_latents(vae, batch["pixel_values"], weight_dtype).cpu()
        for index in range(latents.shape[0]):
            cached.append({"latents": latents[index], "input_ids": batch["input_ids"][index]})
    return cached


def compute_loss(args, batch, unet, text_encoder, vae, noise_scheduler, weight_dtype):
    """The upstream objective: predict the noise (or v) added at a random timestep, optionally SNR-weighted."""
    if "latents" in batch:
        latents = batch["latents"].to(unet.device)
    else:
        latents = encode_latents(vae, batch["pixel_values"], weight_dtype)
    noise = torch.randn_like(latents)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    batch_size = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps.long())
    encoder_hidden_states = text_encoder(batch["input_ids"].to(latents.device), return_dict=False)[0]

    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    if args.snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif noise_scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


def log_validation(pipeline, args, accelerator, epoch, phase="validation"):
    """Generates `--num_validation_images` for `--validation_prompt` and logs them to the trackers."""
    logger.info(
        f"Running {phase}... Generating {args.num_validation_images} images with prompt: {args.validation_prompt}."
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu")
    if args.seed is not None:
        generator = generator.manual_seed(args.seed)
    images = []
    with accelerator.autocast():
        for _ in range(args.num_validation_images):
            images.append(
                pipeline(
                    args.validation_prompt,
                    num_inference_steps=30 if args.resolution >= 256 else 4,
                    generator=generator,
                    height=args.resolution,
                    width=args.resolution,
                ).images[0]
            )
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            np_images = np.stack([np.asarray(img) for img in images])
            tracker.writer.add_images(phase, np_images, epoch, dataformats="NHWC")
    return images


def save_adapter_weights(args, networks, output_dir) -> Path:
    config = arg_groups.adapter_config_from_args(args)
    return adapters.save_adapter(
        Path(output_dir) / adapters.DIFFUSERS_WEIGHT_NAME,
        networks,
        config,
        metadata={"base_model": args.pretrained_model_name_or_path, "quant": args.quant or "none"},
    )


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Trains and returns a summary (final loss, steps, output paths)."""
    accelerator = setup_accelerator(args)
    seed = training.resolve_seed(args.seed)
    resume_path = training.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        seed = training.read_training_state(resume_path).get("seed", seed) if args.seed is None else seed

    # Data first: a missing column or an unreadable image fails here, before any model is loaded or file written.
    tokenizer = load_tokenizer(args)
    try:
        train_dataset = build_dataset(args, tokenizer, seed)
    except ValueError as error:
        raise SystemExit(f"Bad training data: {error}") from error
    skipped_images = train_dataset.dataset.skipped_images
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    training.seed_step(seed, -2)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    tracker = memory.MemoryTracker(accelerator.device, accelerator, args.output_dir, log_every=args.memory_log_steps)

    # Load the frozen base: quantized layer by layer on the way to the device with --quant.
    text_encoder, vae, unet, noise_scheduler = load_models(args, weight_dtype)
    frozen = {"skip": args.quant_skip or (), "quant_storage": training.quant_storage_dtype(accelerator, weight_dtype)}
    quant_reports = {
        "unet": place_frozen_model(unet, args, weight_dtype, accelerator.device, **frozen),
        "text_encoder": place_frozen_model(text_encoder, args, weight_dtype, accelerator.device, **frozen),
    }
    vae.requires_grad_(False)
    quantization.materialize_meta_(vae, accelerator.device, weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    tracker.watch(models=[unet, text_encoder, vae])
    tracker.milestone("after_model_load")

    networks = attach_adapters(args, unet, text_encoder)
    enable_gradient_checkpointing(args, unet, text_encoder)
    enable_attention_backend(args, unet)
    tracker.watch(models=[unet, text_encoder, vae])
    tracker.milestone("after_adapter")

    collate_fn = data.collate_text_to_image
    if args.cache_latents:
        train_dataset = cache_latents(train_dataset, vae, weight_dtype, args.train_batch_size)
        collate_fn = torch.utils.data.default_collate
        vae.to("cpu")  # the VAE leaves the device once latents are cached
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    train_dataloader = build_dataloader(args, train_dataset, seed, collate_fn)

    # Optimizer and schedule, as upstream.
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": training.trainable_parameters(networks["unet"]), "lr": args.learning_rate}]
    if "text_encoder" in networks:
        param_groups.append(
            {
                "params": training.trainable_parameters(networks["text_encoder"]),
                "lr": args.text_encoder_lr or args.learning_rate,
            }
        )
    optimizer = training.create_optimizer(
        param_groups,
        args.learning_rate,
        (args.adam_beta1, args.adam_beta2),
        args.adam_weight_decay,
        args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam,
    )
    num_batches = len(train_dataloader)
    updates_per_epoch = training.num_update_steps_per_epoch(num_batches, args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = training.create_lr_scheduler(
        args.lr_scheduler, optimizer, args.lr_warmup_steps, max_train_steps, accelerator.num_processes
    )

    models_to_prepare = [unet] + ([text_encoder] if "text_encoder" in networks else [])
    prepared = accelerator.prepare(*models_to_prepare, optimizer, train_dataloader, lr_scheduler)
    unet = prepared[0]
    if "text_encoder" in networks:
        text_encoder = prepared[1]
    optimizer, train_dataloader, lr_scheduler = prepared[-3:]
    # The prepared loader is sharded across processes: recompute the schedule from its length, as upstream does.
    num_batches = len(train_dataloader)
    updates_per_epoch = training.num_update_steps_per_epoch(num_batches, args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(max_train_steps / updates_per_epoch)
    training.register_adapter_checkpoint_hooks(
        accelerator,
        save_adapter_to=lambda directory: save_adapter_weights(args, networks, directory),
        load_adapter_from=lambda directory: adapters.load_adapter_weights(
            networks, Path(directory) / adapters.DIFFUSERS_WEIGHT_NAME
        ),
    )
    tracker.watch(models=[unet, text_encoder, vae], optimizer=optimizer)

    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-fine-tune", config=training.tracker_config(args))

    # Resume.
    global_step, first_epoch, resume_batch = 0, 0, 0
    if resume_path is not None:
        state = training.load_checkpoint(accelerator, resume_path)
        global_step = state["global_step"]
        first_epoch, updates_into_epoch = divmod(global_step, updates_per_epoch)
        resume_batch = updates_into_epoch * args.gradient_accumulation_steps
        logger.info(f"Resumed from {resume_path} at step {global_step} (epoch {first_epoch}).")

    training.log_run_summary(
        logger,
        num_examples=len(train_dataset),
        num_epochs=num_train_epochs,
        batch_size=args.train_batch_size,
        total_batch_size=args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        accumulation=args.gradient_accumulation_steps,
        max_steps=max_train_steps,
        adapter=args.adapter,
        quantization=args.quant or "none",
        trainable_parameters=f"{sum(p.numel() for group in param_groups for p in group['params']):,}",
    )

    progress_bar = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    trained_modules = [unet] + ([text_encoder] if "text_encoder" in networks else [])
    params_to_clip = [p for group in param_groups for p in group["params"]]
    first_step_of_run = global_step + 1
    loss = torch.tensor(float("nan"))
    step_seconds, step_started = [], time.perf_counter()
    stopped_by = None
    with training.StopSignals() as stop_signals, training.out_of_memory_guard(tracker, args.output_dir, True):
        for epoch in range(first_epoch, num_train_epochs):
            if global_step >= max_train_steps or stopped_by:  # e.g. resumed from the last checkpoint
                break
            for module in trained_modules:
                module.train()
            train_dataloader.set_epoch(epoch)
            if isinstance(train_dataset, training.PerSampleSeedDataset):
                train_dataset.set_epoch(epoch)
            batches = train_dataloader
            if epoch == first_epoch and resume_batch:
                batches = accelerator.skip_first_batches(train_dataloader, resume_batch)
            train_loss = 0.0
            for batch_index, batch in enumerate(batches, start=resume_batch if epoch == first_epoch else 0):
                # Noise, timesteps and dropout of this micro-batch depend on (seed, epoch, batch) only.
                training.seed_step(seed, epoch * num_batches + batch_index)
                with accelerator.accumulate(*trained_modules):
                    loss = compute_loss(args, batch, unet, text_encoder, vae, noise_scheduler, weight_dtype)
                    if not training.loss_is_finite(loss, accelerator):
                        if not args.skip_nonfinite_loss:
                            raise training.nonfinite_loss_error(loss, global_step, args.output_dir)
                        logger.warning(f"Skipping a batch of step {global_step + 1}: the loss is {loss.item()}.")
                        optimizer.zero_grad()
                        continue
                    avg_loss = accelerator.gather(loss.repeat(args.train_batch_size)).mean()
                    train_loss += avg_loss.item() / args.gradient_accumulation_steps
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    if accelerator.sync_gradients and global_step + 1 == first_step_of_run:
                        # Before zero_grad: gradients and the new optimizer state are both held here.
                        tracker.milestone("after_first_step", step=global_step + 1)
                    optimizer.zero_grad()

                if not accelerator.sync_gradients:
                    continue
                progress_bar.update(1)
                global_step += 1
                step_seconds.append(training.elapsed_since(step_started, accelerator.device))
                step_started = time.perf_counter()
                tracker.log_step(global_step)
                accelerator.log({"train_loss": train_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                progress_bar.set_postfix(step_loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
                train_loss = 0.0
                if global_step % args.checkpointing_steps == 0:
                    training.save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        {"seed": seed},
                        args.checkpoints_total_limit,
                        params_to_clip,
                    )
                if stop_signals.requested(accelerator):
                    stopped_by = stop_signals.received or "a stop signal on another process"
                if global_step >= max_train_steps or stopped_by:
                    break

            validation_due = args.validation_prompt and (epoch + 1) % args.validation_epochs == 0 and not stopped_by
            if accelerator.is_main_process and validation_due:
                pipeline = _pipeline_for_validation(args, accelerator, unet, text_encoder, vae, weight_dtype)
                log_validation(pipeline, args, accelerator, epoch)
                del pipeline

    if stopped_by:
        path = training.stop_with_checkpoint(
            accelerator,
            tracker,
            args.output_dir,
            global_step,
            {"seed": seed},
            args.checkpoints_total_limit,
            stopped_by,
            trainable=params_to_clip,
        )
        return {"global_step": global_step, "stopped_by": stopped_by, "checkpoint": path, "weights": None}

    # Save: the adapter in kohya/LyCORIS format, and the memory report.
    accelerator.wait_for_everyone()
    training.verify_identical_across_processes(accelerator, params_to_clip)
    training.check_finite_weights(params_to_clip, global_step, args.output_dir)
    weights_path = None
    if accelerator.is_main_process:
        weights_path = save_adapter_weights(args, networks, args.output_dir)
        tracker.write_report(args.output_dir)
        training.write_json(
            Path(args.output_dir) / training.TRAINING_SUMMARY_NAME,
            {
                "global_step": global_step,
                "final_loss": float(loss.detach().item()),
                "step_seconds": step_seconds,
                "quantization": _quant_summary(quant_reports),
                "skipped_images": skipped_images,
            },
        )
        if skipped_images:
            logger.warning(f"Trained without {skipped_images} unreadable image(s): see the warning at the start.")
        logger.info(f"Saved adapter weights to {weights_path}")
        logger.info("Memory:\n" + tracker.summary_table())
        if args.validation_prompt and not args.pretrained_model_name_or_path.startswith(
            arg_groups.ARCHITECTURE_PREFIX
        ):
            run_final_test(args, accelerator, weight_dtype)
    accelerator.end_training()
    return {"global_step": global_step, "loss": float(loss.detach().item()), "weights": weights_path}


def measure_frozen_base(args: argparse.Namespace) -> dict:
    """The "quantization only" row of the memory study: load and quantize the frozen base, run one forward pass
    at the training resolution, and write the memory report, with no adapter and no optimizer."""
    accelerator = setup_accelerator(args)
    os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    tracker = memory.MemoryTracker(accelerator.device, accelerator, args.output_dir, log_every=1)
    tokenizer = load_tokenizer(args)
    text_encoder, vae, unet, noise_scheduler = load_models(args, weight_dtype)
    for model in (unet, text_encoder):
        place_frozen_model(model, args, weight_dtype, accelerator.device, skip=args.quant_skip or ())
    vae.requires_grad_(False)
    quantization.materialize_meta_(vae, accelerator.device, weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    tracker.watch(models=[unet, text_encoder, vae])
    tracker.milestone("after_model_load")
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    latents = torch.randn(
        args.train_batch_size, unet.config.in_channels, latent_size, latent_size, device=accelerator.device
    )
    input_ids = torch.zeros(args.train_batch_size, tokenizer.model_max_length, dtype=torch.long)
    with torch.no_grad(), accelerator.autocast():
        encoder_hidden_states = text_encoder(input_ids.to(accelerator.device), return_dict=False)[0]
        timesteps = torch.full((args.train_batch_size,), 500, device=accelerator.device)
        unet(latents.to(weight_dtype), timesteps, encoder_hidden_states, return_dict=False)
    tracker.milestone("after_first_step", step=1)
    tracker.log_step(1)
    if accelerator.is_main_process:
        tracker.write_report(args.output_dir)
    accelerator.end_training()
    return tracker.report()


def run_final_test(args, accelerator, weight_dtype) -> None:
    """Reloads the saved adapter from disk into a fresh pipeline and logs test images, as upstream does."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=weight_dtype
    ).to(accelerator.device)
    adapters.load_adapter(pipeline, args.output_dir)
    log_validation(pipeline, args, accelerator, epoch=args.num_train_epochs, phase="test")


def _pipeline_for_validation(args, accelerator, unet, text_encoder, vae, weight_dtype):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=accelerator.unwrap_model(unet),
        text_encoder=accelerator.unwrap_model(text_encoder),
        vae=vae.to(accelerator.device),
        revision=args.revision,
        variant=args.variant,
        torch_dtype=weight_dtype,
        safety_checker=None,
    )


def _quant_summary(reports) -> dict:
    return {role: report.to_dict() for role, report in reports.items() if report is not None}


def cli() -> None:
    main(parse_args(sys.argv[1:]))


if __name__ == "__main__":
    cli()
