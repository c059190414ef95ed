"""Overhead of per-step memory logging (`MemoryTracker.log_step`) on a small training loop, TensorBoard on.

Trains one MLP and times each step in three variants: the baseline, which logs the loss through `accelerator.log`
every step as the trainers do; the same plus `log_step` of a tracker without an accelerator (reads the memory
statistics only); and the same plus `log_step` of the tracker logging to TensorBoard (the trainers' setup). The
variants alternate in blocks of `--block` steps within each round, so that drift of the machine hits all alike;
each round gives each variant `--steps` steps. Overheads are the median over rounds of each round's
(variant median − baseline median) / baseline median; the median time of the `log_step` call itself, relative to
the baseline step, is the steadier estimate.

Run (from the repository root):
    python benchmarks/memory_logging_overhead.py --output benchmarks/results/memory-logging-overhead-cpu.md
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from diffusers_lowmem.memory import MemoryTracker

WARMUP_STEPS = 20
BASELINE, STATS_ONLY, TENSORBOARD = "baseline", "stats_only", "tensorboard"
VARIANTS = (BASELINE, STATS_ONLY, TENSORBOARD)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Timed steps of each variant per round.")
    parser.add_argument("--repeats", type=int, default=7, help="Rounds.")
    parser.add_argument("--block", type=int, default=20, help="Steps of one variant before switching to the next.")
    parser.add_argument("--width", type=int, default=256, help="Hidden width of the MLP (sets the step time).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings steady).")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to see the cost of the CUDA statistics.")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file for the results.")
    return parser.parse_args(argv)


def build_model(width: int) -> nn.Module:
    """A small MLP whose step takes a few milliseconds on one CPU thread."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
    )


class Loop:
    """The training loop under test: model, optimizer, batch, accelerator, and the two trackers."""

    def __init__(self, args: argparse.Namespace, project_dir: str):
        torch.set_num_threads(args.threads)
        self.accelerator = Accelerator(cpu=args.device == "cpu", log_with="tensorboard", project_dir=project_dir)
        self.accelerator.init_trackers("memory-logging-overhead")
        device = self.accelerator.device
        self.model = build_model(args.width).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.batch = torch.randn(args.batch_size, args.width, device=device)
        self.trackers = {
            STATS_ONLY: MemoryTracker(device, None, log_every=1),
            TENSORBOARD: MemoryTracker(
                device, self.accelerator, log_every=1, models=[self.model], optimizer=self.optimizer
            ),
        }
        self.step = 0

    def run(self, steps: int, variant: str) -> tuple[list[float], list[float]]:
        """Trains `steps` steps; returns the step times and the `log_step` call times, in seconds."""
        tracker = self.trackers.get(variant)
        step_times, log_times = [], []
        for _ in range(steps):
            self.step += 1
            start = time.perf_counter()
            loss = self.model(self.batch).square().mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            # `loss.item()` synchronises the device, so CUDA step times are complete.
            self.accelerator.log({"train_loss": loss.item()}, step=self.step)
            if tracker is not None:
                log_start = time.perf_counter()
                tracker.log_step(self.step)
                log_times.append(time.perf_counter() - log_start)
            step_times.append(time.perf_counter() - start)
        return step_times, log_times


