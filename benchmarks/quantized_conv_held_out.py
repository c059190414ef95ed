"""Held-out loss of a UNet with quantized convolutions against linear-only quantization (issue 9's quality check).

The trainer's deterministic held-out loss (`--validation_loss_steps`: fixed split, noise and timesteps) is measured
for the same pipeline and data under each way of storing the UNet:

- unquantized;
- linear only: every convolution kept in full precision, i.e. what bitsandbytes alone gives;
- the default: every convolution quantized but `conv_in` and `conv_out`;
- every convolution quantized (`--quant_skip` with no pattern).

Each run reports the held-out loss of its quantized base against the unquantized base before training
(`quantization_loss_delta`) and the held-out loss after `--train_steps` LoRA steps: whether training recovers what
quantization cost. The tiny pipeline has random weights: the numbers compare the storage choices on the same problem
from the same start, they do not predict a pretrained model's image quality.

Run (from the repository root, a few minutes on 2 CPU cores):
    python -m diffusers_lowmem.tiny /tmp/tiny
    python benchmarks/quantized_conv_held_out.py --pretrained /tmp/tiny/sd \
        --output benchmarks/results/quantized-conv-held-out-cpu.md
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusers_lowmem import tiny


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, required=True, help="A local Stable Diffusion pipeline folder.")
    parser.add_argument("--modes", default="nf4,8bit", help="Comma-separated --quant modes.")
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--validation_split", type=float, default=0.25)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--work_dir", type=Path, default=None, help="Where the runs go (default: a temporary dir).")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file for the results.")
    return parser.parse_args(argv)


def convolution_names(pipeline: Path) -> list[str]:
    """Full names of the UNet's convolutions: the skip list that leaves quantization to linear layers only."""
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    return [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d))]


def variants(args) -> list[tuple[str, str | None, list[str] | None]]:
    """(label, --quant, --quant_skip) for each run; None: the trainer's default."""
    runs = [("unquantized", None, None)]
    for mode in args.modes.split(","):
        runs += [
            (f"{mode}, linear only", mode, convolution_names(args.pretrained)),
            (f"{mode}, convolutions but conv_in/conv_out (default)", mode, None),
            (f"{mode}, every convolution", mode, []),
        ]
    return runs


def run_trainer(args, data_dir: Path, output_dir: Path, quant: str | None, quant_skip: list[str] | None) -> dict:
    """One training run; returns its held-out losses, stored bytes and quantized convolution count."""
    command = [
        sys.executable, "-m", "diffusers_lowmem.train_text_to_image",
        "--pretrained_model_name_or_path", str(args.pretrained),
        "--train_data_dir", str(data_dir),
        "--resolution", str(args.resolution),
        "--train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--max_train_steps", str(args.train_steps),
        "--validation_loss_steps", str(args.train_steps),
        "--validation_split", str(args.validation_split),
        "--checkpointing_steps", str(10**9),
        "--seed", "0",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    if quant:
        command += ["--quant", quant]
    if quant_skip is not None:
        command += ["--quant_skip", *quant_skip]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((output_dir / "training_summary.json").read_text())
    report = json.loads((output_dir / "memory_report.json").read_text())
    held_out = summary["held_out_loss"]
    unet_report = summary["quantization"].get("unet", {})
    conv_layers = [layer for layer in unet_report.get("layers", []) if len(layer["shape"]) > 2]
    return {
        "before": held_out["before"],
        "after": held_out["after"],
        "delta": held_out.get("quantization_loss_delta"),
        "unet_weight_error": held_out.get("quantization_weight_error/unet"),
        "frozen_bytes": report["breakdown"]["frozen_weights"],
        "quantized_convs": len(conv_layers),
    }


def markdown(args, rows: list[tuple[str, dict]]) -> str:
    unquantized = rows[0][1]
    lines = [
        "# Quantized convolutions: held-out loss against linear-only quantization",
        "",
        f"- Device: CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}",
        f"- Pipeline: the tiny random-weight Stable Diffusion pipeline of `diffusers_lowmem.tiny` ({args.num_images}"
        f" captioned {args.resolution} px images, {args.validation_split:.0%} held out), LoRA rank 4,"
        f" {args.train_steps} steps, batch {args.batch_size}, learning rate {args.learning_rate:g}, seed 0.",
        "- Command: `python benchmarks/quantized_conv_held_out.py --pretrained TINY/sd"
        f" --train_steps {args.train_steps} --output ...` (TINY from `python -m diffusers_lowmem.tiny TINY`)",
        "- Held-out loss: the trainer's `--validation_loss_steps` (fixed split, noise and timesteps; plain MSE).",
        "  'delta' is the quantized base's held-out loss minus the unquantized base's, before training.",
        "",
        "| UNet storage | quantized convs | frozen weights (KiB) | mean UNet weight error | held-out before |"
        " delta | held-out after | after - unquantized after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in rows:
        error = "-" if row["unet_weight_error"] is None else f"{row['unet_weight_error']:.4f}"
        delta = "-" if row["delta"] is None else f"{row['delta']:+.5f}"
        lines.append(
            f"| {label} | {row['quantized_convs']} | {row['frozen_bytes'] / 1024:.1f} | {error} |"
            f" {row['before']:.5f} | {delta} | {row['after']:.5f} | {row['after'] - unquantized['after']:+.5f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="conv-held-out-"))
    data_dir = tiny.write_image_caption_folder(work_dir / "images", num_images=args.num_images)
    rows = []
    for index, (label, quant, quant_skip) in enumerate(variants(args)):
        row = run_trainer(args, data_dir, work_dir / f"run-{index}", quant, quant_skip)
        rows.append((label, row))
        print(f"{label}: {row}", flush=True)
    text = markdown(args, rows)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
