"""Command-line arguments shared by the trainers: upstream flags, flag for flag, plus adapter, quantization and memory.

`text_to_image_parser()` accepts every flag of diffusers' `examples/text_to_image/train_text_to_image_lora.py` and
`train_text_to_image_lora_sdxl.py` (`text_to_image_parser(sdxl=True)` with the SDXL script's defaults; see
`is_sdxl_pipeline`) and `causal_lm_parser()` every flag of transformers'
`examples/pytorch/language-modeling/run_clm_no_trainer.py`, with the same defaults, types and choices, so an upstream
command line runs unchanged. The groups both trainers add on top
(`Adapter (LyCORIS)`, `Quantization`, `Memory`) are defined once here.

`validate_text_to_image_args` and `validate_causal_lm_args` check values the way a user can act on: each error names
the flag and the value and says what to do, and is raised through `parser.error` (exit code 2) before any model is
loaded or any file is written.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from diffusers_lowmem.adapters import ADAPTER_ALGOS, CONV_ALGOS, AdapterConfig, split_target_pattern
from diffusers_lowmem.architectures import ARCHITECTURES, TASK_CAUSAL_LM, TASK_TEXT_TO_IMAGE
from diffusers_lowmem.chunked_loss import DEFAULT_CHUNK_SIZE as DEFAULT_LOSS_CHUNK_SIZE
from diffusers_lowmem.quantization import DEFAULT_SKIP_CAUSAL_LM, DEFAULT_SKIP_UNET, QUANT_MODES
from diffusers_lowmem.training import OPTIMIZERS

# `--pretrained_model_name_or_path architecture:NAME` builds a real architecture with random weights (no download).
ARCHITECTURE_PREFIX = "architecture:"
MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
# Lower-case names of `torchvision.transforms.InterpolationMode`, spelled out so parsing does not import torchvision.
IMAGE_INTERPOLATION_MODES = ("bilinear", "bicubic", "box", "hamming", "lanczos", "nearest", "nearest_exact")
# The `--lr_scheduler_type` choices of run_clm_no_trainer.py (values of `transformers.SchedulerType`).
CAUSAL_LM_SCHEDULER_TYPES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
# Extensions `datasets.load_dataset` reads for `--train_file` / `--validation_file` (txt is read by the "text" loader).
DATA_FILE_EXTENSIONS = ("csv", "json", "txt")
LATEST_CHECKPOINT = "latest"
CHECKPOINT_EVERY_EPOCH = "epoch"
# The VAE of Stable Diffusion downsamples by 8, so the image side must be a multiple of 8.
VAE_SCALE_FACTOR = 8
# `--resolution` default of train_text_to_image_lora_sdxl.py (train_text_to_image_lora.py's is 512).
SDXL_RESOLUTION = 1024
# `_class_name` of the pipelines in `model_index.json` that the trainer trains as Stable Diffusion XL.
SDXL_PIPELINE_CLASSES = ("StableDiffusionXLPipeline",)

# A Hub repository id: each part starts and ends with a letter or digit, in between `-`, `_` or `.` (never doubled).
_HUB_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
# Legacy canonical ids (`gpt2`, `distilgpt2`) have no namespace; run_clm_no_trainer.py accepts them.
_HUB_ID_OPTIONAL_NAMESPACE = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")
# A spec line's trailing comment: two or more spaces, then a parenthesised note.
_SPEC_COMMENT = re.compile(r"\s{2,}\(.*\)\s*$")

TEXT_TO_IMAGE_DESCRIPTION = (
    "Fine-tune Stable Diffusion (1.x, 2.x or XL) with LyCORIS adapters (lora, loha, lokr, locon) on an optionally "
    "8-bit or nf4-quantized frozen base, logging memory to the trackers. A drop-in for diffusers' "
    "examples/text_to_image/train_text_to_image_lora.py and train_text_to_image_lora_sdxl.py: every upstream flag "
    "works the same."
)
CAUSAL_LM_DESCRIPTION = (
    "Fine-tune a causal language model with LyCORIS adapters (lora, loha, lokr, locon) on an optionally 8-bit or "
    "nf4-quantized frozen base, logging memory to the trackers. A drop-in for transformers' "
    "examples/pytorch/language-modeling/run_clm_no_trainer.py: every upstream flag works the same."
)


# --------------------------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------------------------


def text_to_image_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    """The full parser of the text-to-image trainer.

    Args:
        sdxl: Use the defaults of `train_text_to_image_lora_sdxl.py` (`--resolution 1024`) instead of those of
            `train_text_to_image_lora.py` (512). Both scripts' flags are accepted either way.

    Returns:
        A parser with the flags of diffusers' `train_text_to_image_lora.py` and `train_text_to_image_lora_sdxl.py`
        and the adapter, quantization and memory groups; `--help` shows every default.
    """
    parser = argparse.ArgumentParser(
        description=TEXT_TO_IMAGE_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_text_to_image_args(parser)
    if sdxl:
        parser.set_defaults(resolution=SDXL_RESOLUTION)
    add_adapter_args(parser)
    add_quantization_args(parser)
    add_optimizer_args(parser)
    add_evaluation_args(parser, text_to_image=True)
    add_memory_args(parser, text_to_image=True)
    add_reliability_args(parser, text_to_image=True)
    return parser


def causal_lm_parser() -> argparse.ArgumentParser:
    """The full parser of the causal-LM trainer.

    Returns:
        A parser with the flags of transformers' `run_clm_no_trainer.py` and the adapter, quantization and memory
        groups; `--help` shows every default.
    """
    parser = argparse.ArgumentParser(
        description=CAUSAL_LM_DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_causal_lm_args(parser)
    add_adapter_args(parser)
    add_quantization_args(parser)
    add_optimizer_args(parser)
    add_evaluation_args(parser)
    add_memory_args(parser)
    add_reliability_args(parser)
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Upstream flags
# --------------------------------------------------------------------------------------------------------------------


def add_text_to_image_args(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of diffusers' `train_text_to_image_lora.py` and `train_text_to_image_lora_sdxl.py` (which adds
    `--pretrained_vae_model_name_or_path`, `--train_text_encoder`, `--enable_npu_flash_attention` and `--debug_loss`),
    plus `--text_encoder_lr`.

    `--rank` is left to `add_adapter_args`, which holds every adapter option of both trainers.

    Args:
        parser: The parser to extend.
    """
    _add_text_to_image_model_args(parser)
    _add_text_to_image_data_args(parser)
    _add_text_to_image_training_args(parser)
    _add_text_to_image_output_args(parser)