def measure(args: argparse.Namespace, project_dir: str) -> dict:
    """Runs the rounds; returns per-variant medians and overheads (seconds, fractions) and the milestone cost."""
    loop = Loop(args, project_dir)
    for variant in VARIANTS:
        loop.run(WARMUP_STEPS, variant)

    round_medians = {variant: [] for variant in VARIANTS}
    call_times = {STATS_ONLY: [], TENSORBOARD: []}
    blocks = max(1, args.steps // args.block)
    for round_index in range(args.repeats):
        step_times = {variant: [] for variant in VARIANTS}
        for block_index in range(blocks * len(VARIANTS)):
            # Rotate the order each round, so that no variant always follows the same one.
            variant = VARIANTS[(block_index + round_index) % len(VARIANTS)]
            times, log_times = loop.run(args.block, variant)
            step_times[variant].extend(times)
            call_times.get(variant, []).extend(log_times)
        for variant in VARIANTS:
            round_medians[variant].append(statistics.median(step_times[variant]))

    tensorboard_tracker = loop.trackers[TENSORBOARD]
    logged_tags = sorted(tensorboard_tracker.log_step(loop.step))
    milestone_start = time.perf_counter()
    tensorboard_tracker.milestone("after_benchmark", step=loop.step)
    milestone_time = time.perf_counter() - milestone_start
    loop.accelerator.end_training()

    baseline = round_medians[BASELINE]
    results = {
        "step": {variant: statistics.median(medians) for variant, medians in round_medians.items()},
        "overheads": {
            variant: [(medians[i] - baseline[i]) / baseline[i] for i in range(args.repeats)]
            for variant, medians in round_medians.items()
            if variant != BASELINE
        },
        "call": {variant: statistics.median(times) for variant, times in call_times.items()},
        "call_p90": {variant: statistics.quantiles(times, n=10)[-1] for variant, times in call_times.items()},
        "milestone": milestone_time,
        "logged_tags": logged_tags,
        "device": str(loop.accelerator.device),
        "parameters": sum(parameter.numel() for parameter in loop.model.parameters()),
    }
    results["overhead"] = {variant: statistics.median(values) for variant, values in results["overheads"].items()}
    return results


def results_markdown(args: argparse.Namespace, results: dict) -> str:
    """The results as a markdown page: command, setup, machine, table."""
    baseline = results["step"][BASELINE]
    command = "python benchmarks/memory_logging_overhead.py " + " ".join(sys.argv[1:])
    rows = [("step time, baseline (loss logged to TensorBoard)", f"{1e3 * baseline:.3f} ms")]
    for variant, label in (
        (STATS_ONLY, "+ `log_step`, no trackers (statistics only)"),
        (TENSORBOARD, "+ `log_step` to TensorBoard"),
    ):
        per_round = ", ".join(f"{100 * overhead:+.1f}" for overhead in results["overheads"][variant])
        rows += [
            (f"step time, {label}", f"{1e3 * results['step'][variant]:.3f} ms"),
            (f"overhead, {label}: median over rounds", f"**{100 * results['overhead'][variant]:+.2f} %**"),
            ("&nbsp;&nbsp;each round", f"{per_round} %"),
            (
                f"`log_step` call, {label}: median (p90)",
                f"{1e6 * results['call'][variant]:.1f} µs ({1e6 * results['call_p90'][variant]:.1f} µs)",
            ),
            (f"`log_step` call / baseline step, {label}", f"**{100 * results['call'][variant] / baseline:.2f} %**"),
        ]
    rows.append(
        ("one `milestone` (breakdown walk + `accelerator.log`), for reference", f"{1e3 * results['milestone']:.2f} ms")
    )
    table = "\n".join(["| measure | value |", "| --- | ---: |"] + [f"| {name} | {value} |" for name, value in rows])
    return f"""# Memory logging overhead, {results["device"]}

Command (from the repository root):

```
{command}
```

Setup: {args.repeats} rounds; in each, every variant runs {args.steps} steps in alternating blocks of {args.block}
(after {WARMUP_STEPS} warm-up steps each, once). MLP of {results["parameters"]:,} parameters, batch {args.batch_size},
AdamW, {args.threads} torch thread(s). `accelerate.Accelerator(log_with="tensorboard")`, trackers initialised; every
variant logs the loss through `accelerator.log` each step. Device `{results["device"]}`; `log_step` logs
{", ".join(f"`{tag}`" for tag in results["logged_tags"])}.

Machine: {platform.machine()}, {_cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}.

{table}

Target: under 2 % of the step time.
"""


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None) -> dict:
    """Runs the benchmark, prints the results and writes them to `--output`."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as project_dir:
        results = measure(args, project_dir)
    page = results_markdown(args, results)
    print(page)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(page)
    return results


if __name__ == "__main__":
    main()
