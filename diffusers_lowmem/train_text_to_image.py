"""Fine-tune Stable Diffusion (1.x, 2.x or XL) with LyCORIS adapters on a (optionally) quantized frozen base.

A drop-in replacement for diffusers' `examples/text_to_image/train_text_to_image_lora.py` and
`train_text_to_image_lora_sdxl.py`: every upstream flag works the same, plus `--adapter {lora,loha,lokr,locon}`,
`--quant {8bit,nf4}` and memory options. A Stable Diffusion XL pipeline (its `model_index.json`, or an `sdxl`
architecture) is detected and trained with SDXL's two text encoders and size conditioning. Run it as

    accelerate launch -m diffusers_lowmem.train_text_to_image --pretrained_model_name_or_path PATH \\
        --train_data_dir DATA --adapter lokr --quant nf4 --output_dir OUT

The recipe reads top to bottom like the upstream script; each step is a call into a component.
"""

from __future__ import annotations

import argparse
import copy
import functools
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

from diffusers_lowmem import (
    activation_offload,
    adapters,
    allocator,
    data,
    estimate,
    evaluation,
    memory,
    quantization,
    training,
)
from diffusers_lowmem import args as arg_groups

logger = get_logger(__name__, log_level="INFO")

FINAL_IMAGES_NAME = "final_images.png"  # the test images of --validation_prompt from the saved adapter, side by side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line; every error is raised here, before any model is loaded.

    The defaults are those of the upstream script for the model: `--resolution 1024` for Stable Diffusion XL.
    """
    parser = arg_groups.text_to_image_parser(sdxl=is_sdxl(_peek_model_reference(argv)))
    args = parser.parse_args(argv)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank
    arg_groups.validate_text_to_image_args(args, parser)
    return args


def _peek_model_reference(argv: list[str] | None) -> argparse.Namespace:
    """`--pretrained_model_name_or_path` and `--revision` alone, to choose the parser's defaults."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--pretrained_model_name_or_path", default=None)
    peek.add_argument("--revision", default=None)
    return peek.parse_known_args(argv)[0]


def is_sdxl(args) -> bool:
    """Whether `args.pretrained_model_name_or_path` is a Stable Diffusion XL pipeline (see `is_sdxl_pipeline`)."""
    if args.pretrained_model_name_or_path is None:
        return False
    return arg_groups.is_sdxl_pipeline(args.pretrained_model_name_or_path, args.revision)


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


def text_encoder_roles(sdxl: bool) -> tuple[str, ...]:
    """The pipeline attributes (and adapter roles) of the text encoders: SDXL has a second one."""
    return ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)


def _architecture_name(args) -> str | None:
    """NAME of `--pretrained_model_name_or_path architecture:NAME`, else None."""
    reference = args.pretrained_model_name_or_path
    if not reference.startswith(arg_groups.ARCHITECTURE_PREFIX):
        return None
    return reference.removeprefix(arg_groups.ARCHITECTURE_PREFIX)


def load_tokenizers(args, sdxl: bool) -> list:
    """The CLIP tokenizer(s), one per text encoder (files only: cheap, so the data can be checked before any model
    is loaded)."""
    subfolders = [role.replace("text_encoder", "tokenizer") for role in text_encoder_roles(sdxl)]
    name = _architecture_name(args)
    if name is not None:
        from diffusers_lowmem import architectures

        return [architectures.build_tokenizer(name, subfolder) for subfolder in subfolders]
    from transformers import CLIPTokenizer

    return [
        CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder=subfolder, revision=args.revision)
        for subfolder in subfolders
    ]


def load_model_configs(args, sdxl: bool) -> tuple[dict, dict]:
    """`({role: text encoder config}, VAE config)`: the `config.json` files alone (no weights), whose limits
    (positions, vocabulary, VAE scale factor) the data is checked against before any model is loaded."""
    roles = text_encoder_roles(sdxl)
    name = _architecture_name(args)
    if name is not None:
        from diffusers_lowmem import architectures

        return {role: architectures.load_config(name, role) for role in roles}, architectures.load_config(name, "vae")
    from diffusers import AutoencoderKL
    from transformers import AutoConfig

    path, revision = args.pretrained_model_name_or_path, args.revision
    text_encoders = {role: AutoConfig.from_pretrained(path, subfolder=role, revision=revision) for role in roles}
    vae_path = args.pretrained_vae_model_name_or_path
    vae_config = AutoencoderKL.load_config(vae_path or path, subfolder=None if vae_path else "vae", revision=revision)
    return text_encoders, vae_config


def load_models(args, weight_dtype: torch.dtype, sdxl: bool = False, with_weights: bool = True):
    """Text encoders (`{role: model}`), VAE, UNet and noise scheduler, on the CPU in `weight_dtype` (meta for
    architectures).

    `--pretrained_model_name_or_path architecture:NAME` builds a real architecture (e.g. `sd15`) with random
    weights on the meta device, for memory profiling without a download. As upstream, the SDXL VAE stays in float32
    unless `--pretrained_vae_model_name_or_path` gives one (SDXL's own VAE overflows in float16). Without
    `with_weights` (the memory estimate) any pipeline is built that way, from its components' configs alone.
    """
    roles = text_encoder_roles(sdxl)
    name = _architecture_name(args)
    if name is not None:
        from diffusers_lowmem import architectures

        text_encoders = {role: architectures.build_on_meta(name, role) for role in roles}
        vae = architectures.build_on_meta(name, "vae")
        return text_encoders, vae, architectures.build_on_meta(name, "unet"), architectures.build_scheduler(name)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    # SDXL's second encoder is the one with the projection that gives the pooled embedding.
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    if not with_weights:
        text_encoders, vae, unet = _models_from_configs(args, roles, classes, AutoencoderKL, UNet2DConditionModel)
        return text_encoders, vae, unet, noise_scheduler
    text_encoders = {
        role: classes[role].from_pretrained(
            path, subfolder=role, revision=revision, variant=variant, torch_dtype=weight_dtype
        )
        for role in roles
    }
    vae_path = args.pretrained_vae_model_name_or_path
    vae = AutoencoderKL.from_pretrained(
        vae_path or path,
        subfolder=None if vae_path else "vae",
        revision=revision,
        variant=variant,
        torch_dtype=vae_dtype(args, weight_dtype, sdxl),
    )
    unet = UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", revision=revision, variant=variant, torch_dtype=weight_dtype
    )
    return text_encoders, vae, unet, noise_scheduler


