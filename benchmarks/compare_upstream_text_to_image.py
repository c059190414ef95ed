"""Wall time and peak RSS of `diffusers_lowmem.train_text_to_image` against diffusers' own LoRA example.

Issue 3 ("Speed"): on the same tiny pipeline, data and flags, with `--adapter lora` and no quantization, a run of
ours costs no more wall time and peak RSS than diffusers' `examples/text_to_image/train_text_to_image_lora.py`,
within 10 %.

diffusers' example is not part of the diffusers wheel: point `--upstream_script` at
`examples/text_to_image/train_text_to_image_lora.py` of a diffusers checkout whose version matches the installed
diffusers (nothing of it is copied into this repository). The example imports torchvision, so both scripts run
under `--python`, the interpreter of one environment that has torchvision, diffusers_lowmem and the example's
requirements (peft, datasets, tensorboard); the default is the interpreter running this script.

Each run is a fresh process (`PYTHON SCRIPT FLAGS`, no launcher, dataloader in the main process), with the same
environment for both: `HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`, and `OMP_NUM_THREADS`/`MKL_NUM_THREADS` set to
`--threads`. Wall time is measured around the process; peak RSS is the kernel's high-water mark of the process
(`ru_maxrss` from `wait4`, the number `/usr/bin/time -v` prints as "Maximum resident set size"), and a psutil
sampling of the whole process tree every 200 ms is reported beside it. The time of the training loop alone is read
from the final "Steps" progress bar of each log (both scripts print one), to tell start-up from step cost. After
`--warmup` unmeasured runs of each (page cache, datasets cache), the scripts rotate order over `--repeats` rounds;
medians are compared.

Upstream's LoRA targets the UNet's attention projections only (`to_k`, `to_q`, `to_v`, `to_out.0`); ours, by
default, every linear layer of the transformer blocks (also the feed-forward layers and `proj_in`/`proj_out`: a
product choice, more layers and trainable parameters). The gated comparison therefore runs ours with
`--target_modules to_k to_q to_v to_out.0`, the same layers and parameter count as upstream; ours with its default
targets is measured and reported beside it, not gated.

The tiny Stable Diffusion pipeline and image folder come from `python -m diffusers_lowmem.tiny` (built once under
`--work_dir`). The exit status is 1 when a median ratio (ours / upstream) exceeds `--tolerance`.

Run (from the repository root; about 12 minutes with the defaults on a 2-core machine):
    python benchmarks/compare_upstream_text_to_image.py \\
        --upstream_script ~/src/diffusers/examples/text_to_image/train_text_to_image_lora.py \\
        --python /path/to/venv-with-torchvision/bin/python \\
        --output benchmarks/results/upstream-comparison-cpu.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

UPSTREAM, OURS = "upstream", "ours"
UPSTREAM_PATH_IN_DIFFUSERS = "examples/text_to_image/train_text_to_image_lora.py"
VERSION_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "datasets", "lycoris")
UPSTREAM_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
DEFAULT_TARGETS_LABEL = "ours, default targets"
RSS_SAMPLE_SECONDS = 0.2
LOG_TAIL_CHARS = 4000
# The last refresh of a tqdm bar "Steps: 100%|...| 60/60 [00:10<00:00,  5.67it/s, ...]" (or "1.23s/it").
PROGRESS_BAR = re.compile(r"Steps: +100%\|[^|]*\| *(\d+)/\d+ \[[^<\]]*<[^,\]]*, *([\d.]+)(it/s|s/it)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--upstream_script",
        type=Path,
        required=True,
        help=f"diffusers' `{UPSTREAM_PATH_IN_DIFFUSERS}`, from a checkout matching the installed diffusers.",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="Interpreter of the environment that runs both scripts (needs torchvision and diffusers_lowmem).",
    )
    parser.add_argument("--steps", type=int, default=150, help="--max_train_steps of each run.")
    parser.add_argument("--repeats", type=int, default=3, help="Measured runs of each script (alternating order).")
    parser.add_argument("--warmup", type=int, default=1, help="Unmeasured runs of each script before the repeats.")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and MKL_NUM_THREADS of both runs.")
    parser.add_argument("--tolerance", type=float, default=1.10, help="Largest accepted ratio ours / upstream.")
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=Path("/tmp/diffusers-lowmem-compare-upstream"),
        help="Tiny pipeline and data (built when missing), run outputs and logs.",
    )
    parser.add_argument("--output", type=Path, default=None, help="Markdown file for the results.")
    parser.add_argument(
        "--ours_variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="Also time ours (on upstream's target modules) with extra flags, for example 'no memory "
        "log=--memory_log_steps 1000000'; reported beside the comparison, never gating it. Repeatable.",
    )
    parser.add_argument(
        "--skip_default_targets",
        action="store_true",
        help=f"Do not also time ours with its default target modules ('{DEFAULT_TARGETS_LABEL}').",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured process."""

    wall_s: float
    max_rss_bytes: int
    tree_rss_bytes: int | None
    cpu_s: float
    loop_s: float | None = None