def _add_text_to_image_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        required=True,
        help="Path to pretrained model or model identifier from huggingface.co/models. "
        f"`{ARCHITECTURE_PREFIX}NAME` builds a real architecture (e.g. `{ARCHITECTURE_PREFIX}sd15`) with random "
        "weights and no download, for memory profiling; `python -m diffusers_lowmem.architectures` lists them.",
    )
    parser.add_argument(
        "--revision",
        type=str,
        default=None,
        required=False,
        help="Revision of pretrained model identifier from huggingface.co/models.",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="Path to pretrained VAE model with better numerical stability. More details:"
        " https://github.com/huggingface/diffusers/pull/4038. Without it the pipeline's own VAE is used (kept in"
        " float32 for Stable Diffusion XL, as upstream).",
    )
    parser.add_argument(
        "--variant",
        type=str,
        default=None,
        help="Variant of the model files of the pretrained model identifier from huggingface.co/models, 'e.g.' fp16",
    )


def _add_text_to_image_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="The name of the Dataset (from the HuggingFace hub) to train on (could be your own, possibly private,"
        " dataset). It can also be a path pointing to a local copy of a dataset in your filesystem,"
        " or to a folder containing files that 🤗 Datasets can understand.",
    )
    parser.add_argument(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The config of the Dataset, leave as None if there's only one config.",
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder containing the training data. Folder contents must follow the structure described in"
        " https://huggingface.co/docs/datasets/image_dataset#imagefolder. In particular, a `metadata.jsonl` file"
        " must exist to provide the captions for the images. Ignored if `dataset_name` is specified.",
    )
    parser.add_argument(
        "--image_column", type=str, default="image", help="The column of the dataset containing an image."
    )
    parser.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="The column of the dataset containing a caption or a list of captions.",
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="For debugging purposes or quicker training, truncate the number of training examples to this value if"
        " set.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="The resolution for input images, all the images in the train/validation dataset will be resized to this"
        " resolution",
    )
    parser.add_argument(
        "--center_crop",
        default=False,
        action="store_true",
        help="Whether to center crop the input images to the resolution. If not set, the images will be randomly"
        " cropped. The images will be resized to the resolution first before cropping.",
    )
    parser.add_argument("--random_flip", action="store_true", help="whether to randomly flip images horizontally")
    parser.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=IMAGE_INTERPOLATION_MODES,
        help="The image interpolation method to use for resizing images.",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Number of subprocesses to use for data loading. 0 means that the data will be loaded in the main process.",
    )


def _add_text_to_image_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Attach adapters to the text encoder (both text encoders for Stable Diffusion XL) too, not only the UNet"
        " (their frozen bases are quantized with --quant).",
    )
    parser.add_argument(
        "--train_batch_size", type=int, default=16, help="Batch size (per device) for the training dataloader."
    )
    parser.add_argument(
        "--num_train_epochs", type=int, default=100, help="Total number of training epochs to perform."
    )
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of training steps to perform.  If provided, overrides num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of updates steps to accumulate before performing a backward/update pass.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="Initial learning rate (after the potential warmup period) to use.",
    )
    parser.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="Learning rate of the text encoder's adapters with --train_text_encoder; None uses --learning_rate.",
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale the learning rate by the number of GPUs, gradient accumulation steps, and batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='The scheduler type to use. Choose between ["linear", "cosine", "cosine_with_restarts", "polynomial",'
        ' "constant", "constant_with_warmup"]',
    )
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=500, help="Number of steps for the warmup in the lr scheduler."
    )
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="SNR weighting gamma to be used if rebalancing the loss. Recommended value is 5.0. "
        "More details here: https://arxiv.org/abs/2303.09556.",
    )
    parser.add_argument(
        "--use_8bit_adam", action="store_true", help="Whether or not to use 8-bit Adam from bitsandbytes."
    )
    parser.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Whether or not to allow TF32 on Ampere GPUs. Can be used to speed up training. For more information, see"
        " https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-devices",
    )
    _add_adam_args(parser, weight_decay_flag="--adam_weight_decay", weight_decay=1e-2)
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        help="The prediction_type that shall be used for training. Choose between 'epsilon' or 'v_prediction' or"
        " leave `None`. If left to `None` the default prediction type of the scheduler:"
        " `noise_scheduler.config.prediction_type` is chosen.",
    )
    parser.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Whether or not to use xformers."
    )
    parser.add_argument(
        "--enable_npu_flash_attention", action="store_true", help="Whether or not to use npu flash attention."
    )
    parser.add_argument(
        "--debug_loss",
        action="store_true",
        help="debug loss for each image, if filenames are available in the dataset. As upstream, the training"
        " batches carry no file names, so this logs nothing more.",
    )
    _add_mixed_precision_arg(parser)
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")


def _add_text_to_image_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--validation_prompt", type=str, default=None, help="A prompt that is sampled during training for inference."
    )
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=4,
        help="Number of images that should be generated during validation with `validation_prompt`.",
    )
    parser.add_argument(
        "--validation_epochs",
        type=int,
        default=1,
        help="Run fine-tuning validation every X epochs. The validation process consists of running the prompt"
        " `args.validation_prompt` multiple times: `args.num_validation_images`.",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="sd-model-finetuned-lora",
        help="The output directory where the model predictions and checkpoints will be written.",
    )
    parser.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="The directory where the downloaded models and datasets will be stored.",
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    _add_hub_args(parser)
    _add_logging_dir_arg(parser)
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='The integration to report the results and logs to. Supported platforms are `"tensorboard"`'
        ' (default), `"wandb"` and `"comet_ml"`. Use `"all"` to report to all integrations.',
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a checkpoint of the training state every X updates. These checkpoints are only suitable for resuming"
        " training using `--resume_from_checkpoint`.",
    )
    _add_checkpoints_total_limit_arg(parser)
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="Whether training should be resumed from a previous checkpoint. Use a path saved by"
        f' `--checkpointing_steps`, or `"{LATEST_CHECKPOINT}"` to automatically select the last available checkpoint.',
    )