def _models_from_configs(args, roles, text_encoder_classes: dict, vae_class, unet_class):
    """Text encoders, VAE and UNet built on the meta device from their config files (no weight file is read)."""
    from accelerate import init_empty_weights

    from diffusers_lowmem import architectures

    path, revision = args.pretrained_model_name_or_path, args.revision
    vae_path = args.pretrained_vae_model_name_or_path
    with init_empty_weights():
        text_encoders = {}
        for role in roles:
            model_class = text_encoder_classes[role]
            config = model_class.config_class.from_pretrained(path, subfolder=role, revision=revision)
            text_encoders[role] = architectures.tie_weights_(model_class(config))
        vae = vae_class.from_config(
            vae_class.load_config(vae_path or path, subfolder=None if vae_path else "vae", revision=revision)
        )
        unet = unet_class.from_config(unet_class.load_config(path, subfolder="unet", revision=revision))
    return text_encoders, vae, unet


def vae_dtype(args, weight_dtype: torch.dtype, sdxl: bool) -> torch.dtype:
    """float32 for SDXL's own VAE (it overflows in float16), as upstream; else the training dtype."""
    return torch.float32 if sdxl and args.pretrained_vae_model_name_or_path is None else weight_dtype


def place_frozen_model(model, args, weight_dtype, device, role: str, quant_storage=torch.uint8):
    """Freezes `model` and moves it to `device`: with `--quant`, its linear layers and convolutions quantized layer
    by layer (the UNet's `conv_in` and `conv_out` stay in full precision unless `--quant_skip` says otherwise), else
    cast as a whole."""
    model.requires_grad_(False)
    if args.quant:
        default_skip = quantization.DEFAULT_SKIP_UNET if role == "unet" else ()
        return quantization.quantize_model(
            model,
            args.quant,
            compute_dtype=weight_dtype,
            skip=default_skip if args.quant_skip is None else args.quant_skip,
            device=device,
            compute_errors=bool(args.validation_loss_steps),  # the per-layer weight error, beside the held-out loss
            quant_storage=quant_storage,
            convolutions=True,
        )
    quantization.materialize_meta_(model, device, weight_dtype)
    estimate.module_to_(model, device, weight_dtype)
    return None


class TrainingSetEncodings:
    """`--cache_latents` and `--cache_text_encoder_outputs` over the training set (and the held-out batches): the
    encoders `place_frozen_base` hands over, used here once per image and caption.

    Attributes:
        dataset: The training set, with cached latents / text-encoder outputs once encoded.
    """

    def __init__(self, args, dataset, eval_set, weight_dtype: torch.dtype, sdxl: bool):
        self.dataset, self.eval_set = dataset, eval_set
        self.batch_size, self.weight_dtype, self.sdxl = args.train_batch_size, weight_dtype, sdxl

    def cache_latents(self, vae) -> None:
        self.dataset = cache_latents(self.dataset, vae, self.weight_dtype, self.batch_size)

    def cache_text_encoder_outputs(self, text_encoders: dict) -> None:
        if self.eval_set is not None:
            cache_eval_text_encoder_outputs(self.eval_set, text_encoders, self.sdxl)
        self.dataset = cache_text_encoder_outputs(self.dataset, text_encoders, self.sdxl, self.batch_size)


def place_frozen_base(
    args, unet, text_encoders: dict, vae, weight_dtype, device, encodings, counter=None, quant_storage=torch.uint8
) -> tuple[dict, list]:
    """Places the frozen text encoders and UNet on `device` (quantized layer by layer with `--quant`), running the
    cached encoders while they are alone: with `--cache_latents` the VAE (already placed) encodes every image and
    leaves before any other model arrives; the text encoders come next and, with `--cache_text_encoder_outputs`,
    encode every caption and leave; the UNet comes last. So the VAE encode's activations (2.5 GiB for SDXL's fp32
    VAE at 1024 px) never sit on top of the UNet's weights.

    Args:
        encodings: `cache_latents(vae)` and `cache_text_encoder_outputs(text_encoders)`, called when the flags ask:
            a `TrainingSetEncodings` in a run, one batch in the memory estimate.
        counter: The live-tensor counter where the counted device is the CPU (its phases are set here), or None.

    Returns:
        `(quant_reports, cached_away)`: each role's quantization report (None unquantized), and the models moved
        off the device because their outputs are cached.
    """

    def enter(phase):
        if counter is not None:
            counter.phase = phase

    cached_away = []
    if args.cache_latents:
        enter("VAE encode")
        encodings.cache_latents(vae)
        cached_away.append(vae)
        move_off_device(vae, counter=counter)
    enter("quantize" if args.quant else "load")
    quant_reports = {
        role: place_frozen_model(model, args, weight_dtype, device, role, quant_storage)
        for role, model in text_encoders.items()
    }
    if args.cache_text_encoder_outputs:
        enter("text encode")
        encodings.cache_text_encoder_outputs(text_encoders)
        cached_away.extend(text_encoders.values())
        move_off_device(*text_encoders.values(), counter=counter)
    enter("quantize" if args.quant else "load")
    quant_reports["unet"] = place_frozen_model(unet, args, weight_dtype, device, "unet", quant_storage)
    return quant_reports, cached_away


def place_vae(vae, args, weight_dtype, device, sdxl: bool) -> None:
    """Freezes the VAE and moves it to `device` (never quantized: it runs once per image)."""
    vae.requires_grad_(False)
    dtype = vae_dtype(args, weight_dtype, sdxl)
    quantization.materialize_meta_(vae, device, dtype)
    estimate.module_to_(vae, device, dtype)


