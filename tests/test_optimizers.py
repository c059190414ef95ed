"""`--optimizer` in both trainers: each optimizer trains the tiny models, the memory report counts its state as stored
(8-bit moments about a quarter of fp32's), upstream's `--use_8bit_adam` is the alias it is, and paged optimizers fall
back to their unpaged twins, with one warning, where nothing can be paged."""

import json
import logging
import math
import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_train_causal_lm import train_argv as causal_lm_argv
from test_train_text_to_image import train_argv as text_to_image_argv

from diffusers_lowmem import adapters, train_causal_lm, train_text_to_image, training

# bitsandbytes keeps 32-bit state for tensors under this many elements, and quantizes larger ones in blocks of 256
# with one fp32 absmax each; every 8-bit state shares one 256-entry fp32 quantization map per state slot.
MIN_8BIT_NUMEL = 4096
BLOCKSIZE = 256
QMAP_BYTES = 256 * 4
STATE_SLOTS = {"adamw": 2, "adamw8bit": 2, "paged_adamw8bit": 2, "paged_adamw32bit": 2, "lion8bit": 1}
EIGHT_BIT = {"adamw8bit", "paged_adamw8bit", "lion8bit"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a separate `accelerate launch` would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def expected_state_bytes(optimizer: str, numels: list[int]) -> int:
    """Optimizer-state bytes worked out from the parameter sizes alone, the way each optimizer lays out its state."""
    slots = STATE_SLOTS[optimizer]
    if optimizer == "adamw":  # torch: two fp32 moments and a 0-d fp32 step per parameter
        return sum(slots * 4 * numel + 4 for numel in numels)
    total, any_8bit = 0, False
    for numel in numels:
        if optimizer in EIGHT_BIT and numel >= MIN_8BIT_NUMEL:
            total += slots * (numel + 4 * math.ceil(numel / BLOCKSIZE))
            any_8bit = True
        else:
            total += slots * 4 * numel
    return total + (slots * QMAP_BYTES if any_8bit else 0)


def saved_adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter file a run leaves: the LyCORIS file of the causal LM, the kohya-format file of text-to-image."""
    for name in (adapters.LYCORIS_WEIGHT_NAME, adapters.DIFFUSERS_WEIGHT_NAME):
        if (output_dir / name).is_file():
            return load_file(output_dir / name)
    raise FileNotFoundError(f"no adapter weights in {output_dir}")


def trained_numels(output_dir: Path) -> list[int]:
    """Sizes of the adapter's trained tensors, from the saved weights (LyCORIS' `alpha` scalars are not trained)."""
    weights = saved_adapter(output_dir)
    return [tensor.numel() for key, tensor in weights.items() if not key.endswith(".alpha")]


def check_learned(output_dir: Path) -> None:
    """LoRA's up factors start at zero: every one nonzero after training means every layer was updated."""
    up_weights = [tensor for key, tensor in saved_adapter(output_dir).items() if key.endswith("lora_up.weight")]
    assert up_weights and all(tensor.abs().max() > 0 for tensor in up_weights)


def check_state_bytes(output_dir: Path, optimizer: str) -> dict:
    report = json.loads((output_dir / "memory_report.json").read_text())
    numels = trained_numels(output_dir)
    assert sum(numels) == report["params"]["trainable"]
    assert report["breakdown"]["optimizer_state"] == expected_state_bytes(optimizer, numels)
    return report


@pytest.mark.parametrize("optimizer", list(training.OPTIMIZERS))
def test_each_optimizer_trains_the_tiny_llama_and_its_state_is_counted_as_stored(
    optimizer, tiny_llama_path, tiny_text_path, tmp_path
):
    # Rank 64 makes the larger LoRA factors (64x128, 64x64) big enough for 8-bit state; the rest stay 32-bit.
    argv = causal_lm_argv(tiny_llama_path, tiny_text_path, tmp_path, "--optimizer", optimizer, "--rank", "64")
    argv += ["--max_train_steps", "3"]
    summary = train_causal_lm.main(train_causal_lm.parse_args(argv))
    assert summary["global_step"] == 3 and math.isfinite(summary["loss"]) and math.isfinite(summary["perplexity"])
    check_learned(tmp_path)
    check_state_bytes(tmp_path, optimizer)
    numels = trained_numels(tmp_path)
    assert any(n >= MIN_8BIT_NUMEL for n in numels) and any(n < MIN_8BIT_NUMEL for n in numels)


