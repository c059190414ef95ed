"""Llama QLoRA memory by `--estimate_memory`, beside the published figures of torchtune and unsloth.

Every number is the causal-LM trainer's own `--estimate_memory` (its setup and two optimizer steps replayed on fake
tensors: `torch.cuda.max_memory_allocated` as the run would reach it), for the issue's configuration: bf16, gradient
checkpointing, nf4 base (`lm_head` kept in bf16, as the trainer's default), LoRA rank 8 on every linear layer, with
and without `--offload_activations` and `--loss_chunk_size 0` (upstream's loss on the full logits). "Fits 8 GiB"
adds the device overhead `estimate.verdict` adds (CUDA context, cuBLAS workspace). The longest sequence that fits
at batch 1 is found by bisection on the estimate, to a multiple of `--step` tokens.

Run (each estimate of Llama-3-8B takes about a minute on one CPU core):

    OMP_NUM_THREADS=1 python benchmarks/long_context_estimate.py \\
        --output benchmarks/results/long-context-estimate.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

from accelerate.state import AcceleratorState

from diffusers_lowmem import activation_offload, estimate, train_causal_lm

GIB = 1 << 30
BASE_FLAGS = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--quant", "nf4", "--adapter", "lora"]
BASE_FLAGS += ["--rank", "8", "--seed", "0", "--estimate_memory"]
VARIANTS = {
    "upstream loss": ["--loss_chunk_size", "0"],
    "chunked loss (default)": [],
    "chunked loss + --offload_activations": ["--offload_activations"],
}
# Published figures, as their sources state them.
PUBLISHED = [
    (
        "torchtune",
        "Llama-3.1-8B QLoRA, batch 2 x 2,048 packed tokens, torch.compile: 7.4 GiB peak",
        "https://github.com/pytorch/torchtune (README, memory and training speed table)",
    ),
    (
        "unsloth",
        "Llama-3.1-8B QLoRA rank 32, batch 1: longest sequence on an 8 GB GPU 2,972 tokens (Hugging Face + FA2: OOM)",
        "https://github.com/unslothai/unsloth (README, context length benchmarks); https://unsloth.ai/blog/llama3-3",
    ),
    (
        "torchtune",
        "chunked cross-entropy saves about 16 %, activation offloading about 5 % (Llama-3.2-3B)",
        "https://docs.pytorch.org/torchtune/stable/tutorials/memory_optimizations.html",
    ),
]


def estimate_peak(architecture: str, batch_size: int, seq_len: int, extra: list[str], cache: dict) -> int:
    """The estimated peak bytes of one configuration (cached in `cache` by its command line)."""
    argv = ["--model_name_or_path", f"architecture:{architecture}", "--block_size", str(seq_len)]
    argv += ["--per_device_train_batch_size", str(batch_size), *BASE_FLAGS, *extra]
    key = " ".join(argv)
    if key not in cache:
        AcceleratorState._reset_state(reset_partial_state=True)
        args = train_causal_lm.parse_args(argv)
        # On a CPU the fake run's device is the host: let the estimate see offloaded activations leave it.
        offload = activation_offload.simulated_host() if args.offload_activations else contextlib.nullcontext()
        started = time.perf_counter()
        with offload:
            report = train_causal_lm.main(args)
        cache[key] = int(report["peak_bytes"])
        logging.info(f"{key}: {cache[key] / GIB:.2f} GiB in {time.perf_counter() - started:.0f} s")
    return cache[key]


def fits(peak_bytes: int, budget_gib: float) -> bool:
    return estimate.verdict(peak_bytes, budget_gib)["fits"]


def longest_fitting(architecture, extra, budget_gib, low, high, step, cache) -> tuple[int, int]:
    """Bisection on the estimate: the longest multiple of `step` in [low, high] that fits (low must fit), and its
    peak; `high` itself when it fits."""
    if fits(estimate_peak(architecture, 1, high, extra, cache), budget_gib):
        return high, estimate_peak(architecture, 1, high, extra, cache)
    if not fits(estimate_peak(architecture, 1, low, extra, cache), budget_gib):
        return 0, estimate_peak(architecture, 1, low, extra, cache)
    low, high = low // step, high // step  # in steps; low fits, high does not
    while high - low > 1:
        middle = (low + high) // 2
        if fits(estimate_peak(architecture, 1, middle * step, extra, cache), budget_gib):
            low = middle
        else:
            high = middle
    return low * step, estimate_peak(architecture, 1, low * step, extra, cache)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="Write the markdown table here.")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/long-context-estimate.json"), help="Estimates.")
    parser.add_argument("--budget", type=float, default=8.0, help="GiB for the longest-sequence search.")
    parser.add_argument("--step", type=int, default=256, help="Sequence-length resolution of the bisection.")
    parser.add_argument("--max_seq_len", type=int, default=8192, help="Upper end of the search (Llama-3: 8,192).")
    parser.add_argument(
        "--longest_variants",
        nargs="*",
        default=["chunked loss (default)", "chunked loss + --offload_activations"],
        help="Variants whose longest fitting sequence is searched.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("diffusers_lowmem").setLevel(logging.WARNING)
    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}

    def remember(function, *function_args):
        result = function(*function_args, cache)
        args.cache.write_text(json.dumps(cache, indent=1))
        return result

    rows = []
    for architecture, batch_size, seq_len, target in (("llama3-8b", 2, 2048, 7.0), ("llama2-7b", 1, 512, 4.2)):
        for name, extra in VARIANTS.items():
            peak = remember(estimate_peak, architecture, batch_size, seq_len, extra)
            verdict = "yes" if peak <= target * GIB else "no"
            rows.append(
                f"| {architecture} | {batch_size} x {seq_len} | {name} | {peak / GIB:.2f} | <= {target} | {verdict} |"
            )
    longest_rows = []
    for name in args.longest_variants:
        length, peak = remember(
            longest_fitting, "llama3-8b", VARIANTS[name], args.budget, 2048, args.max_seq_len, args.step
        )
        shown = f">= {length:,} (the search's upper end)" if length == args.max_seq_len else f"{length:,}"
        longest_rows.append(f"| llama3-8b | 1 | {name} | {shown} | {peak / GIB:.2f} |")

    overhead = sum(estimate.device_overhead_bytes().values()) / GIB
    lines = [
        "# Llama QLoRA memory by --estimate_memory, beside published figures",
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/long_context_estimate.py --output "
        "benchmarks/results/long-context-estimate.md` (estimates on fake tensors: no GPU, weights or data; the "
        "machine does not matter).",
        "",
        "Each row: `python -m diffusers_lowmem.train_causal_lm --model_name_or_path architecture:NAME --block_size "
        f"SEQ --per_device_train_batch_size BATCH {' '.join(BASE_FLAGS)}` plus the variant's flags. Peaks are "
        "`torch.cuda.max_memory_allocated` as estimated (GiB).",
        "",
        "| model | batch x tokens | variant | estimated peak (GiB) | issue's target | meets it |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"## Longest sequence fitting {args.budget:g} GiB at batch 1 (bisection to {args.step} tokens)",
        "",
        f"Fits: estimated peak + {overhead:.2f} GiB device overhead (CUDA context, cuBLAS workspace) <= "
        f"{args.budget:g} GiB. The search stops at {args.max_seq_len:,} tokens (Llama-3-8B's "
        "max_position_embeddings).",
        "",
        "| model | batch | variant | longest sequence (tokens) | its estimated peak (GiB) |",
        "| --- | --- | --- | --- | --- |",
        *longest_rows,
        "",
        "## Published figures",
        "",
        "| who | figure | source |",
        "| --- | --- | --- |",
        *[f"| {who} | {figure} | {source} |" for who, figure, source in PUBLISHED],
        "",
        "Differences to keep in mind: torchtune and unsloth measured Llama-3.1-8B on a GPU (reserved or allocated "
        "peaks as their tools report them), unsloth with LoRA rank 32; these rows are estimates of the allocated "
        "peak with rank 8 on Llama-3-8B (same shapes as 3.1-8B but 8,192 positions).",
        "",
    ]
    report = "\n".join(lines)
    if args.output is not None:
        args.output.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