def attach_adapters(args, unet, text_encoders: dict, sdxl: bool = False) -> dict:
    """LyCORIS networks on the UNet (and every text encoder with `--train_text_encoder`), adapter weights in fp32.

    Keys are kohya's: `lora_unet_`, and `lora_te_` for SD 1.x/2.x or `lora_te1_`/`lora_te2_` for SDXL.
    """
    config = arg_groups.adapter_config_from_args(args)
    try:
        networks = {"unet": adapters.attach_adapter(unet, config, role="unet", sdxl=sdxl)}
        if args.train_text_encoder:
            for role, text_encoder in text_encoders.items():
                networks[role] = adapters.attach_adapter(text_encoder, config, role=role, sdxl=sdxl)
    except ValueError as error:  # --target_modules that match no layer of a model: the message says what to pass
        raise SystemExit(f"Bad adapter targets: {error}") from error
    # attach_adapter registers each network as a child of its model (so DDP, autocast and accelerate's hooks see
    # it) and keeps it in fp32 under fp16/bf16 mixed precision.
    return networks


def enable_gradient_checkpointing(args, unet, text_encoders: dict) -> None:
    if not args.gradient_checkpointing:
        return
    unet.enable_gradient_checkpointing()
    if args.train_text_encoder:
        for text_encoder in text_encoders.values():
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def enable_attention_backend(args, unet) -> None:
    """SDPA is diffusers' default; xformers or NPU flash attention only when asked."""
    if args.enable_npu_flash_attention:
        unet.enable_npu_flash_attention()
    if not args.enable_xformers_memory_efficient_attention:
        return
    try:
        import xformers  # noqa: F401
    except ImportError as error:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers"
        ) from error
    unet.enable_xformers_memory_efficient_attention()


def build_datasets(args, tokenizers: list, seed: int):
    """The training dataset with upstream preprocessing, and the held-out one of `--validation_loss_steps` (or None).

    Augmentations of the training set depend on (seed, epoch, index) only. The held-out images are split off by a
    fixed permutation before `--max_train_samples` applies, center-cropped, never flipped, and their caption choice
    is fixed: the same held-out problem in every run.
    """
    raw_dataset = data.load_image_caption_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        cache_dir=args.cache_dir,
        image_column=args.image_column,
        caption_column=args.caption_column,
    )
    held_out_dataset = None
    if args.validation_loss_steps:
        train_rows, held_out_rows = evaluation.held_out_split(len(raw_dataset), args.validation_split)
        held_out_raw, raw_dataset = raw_dataset.select(held_out_rows), raw_dataset.select(train_rows)
        fixed_preprocessor = data.ImagePreprocessor(
            args.resolution, center_crop=True, random_flip=False, interpolation=args.image_interpolation_mode
        )
        held_out_dataset = training.PerSampleSeedDataset(
            _text_to_image_dataset(args, held_out_raw, tokenizers, fixed_preprocessor), evaluation.EVAL_SEED
        )
    preprocessor = data.ImagePreprocessor(
        args.resolution, args.center_crop, args.random_flip, interpolation=args.image_interpolation_mode
    )
    train_dataset = _text_to_image_dataset(args, raw_dataset, tokenizers, preprocessor, args.max_train_samples, seed)
    return training.PerSampleSeedDataset(train_dataset, seed), held_out_dataset


def _text_to_image_dataset(args, raw_dataset, tokenizers, preprocessor, max_train_samples=None, seed=None):
    return data.make_text_to_image_dataset(
        raw_dataset,
        tokenizers,
        preprocessor,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_train_samples=max_train_samples,
        seed=seed,
        strict=args.strict_data,
    )


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
def encode_latents(vae, pixel_values, weight_dtype, sample: bool = True):
    """Scaled VAE latents: a draw from the posterior as upstream, or its mode (`sample=False`, deterministic)."""
    latent_dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = latent_dist.sample() if sample else latent_dist.mode()
    return (latents * vae.config.scaling_factor).to(weight_dtype)


def encode_prompt(batch, text_encoders: dict, sdxl: bool):
    """The UNet's text conditioning: `(prompt_embeds, pooled_prompt_embeds)`, the latter None for SD 1.x/2.x.

    SD 1.x/2.x: the last hidden states of the text encoder. SDXL, as upstream's `encode_prompt`: the penultimate
    hidden states of both encoders concatenated, and the pooled (projected) output of the second. Outputs cached by
    `cache_text_encoder_outputs` are taken from the batch.
    """
    if "prompt_embeds" in batch:
        return batch["prompt_embeds"], batch.get("pooled_prompt_embeds")
    if not sdxl:
        text_encoder = text_encoders["text_encoder"]
        return text_encoder(batch["input_ids"].to(text_encoder.device), return_dict=False)[0], None
    prompt_embeds = []
    for position, text_encoder in enumerate(text_encoders.values()):
        input_ids = batch["input_ids" if position == 0 else f"input_ids_{position + 1}"]
        outputs = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True, return_dict=False)
        pooled_prompt_embeds = outputs[0]  # only the last encoder's is used
        prompt_embeds.append(outputs[-1][-2])
    return torch.cat(prompt_embeds, dim=-1), pooled_prompt_embeds


def compute_time_ids(args, batch, device, weight_dtype) -> torch.Tensor:
    """SDXL's size conditioning, as upstream: original size, crop top-left and target size per image, (N, 6)."""
    original_sizes, crop_top_lefts = batch["original_sizes"], batch["crop_top_lefts"]
    target_sizes = torch.full_like(original_sizes, args.resolution)
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).to(device, dtype=weight_dtype)


def unet_conditioning(args, batch, text_encoders: dict, sdxl: bool, device, weight_dtype):
    """`(encoder_hidden_states, added_cond_kwargs)` for the UNet; `added_cond_kwargs` (pooled text embeddings and
    time ids) only for SDXL, None otherwise."""
    prompt_embeds, pooled_prompt_embeds = encode_prompt(batch, text_encoders, sdxl)
    if not sdxl:
        return prompt_embeds.to(device), None
    added_cond_kwargs = {
        "text_embeds": pooled_prompt_embeds.to(device),
        "time_ids": compute_time_ids(args, batch, device, weight_dtype),
    }
    return prompt_embeds.to(device), added_cond_kwargs