def test_eight_bit_state_is_about_a_quarter_of_adamw(tiny_llama_path, tiny_text_path, tmp_path):
    """On adapter factors all large enough for 8-bit state: 2 bytes + absmax per element against 8 bytes."""
    state_bytes = {}
    for optimizer in ("adamw", "adamw8bit"):
        output_dir = tmp_path / optimizer
        argv = causal_lm_argv(tiny_llama_path, tiny_text_path, output_dir, "--optimizer", optimizer, "--rank", "64")
        argv += ["--max_train_steps", "1", "--target_modules", "down_proj"]
        train_causal_lm.main(train_causal_lm.parse_args(argv))
        AcceleratorState._reset_state(reset_partial_state=True)
        state_bytes[optimizer] = check_state_bytes(output_dir, optimizer)["breakdown"]["optimizer_state"]
    assert all(n >= MIN_8BIT_NUMEL for n in trained_numels(tmp_path / "adamw8bit"))
    assert 0.25 <= state_bytes["adamw8bit"] / state_bytes["adamw"] < 0.27


@pytest.mark.parametrize("optimizer", list(training.OPTIMIZERS))
def test_each_optimizer_trains_the_tiny_unet_and_its_state_is_counted_as_stored(
    optimizer, tiny_sd_path, tiny_images_path, tmp_path
):
    argv = text_to_image_argv(tiny_sd_path, tiny_images_path, tmp_path, "--optimizer", optimizer, "--rank", "64")
    argv += ["--quant", "nf4", "--max_train_steps", "2"]
    summary = train_text_to_image.main(train_text_to_image.parse_args(argv))
    assert summary["global_step"] == 2 and math.isfinite(summary["loss"])
    check_learned(tmp_path)
    check_state_bytes(tmp_path, optimizer)


def test_use_8bit_adam_is_the_alias_of_adamw8bit():
    base = ["--model_name_or_path", "architecture:tiny-llama", "--dataset_name", "x/y"]
    assert train_causal_lm.parse_args(base).optimizer == "adamw"
    assert train_causal_lm.parse_args(base + ["--use_8bit_adam"]).optimizer == "adamw8bit"
    assert train_causal_lm.parse_args(base + ["--use_8bit_adam", "--optimizer", "adamw8bit"]).optimizer == "adamw8bit"
    t2i = ["--pretrained_model_name_or_path", "architecture:tiny-sd", "--dataset_name", "x/y"]
    assert train_text_to_image.parse_args(t2i + ["--use_8bit_adam"]).optimizer == "adamw8bit"


@pytest.mark.parametrize("flags", [["--optimizer", "lion8bit"], ["--optimizer", "adamw"]])
def test_use_8bit_adam_with_another_optimizer_is_refused(flags, capsys):
    base = ["--model_name_or_path", "architecture:tiny-llama", "--dataset_name", "x/y", "--use_8bit_adam"]
    with pytest.raises(SystemExit) as exit_info:
        train_causal_lm.parse_args(base + flags)
    assert exit_info.value.code == 2
    assert f"contradicts --optimizer {flags[1]}" in capsys.readouterr().err


def test_an_unknown_optimizer_fails_in_the_parser(capsys):
    with pytest.raises(SystemExit):
        train_causal_lm.parse_args(
            ["--model_name_or_path", "architecture:tiny-llama", "--dataset_name", "x/y", "--optimizer", "sgd"]
        )
    assert "--optimizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "optimizer, unpaged_class", [("paged_adamw8bit", bnb.optim.AdamW8bit), ("paged_adamw32bit", bnb.optim.AdamW32bit)]
)
def test_paged_optimizers_fall_back_with_one_warning_off_cuda(optimizer, unpaged_class, caplog):
    parameter = torch.nn.Parameter(torch.randn(64, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bitsandbytes' own "not supported on CPU" warning must not come on top
        with caplog.at_level(logging.WARNING, logger="diffusers_lowmem.training"):
            created = training.create_optimizer([parameter], optimizer, 1e-3, 0.0, device="cpu")
        parameter.grad = torch.ones_like(parameter)
        created.step()
    assert type(created) is unpaged_class and not created.is_paged
    warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_logged) == 1 and optimizer in warnings_logged[0].getMessage()
    assert created.state[parameter]["state1"].dtype == (torch.uint8 if "8bit" in optimizer else torch.float32)


def test_optimizer_options_reach_the_optimizer():
    parameter = torch.nn.Parameter(torch.randn(8))
    adamw = training.create_optimizer([parameter], "adamw", 2e-4, 0.1, betas=(0.8, 0.95), eps=1e-6)
    assert type(adamw) is torch.optim.AdamW
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6
    assert adamw.defaults["lr"] == 2e-4 and adamw.defaults["weight_decay"] == 0.1
    lion = training.create_optimizer([parameter], "lion8bit", 1e-4, 0.0, betas=(0.9, 0.99), eps=1e-6)
    assert type(lion) is bnb.optim.Lion8bit and lion.defaults["betas"] == (0.9, 0.99)
    default_betas = training.create_optimizer([parameter], "adamw8bit", 1e-4, 0.0)
    assert default_betas.defaults["betas"] == (0.9, 0.999) and default_betas.defaults["eps"] == 1e-8
