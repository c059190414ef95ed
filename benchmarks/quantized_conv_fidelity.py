"""Stored bytes and output error of the SD 1.5 UNet with quantized convolutions, and which convolutions to skip.

Issue 9: `--quant nf4` quantizes only `nn.Linear`, 31 % of the SD 1.5 UNet; storing the convolutions too
(`quantize_model(..., convolutions=True)`) should bring it near the LLM case. This measures, on the real SD 1.5 UNet
architecture with diffusers' default initialisation (no pretrained weights are available here), for NF4 and 8-bit:

- the UNet's stored bytes with linear layers only, with every convolution, and with every convolution but one group;
- the relative error of the UNet's output against the unquantized UNet on fixed inputs (latents of a 512 px image,
  three timesteps, random text embeddings), the quality proxy the issue allows until a held-out loss exists.

Leaving one group of convolutions unquantized (`conv_in`, `conv_out`, shortcuts, down/up-samplers, time embedding)
shows how much of the error that group causes for how many bytes: the default skip list is chosen from that.
Random weights are not a trained model: the errors rank the groups, they do not predict image quality.

Run (from the repository root, about 10 minutes on 2 CPU cores, 16 GB RAM):
    python benchmarks/quantized_conv_fidelity.py --output benchmarks/results/quantized-conv-fidelity-cpu.md
"""

import argparse
import copy
import gc
import platform
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusers_lowmem.architectures import load_config
from diffusers_lowmem.memory import stored_bytes
from diffusers_lowmem.quantization import quantize_model

GROUPS = {
    "conv_in": ["conv_in"],
    "conv_out": ["conv_out"],
    "shortcuts": ["*conv_shortcut"],
    "samplers": ["*downsamplers*", "*upsamplers*"],
    "transformer proj_in/out": ["*proj_in", "*proj_out"],
}
TIMESTEPS = (50, 500, 950)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="sd15", help="A text-to-image architecture of the package.")
    parser.add_argument("--latent_size", type=int, default=64, help="64 = a 512 px image.")
    parser.add_argument("--modes", default="nf4,8bit")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file for the results.")
    return parser.parse_args(argv)


@torch.no_grad()
def unet_outputs(unet, inputs) -> list[torch.Tensor]:
    return [unet(latents, timestep, encoder, return_dict=False)[0] for latents, timestep, encoder in inputs]


def relative_error(outputs, references) -> float:
    error = sum((output - reference).double().pow(2).sum() for output, reference in zip(outputs, references))
    norm = sum(reference.double().pow(2).sum() for reference in references)
    return float((error / norm).sqrt())


def measure(reference_unet, references, inputs, mode, convolutions, skip) -> dict:
    unet = copy.deepcopy(reference_unet)
    started = time.perf_counter()
    quantize_model(unet, mode, convolutions=convolutions, skip=skip, compute_errors=False)
    quantize_seconds = time.perf_counter() - started
    result = {
        "bytes": stored_bytes(unet),
        "error": relative_error(unet_outputs(unet, inputs), references),
        "quantize_s": quantize_seconds,
    }
    del unet
    gc.collect()
    return result


def main(args) -> str:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_config(args.architecture, "unet")).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    size, channels = args.latent_size, unet.config.in_channels
    inputs = [
        (
            torch.randn(1, channels, size, size, generator=generator),
            torch.tensor([timestep]),
            torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator),
        )
        for timestep in TIMESTEPS
    ]
    references = unet_outputs(unet, inputs)
    float_bytes = stored_bytes(unet)
    rows = []
    for mode in args.modes.split(","):
        variants = [("linear layers only", False, []), ("every convolution too", True, [])]
        variants += [(f"all but {group}", True, patterns) for group, patterns in GROUPS.items()]
        variants.append(("all but conv_in, conv_out", True, GROUPS["conv_in"] + GROUPS["conv_out"]))
        for label, convolutions, skip in variants:
            result = measure(unet, references, inputs, mode, convolutions, skip)
            rows.append((mode, label, result))
            print(f"{mode:5s} {label:32s} {result['bytes'] / 2**20:9.1f} MiB  error {result['error']:.4f}", flush=True)
    return render(args, float_bytes, rows)


def render(args, float_bytes, rows) -> str:
    lines = [
        f"# Quantized convolutions: {args.architecture} UNet bytes and output error (CPU)",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}.",
        "- Command: `python benchmarks/quantized_conv_fidelity.py"
        + (f" --output {args.output}`" if args.output else "`"),
        f"- UNet in fp32: {float_bytes / 2**20:,.1f} MiB; bf16 would be half. Output error: relative Frobenius "
        f"error of the UNet's output against the fp32 UNet, over latents of {args.latent_size}x{args.latent_size} "
        f"at timesteps {', '.join(map(str, TIMESTEPS))}, random text embeddings; diffusers' default initialisation "
        "(random weights: the errors rank choices, they do not predict image quality).",
        "",
        "| quant | quantized | stored MiB | vs fp32 | output error | quantize s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, label, result in rows:
        lines.append(
            f"| {mode} | {label} | {result['bytes'] / 2**20:,.1f} | {result['bytes'] / float_bytes:.3f} | "
            f"{result['error']:.4f} | {result['quantize_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    arguments = parse_args()
    report = main(arguments)
    print(report)
    if arguments.output:
        arguments.output.write_text(report)