def add_causal_lm_args(parser: argparse.ArgumentParser) -> None:
    """Adds the flags of transformers' `run_clm_no_trainer.py`, plus the memory-relevant flags it lacks.

    Ours: `--mixed_precision`, `--gradient_checkpointing`, `--use_8bit_adam`, `--checkpoints_total_limit` and
    `--logging_dir`, with the meanings and defaults of diffusers' text-to-image script.

    Args:
        parser: The parser to extend.
    """
    _add_causal_lm_data_args(parser)
    _add_causal_lm_model_args(parser)
    _add_causal_lm_training_args(parser)
    _add_causal_lm_output_args(parser)


def _add_causal_lm_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="The name of the dataset to use (via the datasets library).",
    )
    parser.add_argument(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The configuration name of the dataset to use (via the datasets library).",
    )
    parser.add_argument(
        "--train_file", type=str, default=None, help="A csv, txt or a json file containing the training data."
    )
    parser.add_argument(
        "--validation_file", type=str, default=None, help="A csv, txt or a json file containing the validation data."
    )
    # Upstream gives no type, so a value on the command line arrives as a string; int keeps the same meaning and
    # lets the range be checked.
    parser.add_argument(
        "--validation_split_percentage",
        type=int,
        default=5,
        help="The percentage of the train set used as validation set in case there's no validation split",
    )
    parser.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="Optional input sequence length after tokenization. The training dataset will be truncated in block of"
        " this size for training. Default to the model max input length for single sentence inputs (take into"
        " account special tokens).",
    )
    parser.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=None,
        help="The number of processes to use for the preprocessing.",
    )
    parser.add_argument(
        "--overwrite_cache", action="store_true", help="Overwrite the cached training and evaluation sets"
    )
    parser.add_argument(
        "--no_keep_linebreaks", action="store_true", help="Do not keep line breaks when using TXT files."
    )


def _add_causal_lm_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_name_or_path",
        type=str,
        required=False,
        help="Path to pretrained model or model identifier from huggingface.co/models. Required here: adapters need"
        f" a base model. `{ARCHITECTURE_PREFIX}NAME` builds a real architecture (e.g."
        f" `{ARCHITECTURE_PREFIX}llama2-7b`) with random weights and no download, for memory profiling.",
    )
    parser.add_argument(
        "--config_name",
        type=str,
        default=None,
        help="Pretrained config name or path if not the same as model_name",
    )
    parser.add_argument(
        "--tokenizer_name",
        type=str,
        default=None,
        help="Pretrained tokenizer name or path if not the same as model_name",
    )
    parser.add_argument(
        "--use_slow_tokenizer",
        action="store_true",
        help="If passed, will use a slow tokenizer (not backed by the 🤗 Tokenizers library).",
    )
    parser.add_argument(
        "--model_type",
        type=str,
        default=None,
        help="Model type to use if training from scratch: a transformers model type with a causal-LM head.",
        choices=_causal_lm_model_types(),
        metavar="MODEL_TYPE",  # the ~190 choices would swamp the usage line; a wrong value still lists them
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Whether to trust the execution of code from datasets/models defined on the Hub. This option should only"
        " be set to `True` for repositories you trust and in which you have read the code, as it will execute code"
        " present on the Hub on your local machine.",
    )