@dataclass
class Script:
    """A script under test: its label, command (without `--output_dir`) and measured runs."""

    label: str
    command: list[str]
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        """Median of `attribute` over the measured runs; None if a run lacks it."""
        values = [getattr(run, attribute) for run in self.runs]
        return None if None in values else statistics.median(values)

    def minimum(self, attribute: str) -> float:
        """Smallest `attribute` over the measured runs."""
        return min(getattr(run, attribute) for run in self.runs)


def child_environment(threads: int) -> dict[str, str]:
    """The environment of every run: offline hubs and a fixed number of CPU threads."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _sample_tree_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Samples the summed RSS of `pid` and its descendants until `stop` is set; keeps the maximum in `peak[0]`."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            processes = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak[0] = max(peak[0], total)
        stop.wait(RSS_SAMPLE_SECONDS)


def run_once(command: list[str], env: dict[str, str], log_path: Path) -> Run:
    """Runs `command` to completion and measures it.

    Args:
        command: The full command line.
        env: Its environment.
        log_path: File receiving its stdout and stderr.

    Returns:
        Wall time, `ru_maxrss` of the process (and its waited-for children), the sampled peak of the process tree
        (None without psutil) and user + system CPU time.

    Raises:
        RuntimeError: If the command fails; the message holds the end of its log.
    """
    try:
        import psutil  # noqa: F401

        sample = True
    except ImportError:
        sample = False
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=_sample_tree_rss, args=(process.pid, stop, peak), daemon=True)
        if sample:
            sampler.start()
        # wait4 rather than Popen.wait: it returns the child's resource usage (peak RSS, CPU time).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        if sample:
            sampler.join()
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"exit status {process.returncode}: {shlex.join(command)}\n... {tail}")
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    max_rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    loop = training_loop_seconds(log_path.read_text(errors="replace"))
    return Run(wall, max_rss, peak[0] if sample else None, usage.ru_utime + usage.ru_stime, loop)


def training_loop_seconds(log: str) -> float | None:
    """Duration of the training loop from the last complete "Steps" progress bar of a log: steps / mean rate.

    Args:
        log: stdout and stderr of one run.

    Returns:
        Seconds, or None if the log holds no complete bar.
    """
    matches = PROGRESS_BAR.findall(log)
    if not matches:
        return None
    steps, rate, unit = matches[-1]
    return int(steps) / float(rate) if unit == "it/s" else int(steps) * float(rate)


def build_tiny_assets(python: str, work_dir: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """The tiny SD pipeline and image folder under `work_dir/tiny`, built with `diffusers_lowmem.tiny` if missing."""
    tiny = work_dir / "tiny"
    model, images = tiny / "sd", tiny / "images"
    if not (model / "model_index.json").is_file() or not (images / "metadata.jsonl").is_file():
        command = [python, "-m", "diffusers_lowmem.tiny", str(tiny), "--only", "sd,images"]
        print(f"Building the tiny pipeline and data: {shlex.join(command)}", flush=True)
        subprocess.run(command, env=env, check=True)
    return model, images


def common_flags(args: argparse.Namespace, model: Path, images: Path) -> list[str]:
    """The flags both scripts get: fp32, no validation, no checkpoint, TensorBoard (both defaults), fixed seed."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(images),
        "--resolution", str(args.resolution),
        "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-4",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--rank", str(args.rank),
        "--checkpointing_steps", "1000000",
        "--mixed_precision", "no",
        "--dataloader_num_workers", "0",
        "--report_to", "tensorboard",
    ]  # fmt: skip