def _cache(dataset, batch_size: int, description: str, encode) -> list[dict]:
    """`encode(batch)` -> {key: (N, ...) tensor} over the whole dataset once, split back into one dict per item."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate_text_to_image)
    cached = []
    for batch in tqdm(loader, desc=description):
        encoded = {key: value.cpu() for key, value in encode(batch).items()}
        batch_size = len(next(iter(encoded.values())))
        cached.extend({key: value[index] for key, value in encoded.items()} for index in range(batch_size))
    return cached


@torch.no_grad()
def cache_latents(dataset, vae, weight_dtype, batch_size: int) -> list[dict]:
    """Encodes every sample once; augmentations are fixed at caching time, as in kohya's scripts.

    Returns:
        Items with `latents` in place of `pixel_values`, every other key (token ids, SDXL sizes) kept.
    """

    def encode(batch):
        kept = {key: value for key, value in batch.items() if key != "pixel_values"}
        return {"latents": encode_latents(vae, batch["pixel_values"], weight_dtype), **kept}

    return _cache(dataset, batch_size, "Caching latents", encode)


@torch.no_grad()
def cache_text_encoder_outputs(dataset, text_encoders: dict, sdxl: bool, batch_size: int) -> data.WithCachedEncodings:
    """Encodes every caption once with the frozen text encoders (`--cache_text_encoder_outputs`).

    Returns:
        The dataset with `prompt_embeds` (and SDXL's `pooled_prompt_embeds`) in place of the token ids; images are
        still preprocessed (and augmented) per fetch.
    """

    def encode(batch):
        prompt_embeds, pooled_prompt_embeds = encode_prompt(batch, text_encoders, sdxl)
        encoded = {"prompt_embeds": prompt_embeds}
        if pooled_prompt_embeds is not None:
            encoded["pooled_prompt_embeds"] = pooled_prompt_embeds
        return encoded

    return data.WithCachedEncodings(dataset, _cache(dataset, batch_size, "Caching text-encoder outputs", encode))


def move_off_device(*models, counter: memory.LiveTensorCounter | None = None) -> None:
    """Moves models that are no longer needed on the device (after caching) to the CPU. Where the counted device
    is the CPU itself (`counter`: a CPU run, or the memory estimate), their bytes stop counting as device memory."""
    for model in models:
        estimate.module_to_(model, "cpu")
        if counter is not None:
            counter.forget(list(model.parameters()) + list(model.buffers()))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute_loss(args, batch, unet, text_encoders: dict, vae, noise_scheduler, weight_dtype, sdxl: bool = False):
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
    encoder_hidden_states, added_cond_kwargs = unet_conditioning(
        args, batch, text_encoders, sdxl, latents.device, weight_dtype
    )

    target = evaluation.diffusion_target(noise_scheduler, latents, noise, timesteps)

    model_pred = unet(
        noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
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


def forward_loss(args, batch, unet, text_encoders: dict, vae, noise_scheduler, weight_dtype, sdxl: bool = False):
    """The training forward: `compute_loss`, its saved activations in host memory with `--offload_activations`."""
    with activation_offload.offload_activations(args.offload_activations):
        return compute_loss(args, batch, unet, text_encoders, vae, noise_scheduler, weight_dtype, sdxl)


def backward_and_step(args, accelerator, loss, optimizer, lr_scheduler, params_to_clip) -> torch.Tensor:
    """Backward, then on a sync step gradient clipping (`--max_grad_norm`); the optimizer and schedule step (which
    accelerate applies only on sync steps; `lr_scheduler` None: no schedule, as in the memory estimate).

    Returns:
        The loss detached: keep that, not `loss`. The graph goes now, not at the next forward: bitsandbytes' 8-bit
        matmul keeps its inputs on its autograd node (not as saved tensors, which backward frees), 2.6 MiB of a
        16 MiB peak on the tiny UNet (measured with the live-tensor counter).
    """
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.detach()


def create_optimizer(args, networks: dict, trained_roles: list, device) -> tuple[list[dict], torch.optim.Optimizer]:
    """The `--optimizer` over the adapters' parameters, as upstream: the UNet's at `--learning_rate`, the text
    encoders' at `--text_encoder_lr` (default: the same).

    Returns:
        `(param_groups, optimizer)`.
    """
    param_groups = [{"params": training.trainable_parameters(networks["unet"]), "lr": args.learning_rate}]
    for role in trained_roles:
        param_groups.append(
            {"params": training.trainable_parameters(networks[role]), "lr": args.text_encoder_lr or args.learning_rate}
        )
    optimizer = training.create_optimizer(
        param_groups,
        args.optimizer,
        args.learning_rate,
        args.adam_weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        device=device,
    )
    return param_groups, optimizer


def build_eval_set(args, held_out_dataset, vae, noise_scheduler, weight_dtype) -> evaluation.DiffusionEvalSet:
    """The held-out examples of `--validation_loss_steps`: latents from the VAE posterior's mode, fixed noise."""

    def encode(batch):
        kept = {key: value for key, value in batch.items() if key != "pixel_values"}
        return {"latents": encode_latents(vae, batch["pixel_values"], weight_dtype, sample=False), **kept}

    items = _cache(held_out_dataset, args.train_batch_size, "Encoding held-out images", encode)
    eval_set = evaluation.DiffusionEvalSet.build(
        items, args.train_batch_size, noise_scheduler.config.num_train_timesteps, data.collate_text_to_image
    )
    logger.info(f"Held-out loss: {eval_set.num_examples} images x {len(eval_set.timesteps)} fixed timesteps.")
    return eval_set


@torch.no_grad()
def cache_eval_text_encoder_outputs(eval_set, text_encoders: dict, sdxl: bool) -> None:
    """Adds the frozen text encoders' outputs to the held-out batches before the encoders leave the device."""
    for batch in eval_set.batches:
        prompt_embeds, pooled_prompt_embeds = encode_prompt(batch, text_encoders, sdxl)
        batch["prompt_embeds"] = prompt_embeds.cpu()
        if pooled_prompt_embeds is not None:
            batch["pooled_prompt_embeds"] = pooled_prompt_embeds.cpu()


def held_out_loss(args, eval_set, unet, text_encoders: dict, noise_scheduler, accelerator, weight_dtype, sdxl):
    """The deterministic held-out loss of the models as they are now (adapters included), in eval mode."""
    models = [unet, *text_encoders.values()]
    modes = [model.training for model in models]
    for model in models:
        model.eval()

    def predict(batch, noisy_latents, timesteps):
        device = accelerator.device
        encoder_hidden_states, added_cond_kwargs = unet_conditioning(
            args, batch, text_encoders, sdxl, device, weight_dtype
        )
        return unet(
            noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
        )[0]

    try:
        with accelerator.autocast():
            return evaluation.diffusion_held_out_loss(
                eval_set, predict, noise_scheduler, accelerator.device, weight_dtype
            )
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def record_held_out_loss(history: list, loss: float, step: int, accelerator) -> None:
    """Logs `eval/loss` at `step` and keeps `[step, loss]` for the training summary."""
    history.append([step, loss])
    accelerator.log({"eval/loss": loss}, step=step)
    logger.info(f"Held-out loss at step {step}: {loss:.6f}")


def held_out_summary(eval_set, history: list, quantization_scalars: dict) -> dict | None:
    """The training summary's `held_out_loss`: the set, the loss before and after training, and its history."""
    if eval_set is None:
        return None
    return {
        "examples": eval_set.num_examples,
        "timesteps": eval_set.timesteps.tolist(),
        "before": history[0][1],
        "after": history[-1][1],
        "history": history,
        **evaluation.summary_fields(quantization_scalars),
    }


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
    """Trains and returns a summary (final loss, steps, output paths); with `--estimate_memory`, only estimates
    the run's memory and returns the estimate."""
    allocator.configure_allocator()  # expandable segments unless the user set the allocator: before CUDA starts
    if args.estimate_memory is not None:
        return estimate_memory(args)
    accelerator = setup_accelerator(args)
    seed = training.resolve_seed(args.seed)
    resume_path = training.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        seed = training.read_training_state(resume_path).get("seed", seed) if args.seed is None else seed

    # Data first: a missing column or an unreadable image fails here, before any model is loaded or file written.
    sdxl = is_sdxl(args)
    tokenizers = load_tokenizers(args, sdxl)
    try:
        data.check_text_to_image_limits(args.resolution, tokenizers, *load_model_configs(args, sdxl))
        train_dataset, held_out_dataset = build_datasets(args, tokenizers, seed)
    except ValueError as error:
        raise SystemExit(f"Bad training data: {error}") from error
    skipped_images = sum(d.dataset.skipped_images for d in (train_dataset, held_out_dataset) if d is not None)
    skipped_captions = sum(d.dataset.skipped_captions for d in (train_dataset, held_out_dataset) if d is not None)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    training.seed_step(seed, -2)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    text_encoders, vae, unet, noise_scheduler = load_models(args, weight_dtype, sdxl)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    place_vae(vae, args, weight_dtype, accelerator.device, sdxl)

    # --validation_loss_steps: the held-out set, and the held-out loss the base gives up to quantization.
    eval_set, unquantized_base_loss, quantization_scalars = None, None, {}
    if held_out_dataset is not None:
        eval_set = build_eval_set(args, held_out_dataset, vae, noise_scheduler, weight_dtype)
        if args.quant and _architecture_name(args) is None:  # random architecture weights: nothing to compare
            unquantized_base_loss = evaluation.unquantized_loss(
                [unet, *text_encoders.values()],
                accelerator.device,
                functools.partial(
                    held_out_loss,
                    args,
                    eval_set,
                    unet,
                    text_encoders,
                    noise_scheduler,
                    accelerator,
                    weight_dtype,
                    sdxl,
                ),
            )
    # From here on the tracker's peak covers the run (the unquantized base's visit above is not part of it).
    tracker = memory.MemoryTracker(
        accelerator.device,
        accelerator,
        args.output_dir,
        log_every=args.memory_log_steps,
        count_tensor_steps=estimate.ESTIMATE_STEPS,  # off CUDA: counted tensor bytes over what the estimate replays
    )

    # Place the frozen base (quantized layer by layer with --quant); encoders whose outputs are cached run first and
    # leave before the UNet arrives.
    encodings = TrainingSetEncodings(args, train_dataset, eval_set, weight_dtype, sdxl)
    quant_reports, cached_away = place_frozen_base(
        args,
        unet,
        text_encoders,
        vae,
        weight_dtype,
        accelerator.device,
        encodings,
        counter=tracker.counter,
        quant_storage=training.quant_storage_dtype(accelerator, weight_dtype),
    )
    train_dataset = encodings.dataset
    tracker.watch(models=[unet, *text_encoders.values(), vae])
    tracker.milestone("after_model_load")
    if eval_set is not None and args.quant:
        quantized_base_loss = held_out_loss(
            args, eval_set, unet, text_encoders, noise_scheduler, accelerator, weight_dtype, sdxl
        )
        quantization_scalars = evaluation.quantization_scalars(
            quantized_base_loss, unquantized_base_loss, quant_reports
        )

    training.seed_step(seed, -1)  # the adapters' initialisation: from the seed alone, whatever was cached before
    networks = attach_adapters(args, unet, text_encoders, sdxl)
    enable_gradient_checkpointing(args, unet, text_encoders)
    enable_attention_backend(args, unet)
    tracker.watch(models=[unet, *text_encoders.values(), vae])
    tracker.milestone("after_adapter")

    train_dataloader = build_dataloader(args, train_dataset, seed)

    # Optimizer and schedule, as upstream.
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    trained_roles = [role for role in text_encoders if role in networks]
    param_groups, optimizer = create_optimizer(args, networks, trained_roles, accelerator.device)
    # Steps, epochs, the LR schedule and the resume position: from the loader as each process will iterate it.
    schedule = training.TrainingSchedule.for_dataloader(
        train_dataloader,
        accelerator,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_train_steps=args.max_train_steps,
        num_warmup_steps=args.lr_warmup_steps,
    )
    lr_scheduler = schedule.create_lr_scheduler(args.lr_scheduler, optimizer)

    prepared = accelerator.prepare(
        unet, *(text_encoders[role] for role in trained_roles), optimizer, train_dataloader, lr_scheduler
    )
    unet = prepared[0]
    text_encoders.update(zip(trained_roles, prepared[1 : 1 + len(trained_roles)]))
    optimizer, train_dataloader, lr_scheduler = prepared[-3:]
    schedule.check_prepared(train_dataloader)
    training.register_adapter_checkpoint_hooks(
        accelerator,
        save_adapter_to=lambda directory: save_adapter_weights(args, networks, directory),
        load_adapter_from=lambda directory: adapters.load_adapter_weights(
            networks, Path(directory) / adapters.DIFFUSERS_WEIGHT_NAME
        ),
    )
    tracker.watch(models=[unet, *text_encoders.values(), vae], optimizer=optimizer)

    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-fine-tune", config=training.tracker_config(args))

    # Resume.
    global_step, first_epoch, resume_batch = 0, 0, 0
    if resume_path is not None:
        state = training.load_checkpoint(accelerator, resume_path)
        global_step = state["global_step"]
        first_epoch, resume_batch = schedule.resume_position(global_step)
        logger.info(f"Resumed from {resume_path} at step {global_step} (epoch {first_epoch}).")

    training.log_run_summary(
        logger,
        num_examples=len(train_dataset),
        batch_size=args.train_batch_size,
        schedule=schedule,
        adapter=args.adapter,
        quantization=args.quant or "none",
        trainable_parameters=f"{sum(p.numel() for group in param_groups for p in group['params']):,}",
    )

    # The held-out loss before training (with --quant, next to what quantization alone cost).
    evaluate_held_out, held_out_losses = None, []
    if eval_set is not None:
        evaluate_held_out = functools.partial(
            held_out_loss, args, eval_set, unet, text_encoders, noise_scheduler, accelerator, weight_dtype, sdxl
        )
        accelerator.log(quantization_scalars, step=global_step)
        record_held_out_loss(held_out_losses, evaluate_held_out(), global_step, accelerator)

    progress_bar = tqdm(
        range(schedule.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    trained_modules = [unet, *(text_encoders[role] for role in trained_roles)]
    params_to_clip = [p for group in param_groups for p in group["params"]]
    first_step_of_run = global_step + 1
    loss = torch.tensor(float("nan"))
    step_seconds, step_started = [], time.perf_counter()
    stopped_by = None
    with training.StopSignals() as stop_signals, training.out_of_memory_guard(tracker, args.output_dir, True):
        for epoch in range(first_epoch, schedule.num_train_epochs):
            if global_step >= schedule.max_train_steps or stopped_by:  # e.g. resumed from the last checkpoint
                break
            for module in trained_modules:
                module.train()
            train_dataloader.set_epoch(epoch)
            if hasattr(train_dataset, "set_epoch"):  # not a list of cached latents
                train_dataset.set_epoch(epoch)
            batches = train_dataloader
            if epoch == first_epoch and resume_batch:
                batches = accelerator.skip_first_batches(train_dataloader, resume_batch)
            train_loss = 0.0
            for batch_index, batch in enumerate(batches, start=resume_batch if epoch == first_epoch else 0):
                # Noise, timesteps and dropout of this micro-batch depend on (seed, epoch, batch) only.
                training.seed_step(seed, epoch * schedule.batches_per_epoch + batch_index)
                with accelerator.accumulate(*trained_modules):
                    loss = forward_loss(args, batch, unet, text_encoders, vae, noise_scheduler, weight_dtype, sdxl)
                    if not training.loss_is_finite(loss, accelerator):
                        if not args.skip_nonfinite_loss:
                            raise training.nonfinite_loss_error(loss, global_step, args.output_dir)
                        logger.warning(f"Skipping a batch of step {global_step + 1}: the loss is {loss.item()}.")
                        optimizer.zero_grad()
                        continue
                    avg_loss = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
                    train_loss += avg_loss.item() / args.gradient_accumulation_steps
                    loss = backward_and_step(args, accelerator, loss, optimizer, lr_scheduler, params_to_clip)
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
                if evaluate_held_out and global_step % args.validation_loss_steps == 0:
                    record_held_out_loss(held_out_losses, evaluate_held_out(), global_step, accelerator)
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
                if global_step >= schedule.max_train_steps or stopped_by:
                    break

            validation_due = args.validation_prompt and (epoch + 1) % args.validation_epochs == 0 and not stopped_by
            if accelerator.is_main_process and validation_due:
                if args.cache_text_encoder_outputs:  # they come back for the pipeline, and leave again after
                    for text_encoder in text_encoders.values():
                        text_encoder.to(accelerator.device)
                pipeline = _pipeline_for_validation(args, accelerator, unet, text_encoders, vae, weight_dtype, sdxl)
                log_validation(pipeline, args, accelerator, epoch)
                del pipeline
                move_off_device(*cached_away, counter=tracker.counter)

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

    if evaluate_held_out and held_out_losses[-1][0] != global_step:
        record_held_out_loss(held_out_losses, evaluate_held_out(), global_step, accelerator)

    # Save: the adapter in kohya/LyCORIS format, and the memory report.
    accelerator.wait_for_everyone()
    training.verify_identical_across_processes(accelerator, params_to_clip)
    training.check_finite_weights(params_to_clip, global_step, args.output_dir)
    weights_path = None
    if accelerator.is_main_process:
        weights_path = save_adapter_weights(args, networks, args.output_dir)
        tracker.write_report(args.output_dir, extra=allocator.report_entry())
        training.write_json(
            Path(args.output_dir) / training.TRAINING_SUMMARY_NAME,
            {
                "global_step": global_step,
                "final_loss": float(loss.detach().item()),
                "step_seconds": step_seconds,
                "quantization": _quant_summary(quant_reports),
                "skipped_images": skipped_images,
                "skipped_captions": skipped_captions,
                "held_out_loss": held_out_summary(eval_set, held_out_losses, quantization_scalars),
            },
        )
        if skipped_images or skipped_captions:
            logger.warning(
                f"Trained without {skipped_images} unreadable image(s) and {skipped_captions} row(s) with an"
                " unusable caption: see the warnings at the start."
            )
        logger.info(f"Saved adapter weights to {weights_path}")
        logger.info("Memory:\n" + tracker.summary_table())
        if args.validation_prompt and not args.pretrained_model_name_or_path.startswith(
            arg_groups.ARCHITECTURE_PREFIX
        ):
            run_final_test(args, accelerator, weight_dtype, sdxl)
        if args.push_to_hub:
            training.push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.logging_dir)
    training.end_training(accelerator)
    return {"global_step": global_step, "loss": float(loss.detach().item()), "weights": weights_path}


def measure_frozen_base(args: argparse.Namespace) -> dict:
    """The "quantization only" row of the memory study: load and quantize the frozen base, run one forward pass
    at the training resolution, and write the memory report, with no adapter and no optimizer."""
    accelerator = setup_accelerator(args)
    os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    tracker = memory.MemoryTracker(accelerator.device, accelerator, args.output_dir, log_every=1, count_tensor_steps=1)
    sdxl = is_sdxl(args)
    tokenizers = load_tokenizers(args, sdxl)
    text_encoders, vae, unet, noise_scheduler = load_models(args, weight_dtype, sdxl)
    for role, model in {"unet": unet, **text_encoders}.items():
        place_frozen_model(model, args, weight_dtype, accelerator.device, role)
    place_vae(vae, args, weight_dtype, accelerator.device, sdxl)
    tracker.watch(models=[unet, *text_encoders.values(), vae])
    tracker.milestone("after_model_load")
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    latents = torch.randn(
        args.train_batch_size, unet.config.in_channels, latent_size, latent_size, device=accelerator.device
    )
    batch = _placeholder_text_batch(args, tokenizers)
    with torch.no_grad(), accelerator.autocast():
        encoder_hidden_states, added_cond_kwargs = unet_conditioning(
            args, batch, text_encoders, sdxl, accelerator.device, weight_dtype
        )
        timesteps = torch.full((args.train_batch_size,), 500, device=accelerator.device)
        unet(
            latents.to(weight_dtype),
            timesteps,
            encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
    tracker.milestone("after_first_step", step=1)
    tracker.log_step(1)
    if accelerator.is_main_process:
        tracker.write_report(args.output_dir)
    training.end_training(accelerator)
    return tracker.report()


def _placeholder_text_batch(args, tokenizers) -> dict:
    """Token ids of padding and SDXL's size conditioning at the training resolution, for `measure_frozen_base`."""
    batch = {}
    for position, tokenizer in enumerate(tokenizers):
        key = "input_ids" if position == 0 else f"input_ids_{position + 1}"
        batch[key] = torch.zeros(args.train_batch_size, tokenizer.model_max_length, dtype=torch.long)
    batch["original_sizes"] = torch.full((args.train_batch_size, 2), args.resolution)
    batch["crop_top_lefts"] = torch.zeros(args.train_batch_size, 2, dtype=torch.long)
    return batch


def pipeline_class(sdxl: bool):
    """The diffusers pipeline that validates and tests: `StableDiffusionXLPipeline` for SDXL."""
    import diffusers

    return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline


def run_final_test(args, accelerator, weight_dtype, sdxl: bool = False) -> None:
    """Reloads the saved adapter from disk into a fresh pipeline and logs test images, as upstream does."""
    components = {} if args.pretrained_vae_model_name_or_path is None else {"vae": _load_vae_for_pipeline(args)}
    pipeline = (
        pipeline_class(sdxl)
        .from_pretrained(
            args.pretrained_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            torch_dtype=weight_dtype,
            **components,
        )
        .to(accelerator.device)
    )
    adapters.load_adapter(pipeline, args.output_dir)
    images = log_validation(pipeline, args, accelerator, epoch=args.num_train_epochs, phase="test")
    grid_path = save_image_grid(images, Path(args.output_dir) / FINAL_IMAGES_NAME)
    logger.info(f"Saved the final images for {args.validation_prompt!r} to {grid_path}")


def save_image_grid(images: list, path: Path) -> Path:
    """Saves same-sized PIL images side by side in one PNG."""
    from PIL import Image

    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for position, image in enumerate(images):
        grid.paste(image.convert("RGB"), (position * width, 0))
    grid.save(path)
    return path


def _load_vae_for_pipeline(args):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=args.revision)


def _pipeline_for_validation(args, accelerator, unet, text_encoders: dict, vae, weight_dtype, sdxl: bool = False):
    """A pipeline around the models being trained (the VAE comes back to the device if latents were cached)."""
    components = {role: accelerator.unwrap_model(model) for role, model in text_encoders.items()}
    if not sdxl:
        components["safety_checker"] = None
    return pipeline_class(sdxl).from_pretrained(
        args.pretrained_model_name_or_path,
        unet=accelerator.unwrap_model(unet),
        vae=vae.to(accelerator.device),
        revision=args.revision,
        variant=args.variant,
        torch_dtype=weight_dtype,
        **components,
    )


def _quant_summary(reports) -> dict:
    return {role: report.to_dict() for role, report in reports.items() if report is not None}


# ----------------------------------------------------------------------------------------------------------------
# --estimate_memory: the steps above, on fake tensors
# ----------------------------------------------------------------------------------------------------------------


def estimate_batch(args, tokenizers: list, device) -> dict:
    """A training batch of the shapes the flags give, as the collator makes it: `pixel_values` (N, 3, R, R)
    float32, token ids per tokenizer and, for SDXL, the size conditioning (N = `--train_batch_size`)."""
    batch = _placeholder_text_batch(args, tokenizers)
    batch["pixel_values"] = torch.zeros(args.train_batch_size, 3, args.resolution, args.resolution)
    return {key: value.to(device) for key, value in batch.items()}


class OneBatchEncodings:
    """What `--cache_latents` / `--cache_text_encoder_outputs` put in the batch, encoded from the one batch the
    memory estimate replays (`place_frozen_base` calls these where `main` encodes the training set)."""

    def __init__(self, batch: dict, weight_dtype: torch.dtype, sdxl: bool):
        self.batch, self.weight_dtype, self.sdxl = batch, weight_dtype, sdxl

    @torch.no_grad()
    def cache_latents(self, vae) -> None:
        self.batch["latents"] = encode_latents(vae, self.batch.pop("pixel_values"), self.weight_dtype)

    @torch.no_grad()
    def cache_text_encoder_outputs(self, text_encoders: dict) -> None:
        prompt_embeds, pooled_prompt_embeds = encode_prompt(self.batch, text_encoders, self.sdxl)
        self.batch["prompt_embeds"] = prompt_embeds
        if pooled_prompt_embeds is not None:
            self.batch["pooled_prompt_embeds"] = pooled_prompt_embeds


def replay_on_fake_tensors(args) -> dict:
    """Runs this recipe's setup and `estimate.ESTIMATE_STEPS` optimizer steps on fake tensors and returns the
    estimate report (see `estimate.build_report`). Reads the pipeline's config and tokenizer files, no weights and
    no images."""
    accelerator = setup_accelerator(args)
    sdxl = is_sdxl(args)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    device = accelerator.device
    tokenizers = load_tokenizers(args, sdxl)
    args = copy.copy(args)
    args.validation_loss_steps = None  # no held-out evaluation, no per-layer weight errors
    with estimate.fake_run(device.type) as counter:
        # The setup steps of `main`, in its order.
        with estimate.real_tensors():  # skeletons on the meta device: weights come with placing them
            text_encoders, vae, unet, noise_scheduler = load_models(args, weight_dtype, sdxl, with_weights=False)
        if args.prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=args.prediction_type)
        for model in (unet, vae, *text_encoders.values()):
            counter.adopt(model.buffers())  # real buffers made with them (position ids) are on the device too
        place_vae(vae, args, weight_dtype, device, sdxl)
        counter.name_modules({"unet": unet, "vae": vae, **text_encoders})  # names for what the cached encoders hold
        encodings = OneBatchEncodings(estimate_batch(args, tokenizers, device), weight_dtype, sdxl)
        place_frozen_base(
            args,
            unet,
            text_encoders,
            vae,
            weight_dtype,
            device,
            encodings,
            counter=counter,
            quant_storage=training.quant_storage_dtype(accelerator, weight_dtype),
        )
        batch = encodings.batch
        counter.phase = "adapter"
        networks = attach_adapters(args, unet, text_encoders, sdxl)
        enable_gradient_checkpointing(args, unet, text_encoders)
        enable_attention_backend(args, unet)
        counter.name_modules({"unet": unet, "vae": vae, **text_encoders})
        trained_roles = [role for role in text_encoders if role in networks]
        param_groups, optimizer = create_optimizer(args, networks, trained_roles, device)
        # Already on the device (as in `main`); moving fake parameters again would fail in `nn.Module.to`.
        trained = [unet, *(text_encoders[role] for role in trained_roles)]
        prepared = accelerator.prepare(*trained, optimizer, device_placement=[False] * (len(trained) + 1))
        unet, optimizer = prepared[0], prepared[-1]
        text_encoders.update(zip(trained_roles, prepared[1:-1]))
        params_to_clip = [parameter for group in param_groups for parameter in group["params"]]
        models = {"unet": unet, "vae": vae, **text_encoders}
        for model in trained:
            model.train()
        breakdown = None
        for _ in range(estimate.ESTIMATE_STEPS):
            counter.phase = "forward"
            loss = forward_loss(args, batch, unet, text_encoders, vae, noise_scheduler, weight_dtype, sdxl)
            loss = backward_and_step(args, accelerator, loss, optimizer, None, params_to_clip)
            if breakdown is None:  # after the first step: gradients and the optimizer state are both held
                breakdown = memory.memory_breakdown(list(models.values()), optimizer, counter)
                counter.label_tensors(models, optimizer)
            optimizer.zero_grad()
    accelerator.free_memory()
    return estimate.build_report(counter, breakdown, "train_text_to_image " + " ".join(sys.argv[1:]))


def replay_frozen_base_on_fake_tensors(args) -> dict:
    """`measure_frozen_base` on fake tensors (the memory study's "quantization only" row): the frozen models loaded
    and quantized, one UNet forward pass without gradients, no adapter and no optimizer. Returns the estimate report."""
    accelerator = setup_accelerator(args)
    sdxl = is_sdxl(args)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    device = accelerator.device
    tokenizers = load_tokenizers(args, sdxl)
    with estimate.fake_run(device.type) as counter:
        with estimate.real_tensors():
            text_encoders, vae, unet, _ = load_models(args, weight_dtype, sdxl, with_weights=False)
        models = {"unet": unet, "vae": vae, **text_encoders}
        for model in models.values():
            counter.adopt(model.buffers())
        counter.phase = "quantize" if args.quant else "load"
        for role, model in {"unet": unet, **text_encoders}.items():
            place_frozen_model(model, args, weight_dtype, device, role)
        place_vae(vae, args, weight_dtype, device, sdxl)
        counter.name_modules(models)
        counter.label_tensors(models)
        latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        latents = torch.randn(args.train_batch_size, unet.config.in_channels, latent_size, latent_size, device=device)
        batch = {key: value.to(device) for key, value in _placeholder_text_batch(args, tokenizers).items()}
        counter.phase = "forward"
        with torch.no_grad(), accelerator.autocast():
            text_states, added_cond_kwargs = unet_conditioning(args, batch, text_encoders, sdxl, device, weight_dtype)
            timesteps = torch.full((args.train_batch_size,), 500, device=device)
            unet(latents.to(weight_dtype), timesteps, text_states, added_cond_kwargs=added_cond_kwargs)
        breakdown = memory.memory_breakdown(list(models.values()))
    return estimate.build_report(counter, breakdown, "train_text_to_image (frozen base) " + " ".join(sys.argv[1:]))


def memory_saving_variants(args) -> list[tuple[str, dict]]:
    """The flag changes `--estimate_memory GIB` tries when the command does not fit (each once; all together too)."""
    variants = []
    if args.quant != "nf4":
        variants.append(("--quant nf4", {"quant": "nf4"}))
    if not args.gradient_checkpointing:
        variants.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if not args.offload_activations:
        variants.append(("--offload_activations", {"offload_activations": True}))
    if not args.cache_latents:
        variants.append(("--cache_latents", {"cache_latents": True}))
    if not args.cache_text_encoder_outputs and not args.train_text_encoder:
        variants.append(("--cache_text_encoder_outputs", {"cache_text_encoder_outputs": True}))
    if args.optimizer == "adamw":
        variants.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if args.train_batch_size > 1:
        half = args.train_batch_size // 2
        variants.append((f"--train_batch_size {half}", {"train_batch_size": half}))
    smaller = args.resolution * 3 // 4 // arg_groups.VAE_SCALE_FACTOR * arg_groups.VAE_SCALE_FACTOR
    if smaller >= 256:
        variants.append((f"--resolution {smaller}", {"resolution": smaller}))
    return variants


def estimate_memory(args: argparse.Namespace) -> dict:
    """`--estimate_memory [GIB]`: predicts the run's peak device memory without training, prints the table, writes
    `OUTPUT_DIR/memory_estimate.json` and returns the report (see `estimate.estimate_command`)."""
    return estimate.estimate_command(args, replay_on_fake_tensors, memory_saving_variants(args), args.output_dir)


def cli() -> None:
    main(parse_args(sys.argv[1:]))


if __name__ == "__main__":
    cli()