def _causal_lm_model_types() -> list[str] | None:
    """The `--model_type` choices: every model type with a causal-LM head in the installed transformers."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return None
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _add_causal_lm_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=8,
        help="Batch size (per device) for the training dataloader.",
    )
    parser.add_argument(
        "--per_device_eval_batch_size",
        type=int,
        default=8,
        help="Batch size (per device) for the evaluation dataloader.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=5e-5,
        help="Initial learning rate (after the potential warmup period) to use.",
    )
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay to use.")
    parser.add_argument("--num_train_epochs", type=int, default=3, help="Total number of training epochs to perform.")
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total number of training steps to perform. If provided, overrides num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Number of updates steps to accumulate before performing a backward/update pass.",
    )
    # Upstream's type is `transformers.SchedulerType`, whose values are exactly these strings.
    parser.add_argument(
        "--lr_scheduler_type",
        type=str,
        default="linear",
        help="The scheduler type to use.",
        choices=CAUSAL_LM_SCHEDULER_TYPES,
    )
    parser.add_argument(
        "--num_warmup_steps", type=int, default=0, help="Number of steps for the warmup in the lr scheduler."
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Whether or not to use gradient checkpointing to save memory at the expense of slower backward pass.",
    )
    parser.add_argument(
        "--use_8bit_adam", action="store_true", help="Whether or not to use 8-bit AdamW from bitsandbytes."
    )
    _add_mixed_precision_arg(parser)


def _add_causal_lm_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", type=str, default=None, help="Where to store the final model.")
    _add_hub_args(parser)
    parser.add_argument(
        "--checkpointing_steps",
        type=str,
        default=None,
        help="Whether the various states should be saved at the end of every n steps, or 'epoch' for each epoch.",
    )
    _add_checkpoints_total_limit_arg(parser)
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="If the training should continue from a checkpoint folder (a path, or"
        f' `"{LATEST_CHECKPOINT}"` for the last one in --output_dir).',
    )
    parser.add_argument(
        "--with_tracking",
        action="store_true",
        help="Whether to enable experiment trackers for logging.",
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="all",
        help='The integration to report the results and logs to. Supported platforms are `"tensorboard"`,'
        ' `"wandb"`, `"comet_ml"` and `"clearml"`. Use `"all"` (default) to report to all integrations. '
        "Only applicable when `--with_tracking` is passed.",
    )
    _add_logging_dir_arg(parser)


# Flags both upstream scripts define the same way.


def _add_adam_args(parser: argparse.ArgumentParser, weight_decay_flag: str, weight_decay: float) -> None:
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for the Adam optimizer.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for the Adam optimizer.")
    parser.add_argument(weight_decay_flag, type=float, default=weight_decay, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for the Adam optimizer")


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--push_to_hub", action="store_true", help="Whether or not to push the model to the Hub.")
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Model Hub.")
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The name of the repository to keep in sync with the local `output_dir`.",
    )


def _add_mixed_precision_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=list(MIXED_PRECISION_CHOICES),
        help="Whether to use mixed precision. Choose between fp16 and bf16 (bfloat16). Bf16 requires PyTorch >= 1.10"
        " and an Nvidia Ampere GPU. Default to the value of accelerate config of the current system or the flag"
        " passed with the `accelerate.launch` command. Use this argument to override the accelerate config.",
    )


def _add_logging_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--logging_dir",
        type=str,
        default="logs",
        help="[TensorBoard](https://www.tensorflow.org/tensorboard) log directory, relative to --output_dir.",
    )


def _add_checkpoints_total_limit_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Max number of checkpoints to store; the oldest are removed first.",
    )


# --------------------------------------------------------------------------------------------------------------------
# Groups both trainers share
# --------------------------------------------------------------------------------------------------------------------


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    """Adds the `Adapter (LyCORIS)` group: algorithm, ranks, alphas, LoKr factor, dropout and target layers.

    Args:
        parser: The parser to extend.
    """
    group = parser.add_argument_group("Adapter (LyCORIS)")
    group.add_argument(
        "--adapter",
        type=str,
        default="lora",
        choices=list(ADAPTER_ALGOS),
        help="LyCORIS algorithm: lora (low-rank product), loha (Hadamard product of two low-rank products), lokr"
        " (Kronecker product), locon (LoRA extended to convolutions).",
    )
    group.add_argument(
        "--rank",
        type=int,
        default=4,
        help="The dimension of the LoRA update matrices (the rank of every adapter algorithm).",
    )
    group.add_argument(
        "--adapter_alpha",
        type=float,
        default=None,
        help="Scale numerator: the update is multiplied by alpha / rank; None uses the rank (a scale of 1).",
    )
    group.add_argument(
        "--conv_rank",
        type=int,
        default=None,
        help=f"Rank of the adapters on convolutions, used by {', '.join(CONV_ALGOS)} on the UNet; None uses --rank.",
    )
    group.add_argument(
        "--conv_alpha",
        type=float,
        default=None,
        help="Alpha of the adapters on convolutions; None uses the convolution rank.",
    )
    group.add_argument(
        "--lokr_factor",
        type=int,
        default=-1,
        help="LoKr Kronecker factor: the size of the small factor of each dimension; -1 chooses it automatically.",
    )
    group.add_argument(
        "--adapter_dropout",
        type=float,
        default=0.0,
        help="Dropout on the adapter path during training, in [0, 1).",
    )
    group.add_argument(
        "--target_modules",
        type=str,
        nargs="+",
        default=None,
        help="Module-name patterns (full name, dotted suffix or fnmatch glob) narrowing which layers get adapters"
        "; None targets the attention and MLP linear layers of the model family. A pattern applies to every"
        " adapted model; prefix it with a role to narrow one model only: unet:, text_encoder:, text_encoder_2: (text"
        " to image; the encoders with --train_text_encoder) or llm: (causal LM), e.g. `unet:to_q unet:to_v"
        " text_encoder:q_proj`. A model no pattern applies to keeps its family's targets; one whose patterns match"
        " no layer is an error naming it.",
    )


def add_quantization_args(parser: argparse.ArgumentParser) -> None:
    """Adds the `Quantization` group: how the frozen base is stored.

    Args:
        parser: The parser to extend.
    """
    group = parser.add_argument_group("Quantization (bitsandbytes)")
    group.add_argument(
        "--quant",
        type=str,
        default=None,
        choices=list(QUANT_MODES),
        help="Store the frozen base's linear layers quantized: 8bit (bitsandbytes Linear8bitLt, LLM.int8) or nf4"
        " (Linear4bit NF4 with double quantization); for text-to-image also the UNet's convolutions, in the same"
        " format (bitsandbytes' blockwise functional API). None keeps the base in the training dtype.",
    )
    group.add_argument(
        "--quant_skip",
        type=str,
        nargs="*",
        default=None,
        help="Module-name patterns (full name, dotted suffix or fnmatch glob) kept in full precision under --quant"
        f"; None keeps {', '.join(DEFAULT_SKIP_UNET)} out for the UNet, nothing for the text encoders and"
        f" {', '.join(DEFAULT_SKIP_CAUSAL_LM)} for a causal LM; the flag with no pattern quantizes every layer.",
    )


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    """Adds the `Optimizer` group: which optimizer updates the adapters (upstream's `--use_8bit_adam` stays).

    Args:
        parser: The parser to extend.
    """
    group = parser.add_argument_group("Optimizer")
    group.add_argument(
        "--optimizer",
        type=str,
        default=None,
        choices=list(OPTIMIZERS),
        help="adamw (torch), or a bitsandbytes optimizer: adamw8bit (blockwise 8-bit moments, about a quarter of"
        " fp32's state; what --use_8bit_adam selects), paged_adamw8bit / paged_adamw32bit (state in CUDA unified"
        " memory that is paged to host RAM under pressure; unpaged, with a warning, off CUDA) or lion8bit (one 8-bit"
        " momentum; usually wants a 3-10x smaller learning rate). Text-to-image passes --adam_beta1/2 to each. Tensors under 4096"
        " elements keep 32-bit state in every bitsandbytes optimizer. None: adamw, or adamw8bit with"
        " --use_8bit_adam.",
    )


def add_evaluation_args(parser: argparse.ArgumentParser, text_to_image: bool = False) -> None:
    """Adds the `Evaluation` group: a held-out loss that compares runs (text-to-image), evaluation by steps (causal LM).

    Args:
        parser: The parser to extend.
        text_to_image: Add the deterministic held-out diffusion loss; otherwise `--eval_steps` of the causal LM.
    """
    group = parser.add_argument_group("Evaluation")
    if not text_to_image:
        group.add_argument(
            "--eval_steps",
            type=int,
            default=None,
            help="Also evaluate (eval loss and perplexity, logged as eval/loss and eval/perplexity with"
            " --with_tracking) every N optimizer steps, before training and at its end, besides upstream's"
            " evaluation after each epoch. With --quant it also logs eval/quantization_loss_delta: the eval loss of"
            " the quantized base minus the unquantized one (which visits the device once, before training; skipped"
            " with a warning if it does not fit).",
        )
        return
    group.add_argument(
        "--validation_loss_steps",
        type=int,
        default=None,
        help="Compute a deterministic held-out loss before training, every N optimizer steps and at the end, logged"
        " as eval/loss: a fixed split of the data (--validation_split), each image noised with fixed noise at 8"
        " fixed timesteps, plain MSE (no SNR weighting or noise offset). The same in every run whatever --seed, so"
        " runs that differ only in adapter, quantization or optimizer compare directly. With --quant it also logs"
        " eval/quantization_loss_delta: the loss of the quantized base minus the unquantized one (which visits the"
        " device once, before training; skipped with a warning if it does not fit).",
    )
    group.add_argument(
        "--validation_split",
        type=float,
        default=None,
        help="Share of the dataset held out of training for --validation_loss_steps, in (0, 1), chosen by a fixed"
        " permutation (not --seed); None: 0.1. Held-out images are center-cropped and never flipped.",
    )


def add_memory_args(parser: argparse.ArgumentParser, text_to_image: bool = False) -> None:
    """Adds the `Memory` group: how often memory is logged and, for text-to-image, latent caching.

    Args:
        parser: The parser to extend.
        text_to_image: Also add `--cache_latents`, which only the text-to-image trainer has.
    """
    group = parser.add_argument_group("Memory")
    group.add_argument(
        "--memory_log_steps",
        type=int,
        default=1,
        help="Log allocated, reserved and peak device memory (and host RSS) to the trackers every N optimizer steps.",
    )
    group.add_argument(
        "--estimate_memory",
        type=float,
        nargs="?",
        const=0.0,
        default=None,
        metavar="GIB",
        help="Do not train: predict this command's peak device memory (torch.cuda.max_memory_allocated) by running"
        " its setup and two optimizer steps on fake tensors (shapes, no data), in 10 s to a few minutes at real"
        " scale on a 2-core CPU (once more per variant it tries), without a GPU, weights or data (model configs"
        " only; batch shapes come from the flags; data flags are not checked). Prints a table and writes"
        " OUTPUT_DIR/memory_estimate.json (peak, breakdown, what holds the peak). With GIB (e.g. 12), also whether"
        " the run fits a device of that many GiB (CUDA context and cuBLAS workspace added) and, if not, which flags"
        " would make it fit.",
    )
    group.add_argument(
        "--offload_activations",
        action="store_true",
        help="Keep the activations saved for backward in host memory (pinned when CUDA is available), copied off the"
        " device in forward and back in backward; with --gradient_checkpointing that is each layer's input. Saves"
        " their device memory for two host-device copies per step: Llama-3-8B nf4 QLoRA at batch 2 x 2,048 with"
        " --gradient_checkpointing is estimated at 6.61 GiB instead of 7.50 (benchmarks/results/"
        "long-context-estimate.md; step time in offload-and-chunked-loss-cpu.md). Weights, tensors under 1 MiB and"
        " tensors already on the host stay where they are.",
    )
    if not text_to_image:
        group.add_argument(
            "--loss_chunk_size",
            type=int,
            default=DEFAULT_LOSS_CHUNK_SIZE,
            metavar="TOKENS",
            help="Compute the loss and its gradient TOKENS tokens (of batch x sequence) at a time: the output"
            " embedding (lm_head) is applied per chunk inside the loss and recomputed in backward, so the full batch x"
            " sequence x vocabulary logits, their fp32 copy, log-softmax and gradients never exist at once. Same loss"
            " and gradients as upstream's (mean over the batch's labelled tokens), for one more lm_head matmul per"
            " step. Measured for Llama-3-8B at batch 2 x 2,048 in bf16: logit-sized tensors peak at 5.87 GiB without,"
            " 0.37 GiB with 256 (benchmarks/results/offload-and-chunked-loss-cpu.md); the nf4 QLoRA step is estimated"
            " at 7.50 GiB instead of 12.48 (long-context-estimate.md). 0: upstream's loss on the full logits. Gemma's soft-capping and Cohere's and Granite's logit scaling are reproduced; other changes to"
            " the logits after lm_head, FSDP and DeepSpeed ZeRO-3 fall back to the full logits with a warning.",
        )
    if text_to_image:
        group.add_argument(
            "--cache_text_encoder_outputs",
            action="store_true",
            help="Encode every caption with the frozen text encoder(s) once before training, then move them off the"
            " device: saves their memory and time per step (fixes the choice among several captions to one draw per"
            " image). Not with --train_text_encoder.",
        )
        group.add_argument(
            "--cache_latents",
            action="store_true",
            help="Encode every training image with the VAE once before training, then move the VAE off the device:"
            " saves the VAE's memory and encoder time per step (fixes random crops and flips to one draw per image).",
        )


def add_reliability_args(parser: argparse.ArgumentParser, text_to_image: bool = False) -> None:
    """Adds the `Reliability` group shared by both trainers: what a non-finite loss (and a bad image) does.

    Args:
        parser: The parser to extend.
        text_to_image: Also add `--strict_data`, which only the text-to-image trainer has.
    """
    group = parser.add_argument_group("Reliability")
    group.add_argument(
        "--skip_nonfinite_loss",
        action="store_true",
        help="Skip an update whose loss is NaN or inf (with a warning) instead of stopping the run. Without it a "
        "non-finite loss stops training with the step and the last good checkpoint named.",
    )
    if text_to_image:
        group.add_argument(
            "--strict_data",
            action="store_true",
            help="Stop before training when an image of the dataset cannot be read, naming it. Without it such "
            "images are skipped with a warning that names and counts them.",
        )


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def validate_text_to_image_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks the text-to-image arguments; on a bad value exits through `parser.error` (code 2).

    Args:
        args: The parsed arguments of `text_to_image_parser()`.
        parser: The parser that produced them, to report errors with its usage line.
    """
    estimating = args.estimate_memory is not None  # the estimate reads no data: data flags are not needed
    if args.dataset_name is None and args.train_data_dir is None and not estimating:
        parser.error("Need either a dataset name or a training folder. Pass --dataset_name or --train_data_dir.")
    if args.dataset_name is None and not estimating:  # upstream ignores --train_data_dir with --dataset_name
        _check_data_dir(parser, "--train_data_dir", args.train_data_dir)
    if args.resolution <= 0 or args.resolution % VAE_SCALE_FACTOR:
        lower = max(args.resolution // VAE_SCALE_FACTOR * VAE_SCALE_FACTOR, VAE_SCALE_FACTOR)
        parser.error(
            f"--resolution {args.resolution} must be a positive multiple of {VAE_SCALE_FACTOR} (the VAE downsamples"
            f" by {VAE_SCALE_FACTOR}): try {lower} or {lower + VAE_SCALE_FACTOR}."
        )
    _check_at_least(parser, "--train_batch_size", args.train_batch_size, 1)
    _check_at_least(parser, "--checkpointing_steps", args.checkpointing_steps, 1)
    _check_text_to_image_choices(parser, args)
    if args.text_encoder_lr is not None:
        _check_positive(parser, "--text_encoder_lr", args.text_encoder_lr)
        if not args.train_text_encoder:
            parser.error(
                f"--text_encoder_lr {args.text_encoder_lr} has no effect without --train_text_encoder: add"
                " --train_text_encoder or drop --text_encoder_lr."
            )
    if args.cache_text_encoder_outputs and args.train_text_encoder:
        parser.error(
            "--cache_text_encoder_outputs needs frozen text encoders, but --train_text_encoder trains them: drop one"
            " of the two."
        )
    _check_validation_loss_args(parser, args)
    if args.enable_npu_flash_attention and importlib.util.find_spec("torch_npu") is None:
        parser.error(
            "--enable_npu_flash_attention needs torch_npu extensions and is supported only on npu devices: drop it."
        )
    _check_model_reference(
        parser,
        "--pretrained_model_name_or_path",
        args.pretrained_model_name_or_path,
        TASK_TEXT_TO_IMAGE,
        revision=args.revision,
    )
    if args.pretrained_vae_model_name_or_path is not None:
        _check_model_reference(
            parser, "--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, TASK_TEXT_TO_IMAGE
        )
    text_encoders = ("text_encoder", "text_encoder_2") if args.train_text_encoder else ()
    _check_target_modules(parser, args.target_modules, adapted_roles=("unet", *text_encoders))
    _validate_shared_args(args, parser)


def validate_causal_lm_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks the causal-LM arguments; on a bad value exits through `parser.error` (code 2).

    Args:
        args: The parsed arguments of `causal_lm_parser()`.
        parser: The parser that produced them, to report errors with its usage line.
    """
    estimating = args.estimate_memory is not None  # the estimate reads no data: data flags are not needed
    if args.dataset_name is None and args.train_file is None and not estimating:
        parser.error("Need either a dataset name or a training/validation file. Pass --dataset_name or --train_file.")
    if args.dataset_name is None and not estimating:  # upstream reads the files only without --dataset_name
        _check_data_files(parser, args.train_file, args.validation_file)
    if args.model_name_or_path is None:
        parser.error(
            "--model_name_or_path is required: adapters are trained on a base model. Pass a local folder, a Hub id,"
            f" or {ARCHITECTURE_PREFIX}llama2-7b for a real-scale model with random weights (no download)."
        )
    _check_model_reference(parser, "--model_name_or_path", args.model_name_or_path, TASK_CAUSAL_LM)
    if args.block_size is not None:
        _check_at_least(parser, "--block_size", args.block_size, 1)
    _check_causal_lm_checkpointing_steps(parser, args.checkpointing_steps)
    if args.eval_steps is not None:
        _check_at_least(parser, "--eval_steps", args.eval_steps, 1)
    if not 0 <= args.validation_split_percentage < 100:
        parser.error(
            f"--validation_split_percentage {args.validation_split_percentage} must be in [0, 100): the share of"
            " the train split held out for evaluation when the data has no validation split."
        )
    _check_at_least(parser, "--per_device_train_batch_size", args.per_device_train_batch_size, 1)
    _check_at_least(parser, "--per_device_eval_batch_size", args.per_device_eval_batch_size, 1)
    _check_at_least(parser, "--loss_chunk_size", args.loss_chunk_size, 0)
    _check_target_modules(parser, args.target_modules, adapted_roles=("llm",))
    _validate_shared_args(args, parser)


def _validate_shared_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The checks of the groups both trainers share: adapter, memory, optimizer steps and checkpoints."""
    _check_at_least(parser, "--rank", args.rank, 1)
    if args.adapter_alpha is not None:
        _check_positive(parser, "--adapter_alpha", args.adapter_alpha)
    if args.conv_rank is not None:
        _check_at_least(parser, "--conv_rank", args.conv_rank, 1)
    if args.conv_alpha is not None:
        _check_positive(parser, "--conv_alpha", args.conv_alpha)
    if args.lokr_factor != -1 and args.lokr_factor < 1:
        parser.error(f"--lokr_factor {args.lokr_factor} must be -1 (automatic) or a factor >= 1.")
    if not 0.0 <= args.adapter_dropout < 1.0:
        parser.error(f"--adapter_dropout {args.adapter_dropout} must be in [0, 1): it is the probability of a drop.")
    _check_at_least(parser, "--memory_log_steps", args.memory_log_steps, 1)
    if args.estimate_memory is not None and args.estimate_memory < 0:
        parser.error(f"--estimate_memory {args.estimate_memory} must be a budget in GiB > 0, or given without one.")
    _check_at_least(parser, "--gradient_accumulation_steps", args.gradient_accumulation_steps, 1)
    if args.checkpoints_total_limit is not None:
        _check_at_least(parser, "--checkpoints_total_limit", args.checkpoints_total_limit, 1)
    _check_positive(parser, "--learning_rate", args.learning_rate)
    _check_hub_reachable(parser, args.push_to_hub)
    args.optimizer = _resolve_optimizer(parser, args.optimizer, args.use_8bit_adam)
    _check_resume_from_checkpoint(parser, args.resume_from_checkpoint, args.output_dir)
    _check_output_dir(parser, args.output_dir)
    _check_mixed_precision(parser, args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION"))


def _check_target_modules(parser: argparse.ArgumentParser, patterns, adapted_roles: tuple[str, ...]) -> None:
    """`--target_modules` role prefixes (`unet:to_q`) name a known role, and one this run adapts."""
    for pattern in patterns or ():
        try:
            role, _ = split_target_pattern(pattern)
        except ValueError as error:
            parser.error(f"--target_modules {error}")
        if role is not None and role not in adapted_roles:
            hint = " (add --train_text_encoder)" if role.startswith("text_encoder") and "unet" in adapted_roles else ""
            parser.error(
                f"--target_modules {pattern!r} narrows the {role}, which this run does not adapt{hint}; role prefixes"
                f" here: {', '.join(adapted_roles)}, or none to match in every model."
            )


def _check_hub_reachable(parser: argparse.ArgumentParser, push_to_hub: bool) -> None:
    """`--push_to_hub` uploads at the end of training: refuse it up front when the Hub is switched off."""
    if not push_to_hub:
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        parser.error(
            "--push_to_hub uploads the result to the Hub at the end of training, but HF_HUB_OFFLINE is set: unset"
            " HF_HUB_OFFLINE or drop --push_to_hub (the output dir can be uploaded later with `huggingface-cli"
            " upload`)."
        )


DEFAULT_VALIDATION_SPLIT = 0.1


def _check_validation_loss_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`--validation_loss_steps` at least 1; `--validation_split` in (0, 1), only with it (default 0.1)."""
    if args.validation_loss_steps is None:
        if args.validation_split is not None:
            parser.error(
                f"--validation_split {args.validation_split} holds data out for the held-out loss, which"
                " --validation_loss_steps switches on: add --validation_loss_steps N or drop --validation_split."
            )
        return
    _check_at_least(parser, "--validation_loss_steps", args.validation_loss_steps, 1)
    if args.validation_split is None:
        args.validation_split = DEFAULT_VALIDATION_SPLIT
    if not 0.0 < args.validation_split < 1.0:
        parser.error(f"--validation_split {args.validation_split} must be in (0, 1): the share of images held out.")


def _resolve_optimizer(parser: argparse.ArgumentParser, optimizer: str | None, use_8bit_adam: bool) -> str:
    """`--optimizer`, with upstream's `--use_8bit_adam` as the alias of `--optimizer adamw8bit` it is."""
    if not use_8bit_adam:
        return optimizer or "adamw"
    if optimizer not in (None, "adamw8bit"):
        parser.error(
            f"--use_8bit_adam selects --optimizer adamw8bit, which contradicts --optimizer {optimizer}: give one."
        )
    return "adamw8bit"


PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_text_to_image_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Upstream takes `--lr_scheduler` and `--prediction_type` as free strings and fails on a typo only once the
    models are loaded; here the typo is caught first, with the same accepted values."""
    from diffusers.optimization import SchedulerType

    schedulers = [scheduler.value for scheduler in SchedulerType]
    if args.lr_scheduler not in schedulers:
        parser.error(
            f"--lr_scheduler {args.lr_scheduler!r} is not a scheduler: choose one of {', '.join(schedulers)}."
        )
    if args.prediction_type is not None and args.prediction_type not in PREDICTION_TYPES:
        parser.error(
            f"--prediction_type {args.prediction_type!r} must be one of {', '.join(PREDICTION_TYPES)}, or left out"
            " for the scheduler's own."
        )


def _check_at_least(parser: argparse.ArgumentParser, flag: str, value: int, minimum: int) -> None:
    if value < minimum:
        parser.error(f"{flag} {value} must be >= {minimum}.")


def _check_positive(parser: argparse.ArgumentParser, flag: str, value: float) -> None:
    if not value > 0:
        parser.error(f"{flag} {value} must be > 0.")


def _check_output_dir(parser: argparse.ArgumentParser, output_dir: str | None) -> None:
    """`output_dir` is a writable folder, or can be created: its nearest existing ancestor is a writable folder."""
    if output_dir is None:
        return
    path = Path(output_dir).absolute()
    existing = next(candidate for candidate in (path, *path.parents) if candidate.exists())
    if not existing.is_dir():
        culprit = "is a file" if existing == path else f"cannot be created: {str(existing)!r} is a file"
        parser.error(f"--output_dir {output_dir!r} {culprit}. Pass a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        culprit = "is not writable" if existing == path else f"cannot be created: {str(existing)!r} is not writable"
        parser.error(f"--output_dir {output_dir!r} {culprit}. Pass a folder you can write to.")


def _uses_cuda() -> bool:
    """Whether accelerate will train on a CUDA device (it falls back to the CPU without one, or when told to)."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def _check_mixed_precision(parser: argparse.ArgumentParser, mixed_precision: str | None) -> None:
    """fp16 needs a CUDA device (on a CPU accelerate ignores it), bf16 a device that computes in it."""
    if mixed_precision == "fp16" and not _uses_cuda():
        parser.error(
            "--mixed_precision fp16 needs a CUDA GPU, and this run has none (on a CPU fp16 autocast does not exist):"
            " pass --mixed_precision bf16 or no."
        )
    if mixed_precision == "bf16" and _uses_cuda() and not torch.cuda.is_bf16_supported():
        parser.error(
            f"--mixed_precision bf16 is not supported by {torch.cuda.get_device_name()}: pass --mixed_precision fp16."
        )


def _check_data_dir(parser: argparse.ArgumentParser, flag: str, data_dir: str) -> None:
    path = Path(data_dir)
    if not path.is_dir():
        parser.error(f"{flag} {data_dir!r} is not a folder: pass a folder of images (imagefolder layout).")
    if not any(child.is_file() for child in path.rglob("*")):
        parser.error(f"{flag} {data_dir!r} holds no files: add images and a metadata.jsonl with their captions.")


def _check_data_files(parser: argparse.ArgumentParser, train_file: str | None, validation_file: str | None) -> None:
    """Train and validation files exist and share one extension `datasets` reads (both use the train file's loader)."""
    for flag, data_file in (("--train_file", train_file), ("--validation_file", validation_file)):
        if data_file is None:
            continue
        extension = data_file.rsplit(".", 1)[-1]
        if extension not in DATA_FILE_EXTENSIONS:
            parser.error(f"{flag} {data_file!r} should be a {', '.join(DATA_FILE_EXTENSIONS)} file.")
        if not Path(data_file).is_file():
            parser.error(f"{flag} {data_file!r} does not exist: check the path.")
    if validation_file is not None and validation_file.rsplit(".", 1)[-1] != train_file.rsplit(".", 1)[-1]:
        parser.error(
            f"--validation_file {validation_file!r} must have the extension of --train_file {train_file!r}: both are"
            " read with the train file's loader."
        )


def _check_model_reference(
    parser: argparse.ArgumentParser, flag: str, reference: str, task: str, revision: str | None = None
) -> None:
    """`reference` is `architecture:NAME` for an architecture of `task`, an existing local path, or a Hub id (offline:
    one in the local cache, at `revision`)."""
    if reference.startswith(ARCHITECTURE_PREFIX):
        name = reference[len(ARCHITECTURE_PREFIX) :]
        names_for_task = [spec.name for spec in ARCHITECTURES.values() if spec.task == task]
        if name not in names_for_task:
            choices = ", ".join(ARCHITECTURE_PREFIX + choice for choice in names_for_task)
            parser.error(f"{flag} {reference!r} is not a {task} architecture: choose one of {choices}.")
        return
    if Path(reference).exists():
        return
    _check_not_bare_architecture_name(parser, flag, reference)
    # run_clm_no_trainer.py still takes legacy ids without a namespace (`gpt2`); diffusers pipelines all have one.
    hub_id = _HUB_ID_OPTIONAL_NAMESPACE if task == TASK_CAUSAL_LM else _HUB_ID
    if not hub_id.match(reference) or "--" in reference or ".." in reference:
        parser.error(
            f"{flag} {reference!r} is neither an existing local path nor a Hub id of the form org/name: check the"
            f" path, or use {ARCHITECTURE_PREFIX}NAME for an architecture with random weights."
        )
    _check_cached_when_offline(parser, flag, reference, revision)


def _check_cached_when_offline(
    parser: argparse.ArgumentParser, flag: str, hub_id: str, revision: str | None = None
) -> None:
    """With HF_HUB_OFFLINE set, a Hub id must be in the local cache: otherwise loading it fails after the data set
    is built, with a connection error that does not say the path was the problem."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(hub_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError:
        parser.error(
            f"{flag} {hub_id!r} is not a local path (from {os.getcwd()}), and as a Hub id it is not in the local"
            f" cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: check the path, or download the model"
            " once with HF_HUB_OFFLINE unset."
        )


def _check_not_bare_architecture_name(parser: argparse.ArgumentParser, flag: str, reference: str) -> None:
    """Catches `sd15` meant as `architecture:sd15`, which would otherwise be looked up on the Hub."""
    if reference in ARCHITECTURES:
        parser.error(
            f"{flag} {reference!r} is not a local path; for the architecture with random weights pass"
            f" {ARCHITECTURE_PREFIX}{reference}."
        )


def _check_causal_lm_checkpointing_steps(parser: argparse.ArgumentParser, checkpointing_steps: str | None) -> None:
    if checkpointing_steps is None or checkpointing_steps == CHECKPOINT_EVERY_EPOCH:
        return
    if not checkpointing_steps.isdigit() or int(checkpointing_steps) < 1:
        parser.error(
            f"--checkpointing_steps {checkpointing_steps!r} must be a positive number of steps or"
            f" '{CHECKPOINT_EVERY_EPOCH}' (a checkpoint at the end of every epoch)."
        )


def _check_resume_from_checkpoint(
    parser: argparse.ArgumentParser, resume_from_checkpoint: str | None, output_dir: str | None
) -> None:
    """A checkpoint to resume from exists as given or, as diffusers looks it up, by name under `output_dir`."""
    if resume_from_checkpoint is None or resume_from_checkpoint == LATEST_CHECKPOINT:
        return
    candidates = [Path(resume_from_checkpoint)]
    if output_dir is not None:
        candidates.append(Path(output_dir) / Path(resume_from_checkpoint).name)
    if not any(candidate.exists() for candidate in candidates):
        parser.error(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist (neither as given nor under"
            f" --output_dir {output_dir!r}): pass a checkpoint folder, or '{LATEST_CHECKPOINT}' for the last one in"
            " --output_dir."
        )


# --------------------------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------------------------


def is_sdxl_pipeline(reference: str, revision: str | None = None) -> bool:
    """Whether `--pretrained_model_name_or_path` names a Stable Diffusion XL pipeline.

    Args:
        reference: `architecture:NAME` (SDXL when the architecture's family is `sdxl`), a local pipeline folder or
            a Hub id (SDXL when its `model_index.json` names a class of `SDXL_PIPELINE_CLASSES`).
        revision: The Hub revision to read `model_index.json` from.

    Returns:
        True for SDXL. False for anything else, including a Hub id whose `model_index.json` cannot be fetched: the
        model loading that follows reports that problem.
    """
    if reference.startswith(ARCHITECTURE_PREFIX):
        spec = ARCHITECTURES.get(reference[len(ARCHITECTURE_PREFIX) :])
        return spec is not None and spec.family == "sdxl"
    model_index = Path(reference) / "model_index.json"
    if not Path(reference).exists():
        try:
            from huggingface_hub import hf_hub_download

            model_index = Path(hf_hub_download(reference, "model_index.json", revision=revision))
        except Exception:  # offline, unknown id, no access: not ours to report here
            return False
    if not model_index.is_file():
        return False
    return json.loads(model_index.read_text(encoding="utf-8")).get("_class_name") in SDXL_PIPELINE_CLASSES


def adapter_config_from_args(args: argparse.Namespace) -> AdapterConfig:
    """The `AdapterConfig` the `Adapter (LyCORIS)` flags describe.

    Args:
        args: Parsed arguments holding the flags of `add_adapter_args`.

    Returns:
        The config `adapters.attach_adapter` takes; the `None`s (alphas, conv rank, targets) keep their defaults.
    """
    return AdapterConfig(
        algo=args.adapter,
        rank=args.rank,
        alpha=args.adapter_alpha,
        conv_rank=args.conv_rank,
        conv_alpha=args.conv_alpha,
        dropout=args.adapter_dropout,
        lokr_factor=args.lokr_factor,
        target_modules=tuple(args.target_modules) if args.target_modules else None,
    )


def parse_spec(path: str | Path) -> dict[str, dict[str, str]]:
    """Reads a flag spec (`tests/spec/*.flags`): one `--flag | attr=value; attr=value  (comment)` per line.

    Args:
        path: The spec file. Lines starting with `#` and blank lines are skipped; a trailing comment (two spaces,
            then a parenthesised note) is dropped.

    Returns:
        `{"--flag": {"type": "str", "default": "None", ...}}`, every value the raw string as written. A flag listed
        twice keeps its last line.
    """
    flags = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        flag, _, attributes = line.partition("|")
        attributes = _SPEC_COMMENT.sub("", attributes)
        flags[flag.strip()] = dict(_spec_attribute(item) for item in attributes.split(";") if item.strip())
    return flags


def _spec_attribute(item: str) -> tuple[str, str]:
    name, _, value = item.partition("=")
    return name.strip(), value.strip()


def spec_value(raw: str):
    """A spec value as Python: `'None'` -> None, `'1e-08'` -> 1e-08, `"'text'"` -> `'text'`, else the raw string.

    Args:
        raw: A value of `parse_spec`'s result.

    Returns:
        The literal the string spells, or `raw` itself when it is not a Python literal (`SchedulerType`).
    """
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parser_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every action of `parser`, by each of its option strings (`"--rank"`, `"-h"`, ...).

    Args:
        parser: The parser to read.

    Returns:
        Option string -> the `argparse.Action` it triggers; positional arguments are left out.
    """
    return {option: action for action in parser._actions for option in action.option_strings}