def scripts_under_test(args: argparse.Namespace, flags: list[str]) -> list[Script]:
    """Upstream, ours on upstream's target modules, ours with default targets, and the `--ours_variant`s."""
    ours = [args.python, "-m", "diffusers_lowmem.train_text_to_image", *flags, "--adapter", "lora"]
    scripts = [
        Script(UPSTREAM, [args.python, str(args.upstream_script), *flags]),
        Script(OURS, [*ours, "--target_modules", *UPSTREAM_TARGET_MODULES]),
    ]
    if not args.skip_default_targets:
        scripts.append(Script(DEFAULT_TARGETS_LABEL, ours))
    for variant in args.ours_variant:
        label, separator, extra = variant.partition("=")
        if not separator or not label.strip():
            raise SystemExit(f"--ours_variant takes LABEL=FLAGS, got {variant!r}")
        scripts.append(Script(f"ours, {label.strip()}", [*scripts[1].command, *shlex.split(extra)]))
    return scripts


def measure(args: argparse.Namespace, scripts: list[Script], env: dict[str, str]) -> None:
    """Warm-up runs, then `--repeats` rounds in which the order of the scripts rotates; fills `Script.runs`."""
    runs_dir, logs_dir = args.work_dir / "runs", args.work_dir / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    rounds = [("warmup", index) for index in range(args.warmup)] + [("run", index) for index in range(args.repeats)]
    for kind, index in rounds:
        # Rotate the order each round, so that no script always runs first (or right after the other).
        shift = index % len(scripts)
        for script in scripts[shift:] + scripts[:shift]:
            name = f"{script.label.replace(' ', '_').replace(',', '')}-{kind}{index}"
            output_dir = runs_dir / name
            shutil.rmtree(output_dir, ignore_errors=True)
            run = run_once([*script.command, "--output_dir", str(output_dir)], env, logs_dir / f"{name}.log")
            shutil.rmtree(output_dir, ignore_errors=True)
            print(
                f"{kind} {index} {script.label}: {run.wall_s:.2f} s, max RSS {run.max_rss_bytes / 2**20:.0f} MiB",
                flush=True,
            )
            if kind == "run":
                script.runs.append(run)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def environment_versions(python: str, env: dict[str, str]) -> dict[str, str]:
    """Versions of the packages in the environment of `python` (the one both scripts run in)."""
    code = (
        "import importlib.metadata as m, json, platform\n"
        "names = {'lycoris': 'lycoris-lora'}\n"
        "versions = {'python': platform.python_version()}\n"
        f"for package in {list(VERSION_PACKAGES)!r}:\n"
        "    try:\n"
        "        versions[package] = m.version(names.get(package, package))\n"
        "    except m.PackageNotFoundError:\n"
        "        versions[package] = 'not installed'\n"
        "print(json.dumps(versions))\n"
    )
    result = subprocess.run([python, "-c", code], env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


def cpu_description() -> str:
    """CPU model, usable cores and memory of this machine."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = ""
    try:
        total_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {total_kib / 2**20:.0f} GiB memory"
    except (OSError, AttributeError):
        pass
    return f"{model}, {cores} usable cores{memory}, {platform.system()} {platform.release()}"


def ours_provenance(python: str, env: dict[str, str]) -> str:
    """Where `diffusers_lowmem` is imported from under `python`: git commit (and uncommitted changes) and a hash.

    The hash covers the package's `.py` files, so that a change to the trainer during the measurement (an editable
    install in a working tree) shows up as two different values at the start and the end.
    """
    code = "import diffusers_lowmem, os; print(os.path.dirname(diffusers_lowmem.__file__))"
    result = subprocess.run([python, "-c", code], env=env, check=True, capture_output=True, text=True)
    package = Path(result.stdout.strip())
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    description = f"`{package}`, sources sha256 `{digest.hexdigest()[:16]}`"
    git = ["git", "-C", str(package)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
        ).stdout.splitlines()
        dirty = f" with uncommitted changes to {len(changed)} file(s)" if changed else ""
        description += f", git commit `{commit.stdout.strip()}`{dirty}"
    return description


def upstream_provenance(path: Path) -> str:
    """Size, SHA-256 and `check_min_version` of the upstream script, to tell which version was measured."""
    data = path.read_bytes()
    match = re.search(rb'check_min_version\("([^"]+)"\)', data)
    minimum = match.group(1).decode() if match else "none"
    return f'{len(data):,} bytes, sha256 `{hashlib.sha256(data).hexdigest()}`, `check_min_version("{minimum}")`'


def ratios(scripts: list[Script]) -> list[tuple[str, float, float, float]]:
    """(measure, upstream median, ours median, ratio) for the gated measures."""
    upstream, ours = scripts[0], scripts[1]
    rows = []
    for name, attribute in (("wall time", "wall_s"), ("peak RSS", "max_rss_bytes")):
        rows.append(
            (
                name,
                upstream.median(attribute),
                ours.median(attribute),
                ours.median(attribute) / upstream.median(attribute),
            )
        )
    return rows


def _mib(value: float | None) -> str:
    """Bytes as a whole number of MiB, or "n/a"."""
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _seconds(value: float | None) -> str:
    """Seconds with two decimals, or "n/a"."""
    return "n/a" if value is None else f"{value:.2f}"


def _verdict(ratio: float, tolerance: float) -> str:
    """ "pass", or a bold "FAIL" when `ratio` exceeds `tolerance`."""
    return "pass" if ratio <= tolerance else "**FAIL**"


def results_markdown(
    args: argparse.Namespace,
    scripts: list[Script],
    versions: dict[str, str],
    env: dict[str, str],
    ours_sources: tuple[str, str],
) -> tuple[str, bool]:
    """The results page and whether every gated ratio is within `--tolerance`.

    Args:
        args: The comparison's options.
        scripts: The measured scripts, upstream first, then the gated ours.
        versions: Package versions of the environment.
        env: The environment of the runs.
        ours_sources: `ours_provenance` before and after the measurement.
    """
    env_prefix = " ".join(f"{key}={env[key]}" for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS"))
    gated = ratios(scripts)
    passed = all(ratio <= args.tolerance for *_, ratio in gated)
    upstream = scripts[0]

    gate_rows = []
    for name, upstream_value, ours_value, ratio in gated:
        unit = (lambda v: f"{v:.2f} s") if name == "wall time" else (lambda v: f"{_mib(v)} MiB")
        gate_rows.append(
            f"| {name} | {unit(upstream_value)} | {unit(ours_value)} | **{ratio:.3f}** | {args.tolerance:.2f} "
            f"| {_verdict(ratio, args.tolerance)} |"
        )
    script_rows = []
    for script in scripts:
        each = ", ".join(f"{run.wall_s:.2f}" for run in script.runs)
        script_rows.append(
            f"| {script.label} | **{script.median('wall_s'):.2f}** | {script.minimum('wall_s'):.2f} | {each} "
            f"| {script.median('wall_s') / upstream.median('wall_s'):.3f} "
            f"| **{_mib(script.median('max_rss_bytes'))}** "
            f"| {script.median('max_rss_bytes') / upstream.median('max_rss_bytes'):.3f} "
            f"| {_mib(script.median('tree_rss_bytes'))} | {script.median('cpu_s'):.1f} "
            f"| {script.median('cpu_s') / upstream.median('cpu_s'):.3f} "
            f"| {_seconds(script.median('loop_s'))} |"
        )
    commands = "\n".join(
        f"# {script.label}\n{env_prefix} {shlex.join(script.command)} --output_dir OUT" for script in scripts
    )
    this_command = shlex.join(["python", "benchmarks/compare_upstream_text_to_image.py", *sys.argv[1:]])
    version_line = ", ".join(f"{name} {version}" for name, version in versions.items())
    before, after = ours_sources
    ours_line = before if before == after else f"{before} at the start, **changed during the runs** to {after}"
    newline = "\n"
    return (
        f"""# diffusers_lowmem vs diffusers' train_text_to_image_lora.py, CPU

Issue 3: on the same tiny pipeline, data and flags (`--adapter lora`, no quantization), a run of ours costs no more
wall time and peak RSS than diffusers' own example, within {100 * (args.tolerance - 1):.0f} %. Gated: ours on
upstream's LoRA target modules (`--target_modules {" ".join(UPSTREAM_TARGET_MODULES)}`, the same layers and
trainable parameters as upstream).

**Result: {"pass" if passed else "FAIL"}.**

| measure | upstream (median) | ours (median) | ours / upstream | limit | result |
| --- | ---: | ---: | ---: | ---: | --- |
{newline.join(gate_rows)}

Per script ({args.repeats} measured runs each after {args.warmup} warm-up run(s), order rotating every round;
{args.steps} steps, batch {args.train_batch_size}, {args.resolution}x{args.resolution}, rank {args.rank}, \
{args.threads} thread(s)):

| script | wall median (s) | wall min (s) | wall, each run (s) | wall / upstream | peak RSS median (MiB) \
| peak RSS / upstream | process-tree RSS, sampled, median (MiB) | CPU time median (s) | CPU time / upstream \
| training loop median (s) |
| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{newline.join(script_rows)}

Wall time covers the whole process: imports, model and data loading, {args.steps} steps, saving the adapter. Peak
RSS is the kernel's high-water mark of the training process (`ru_maxrss`, what `/usr/bin/time -v` prints as
"Maximum resident set size"); the sampled column sums the RSS of the process tree every
{1e3 * RSS_SAMPLE_SECONDS:.0f} ms. The training loop is steps / mean rate of the final "Steps" progress bar; the rest
of the wall time is start-up (imports, loading) and the end of the run. CPU time (user + system of the process) is
less sensitive than wall time to other work on the machine.

## Setup

- Machine: {cpu_description()}.
- Environment (both scripts): {version_line}.
- diffusers_lowmem: {ours_line}.
- Upstream script: `{args.upstream_script}` ({upstream_provenance(args.upstream_script)}).
- Tiny pipeline and data: `python -m diffusers_lowmem.tiny {args.work_dir / "tiny"} --only sd,images`.

This comparison (from the repository root):

```
{this_command}
```

The measured commands (each a fresh process; `OUT` is a fresh directory per run):

```
{commands}
```
""",
        passed,
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the comparison, prints the results, writes `--output`; returns 1 when a ratio exceeds the tolerance."""
    args = parse_args(argv)
    if not args.upstream_script.is_file():
        raise SystemExit(
            f"--upstream_script {args.upstream_script} is not a file; pass diffusers' {UPSTREAM_PATH_IN_DIFFUSERS}."
        )
    args.upstream_script = args.upstream_script.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(args.threads)
    versions = environment_versions(args.python, env)
    model, images = build_tiny_assets(args.python, args.work_dir, env)
    scripts = scripts_under_test(args, common_flags(args, model, images))
    ours_before = ours_provenance(args.python, env)
    measure(args, scripts, env)
    ours_after = ours_provenance(args.python, env)
    if ours_after != ours_before:
        print(f"Warning: diffusers_lowmem changed during the runs: {ours_before} -> {ours_after}", flush=True)
    page, passed = results_markdown(args, scripts, versions, env, (ours_before, ours_after))
    print(page)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(page)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
