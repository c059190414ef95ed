"""The steps of the prepared GPU run (`benchmarks/gpu/run.sh`): environment, calibration, the measured adapter x
quantization matrices beside `--estimate_memory`'s predictions, and the report.

    bash benchmarks/gpu/fetch_wheels.sh          # here, once: the wheels the device machine lacks, into .whl/
    bash benchmarks/gpu/run.sh OUT               # there: <= 9 minutes on an H100/H200, results under OUT
    bash benchmarks/gpu/run.sh OUT --dry-run     # anywhere: the same steps on the tiny architectures, on the CPU

`run.sh` calls the subcommands below in order; each one can also be run alone:

- `carry-size`: bytes of the working tree that travels to the device machine plus the carried wheels, against the
  64 MiB limit.
- `repack`: wheels of the locally installed distributions of `requirements.txt` (the dry run installs these offline,
  the same way the GPU run installs the downloaded ones).
- `env`: versions, device, driver, where each carried package was imported from; fails when one cannot be imported
  or bitsandbytes cannot quantize on the device, so a broken environment costs seconds, not the whole lease.
- `calibrate`: the per-device constants the estimate adds (CUDA context, cuBLAS workspace), measured.
- `matrix`: the cells of a plan, measured one process per cell through `diffusers_lowmem.profile.run_cell` (a clean
  peak per cell), most important first, each under a time limit inside the suite's budget; the estimate of each
  cell's trainer command runs meanwhile in a few CPU processes. Every result is appended to `results.jsonl` as it
  comes.
- `report`: `suite.json`, `suite.md` and `cells.tar.gz` (every cell's log and reports, no weights) from what is
  there, also after a partial run.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import dataclasses
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
MIB = 1024**2
QUANT_ONLY = "none"  # the adapter name of profile's quantization-only row
# Python modules of the carried distributions, and of the device's own packages the trainers need.
CARRIED_MODULES = {
    "bitsandbytes": "bitsandbytes",
    "diffusers": "diffusers",
    "lycoris-lora": "lycoris",
    "toml": "toml",
    "datasets": "datasets",
    "dill": "dill",
    "multiprocess": "multiprocess",
}
DEVICE_MODULES = ["torch", "transformers", "accelerate", "peft", "safetensors", "tensorboard", "pyarrow", "pandas"]
REPORTED_VERSIONS = [
    "torch",
    "bitsandbytes",
    "diffusers",
    "transformers",
    "lycoris-lora",
    "accelerate",
    "peft",
    "datasets",
    "safetensors",
    "huggingface_hub",
    "tokenizers",
    "numpy",
    "pyarrow",
    "pandas",
]
# The files of a cell worth bringing back (weights and TensorBoard events stay behind).
CELL_FILES = (
    "cell.json",
    "log.txt",
    "memory_report.json",
    "memory_report.md",
    "training_summary.json",
    "memory_estimate.json",
    "estimate.log",
)
MAX_LOG_BYTES = 256 * 1024
# The wheels fetch_wheels.sh downloads for CPython 3.11-3.13 (bitsandbytes 41.1 MiB, diffusers 6.1, the rest 1.4),
# measured 2026-11-30: the tree must leave room for them under the device call's 64 MiB.
MEASURED_WHEEL_BYTES = 50_980_581


# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    """One `diffusers_lowmem.profile` configuration: an architecture and the flags every cell of it shares.

    Attributes:
        name: Key used in file names and tables, e.g. `"sd15"`.
        task: `"text-to-image"` or `"causal-lm"`.
        architecture: A name of `diffusers_lowmem.architectures.ARCHITECTURES`.
        flags: Further `profile` flags (resolution or sequence length, precision, caching, steps).
        cell_timeout: Seconds one measured cell may take, start-up included.
        estimate_timeout: Seconds one `--estimate_memory` run may take.
    """

    name: str
    task: str
    architecture: str
    flags: tuple[str, ...]
    cell_timeout: int
    estimate_timeout: int


@dataclass(frozen=True)
class Plan:
    """The matrices and the cells to run, most important first (a spent budget skips the tail)."""

    matrices: dict[str, Matrix]
    cells: tuple[tuple[str, str, str], ...]  # (matrix name, adapter, quant); adapter "none" = quantization only
    targets: bool = True  # whether the memory and speed targets apply (real architectures only)
    estimate_workers: int = 3


_REAL_SHARED = ("--gradient_checkpointing", "--mixed_precision", "bf16", "--batch_size", "1", "--steps", "6")
_TINY_SHARED = ("--gradient_checkpointing", "--mixed_precision", "bf16", "--batch_size", "1", "--steps", "3")


def _cells(matrix: str, adapters: str, quants: str) -> list[tuple[str, str, str]]:
    return [(matrix, adapter, quant) for adapter in adapters.split(",") for quant in quants.split(",")]


PLANS: dict[str, Plan] = {
    # The H100/H200 run: ~25 cells, the first 9 answer the questions; the rest fill in if time allows.
    "gpu": Plan(
        matrices={
            "sd15": Matrix("sd15", "text-to-image", "sd15", ("--resolution", "512", *_REAL_SHARED), 75, 240),
            "llama2-7b": Matrix("llama2-7b", "causal-lm", "llama2-7b", ("--seq_len", "512", *_REAL_SHARED), 90, 240),
            "sdxl": Matrix(
                "sdxl",
                "text-to-image",
                "sdxl",
                ("--resolution", "1024", "--cache_latents", "--cache_text_encoder_outputs", *_REAL_SHARED),
                150,
                300,
            ),
        },
        cells=tuple(
            _cells("sd15", "lora,lokr", "none,nf4")
            + _cells("llama2-7b", "lora,lokr", "none,nf4")
            + _cells("sdxl", "lokr", "nf4")
            + _cells("sd15", "lora,lokr", "8bit")
            + _cells("sd15", QUANT_ONLY, "none,8bit,nf4")
            + _cells("llama2-7b", "lora,lokr", "8bit")
            + _cells("llama2-7b", QUANT_ONLY, "none,8bit,nf4")
            + _cells("sd15", "loha,locon", "nf4,none")
            + _cells("llama2-7b", "loha,locon", "nf4")
            + _cells("sdxl", "lora", "nf4")
        ),
    ),
    # The CPU dry run: every kind of cell (both trainers, SDXL with caching, 8-bit, nf4, quantization only) on the
    # tiny architectures, small enough for CI.
    "dry": Plan(
        matrices={
            "tiny-sd": Matrix("tiny-sd", "text-to-image", "tiny-sd", ("--resolution", "32", *_TINY_SHARED), 120, 120),
            "tiny-llama": Matrix(
                "tiny-llama", "causal-lm", "tiny-llama", ("--seq_len", "64", *_TINY_SHARED), 120, 120
            ),
            "tiny-sdxl": Matrix(
                "tiny-sdxl",
                "text-to-image",
                "tiny-sdxl",
                ("--resolution", "64", "--cache_latents", "--cache_text_encoder_outputs", *_TINY_SHARED),
                120,
                120,
            ),
        },
        cells=tuple(
            _cells("tiny-sd", "lora", "none,nf4")
            + _cells("tiny-llama", "lora", "none,nf4")
            + _cells("tiny-sdxl", "lokr", "nf4")
            + _cells("tiny-sd", "lokr", "8bit")
            + _cells("tiny-sd", QUANT_ONLY, "nf4")
        ),
        targets=False,
        estimate_workers=1,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Carry size and wheels
# ----------------------------------------------------------------------------------------------------------------


def travelling_files(repo: Path = REPO_ROOT) -> list[Path]:
    """Files of the working tree that travel to the device machine: tracked, and untracked but not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [repo / name for name in listed.split("\0") if name and (repo / name).is_file()]


def carry_size(wheel_dir: Path, repo: Path = REPO_ROOT) -> dict:
    """Bytes that one device call carries: the working tree plus the wheels.

    Args:
        wheel_dir: The folder of carried wheels (may be missing: 0 bytes).
        repo: The repository root.

    Returns:
        `{"tree_bytes", "wheel_bytes", "total_bytes", "wheels": {file name: bytes}}`.
    """
    tree_bytes = sum(path.stat().st_size for path in travelling_files(repo))
    wheels = {path.name: path.stat().st_size for path in sorted(wheel_dir.glob("*.whl"))} if wheel_dir.is_dir() else {}
    wheel_bytes = sum(wheels.values())
    return {
        "tree_bytes": tree_bytes,
        "wheel_bytes": wheel_bytes,
        "total_bytes": tree_bytes + wheel_bytes,
        "wheels": wheels,
    }


def requirement_names(requirements: Path) -> list[str]:
    """Distribution names in a requirements file (`name==version` lines; comments and blanks skipped)."""
    names = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split("==", 1)[0].split(">=", 1)[0].strip())
    return names


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def repack_wheel(name: str, out_dir: Path) -> Path:
    """A wheel of the installed distribution `name`, built from its installed files (offline, no build step).

    The files listed in the distribution's RECORD are stored (uncompressed, for speed) under their site-packages
    paths with a new RECORD; compiled caches and files outside site-packages (console scripts) are left out, as
    pip writes those itself.

    Args:
        name: Distribution name, e.g. `"lycoris-lora"`.
        out_dir: Folder for the wheel.

    Returns:
        The wheel's path, named `{name}-{version}-{the tags of its WHEEL file}.whl`.

    Raises:
        importlib.metadata.PackageNotFoundError: `name` is not installed.
        ValueError: The installed distribution lists no files (an editable install).
    """
    distribution = importlib.metadata.distribution(name)
    files = [f for f in distribution.files or [] if not str(f).startswith("..")]
    files = [f for f in files if "__pycache__" not in str(f) and not str(f).endswith(".pyc")]
    dist_info = next((f.parts[0] for f in files if f.parts[0].endswith(".dist-info")), None)
    if not files or dist_info is None:
        raise ValueError(f"{name}: the installed distribution lists no files to repack (an editable install?)")
    wheel_text = distribution.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines() if line.startswith("Tag:")]
    normalized = distribution.metadata["Name"].replace("-", "_").replace(".", "_")
    # A compressed tag set, as bdist_wheel names it: py2 and py3 tags -> "py2.py3-none-any".
    parts = [list(dict.fromkeys(tag.split("-")[i] for tag in tags or ["py3-none-any"])) for i in range(3)]
    path = out_dir / f"{normalized}-{distribution.version}-{'-'.join('.'.join(part) for part in parts)}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = {f"{dist_info}/{name}" for name in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    record_lines = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        for relative in files:
            arcname = relative.as_posix()
            source = Path(distribution.locate_file(relative))
            if arcname in skipped or not source.is_file():
                continue
            data = source.read_bytes()
            wheel.writestr(arcname, data)
            record_lines.append(f"{arcname},{_record_hash(data)},{len(data)}")
        record_lines.append(f"{dist_info}/RECORD,,")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(record_lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Environment and calibration
# ----------------------------------------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    completed = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return completed.stdout.strip() if completed.returncode == 0 else None


def _unmet_requirements(distributions: list[str]) -> list[str]:
    """Requirements of the carried distributions that the environment does not meet (they were installed with
    --no-deps, so nothing checked them)."""
    from packaging.requirements import Requirement

    unmet = []
    for name in distributions:
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            installed = _version(requirement.name)
            if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                unmet.append(f"{name} needs {requirement}; installed: {installed or 'nothing'}")
    return unmet


def environment(require_cuda: bool = False) -> tuple[dict, list[str]]:
    """What the run ran on, and the problems that make measuring pointless.

    Args:
        require_cuda: Count a torch that sees no CUDA device as a problem (the GPU plan on a CPU would measure
            nothing it was meant to).

    Returns:
        `(environment, problems)`: the environment as a JSON-ready dict (Python, device, driver, versions, where
        each module came from, unmet requirements of the carried wheels), and a list of problems (modules that do
        not import; bitsandbytes failing to quantize on the CUDA device).
    """
    problems = []
    modules = {}
    for module in list(CARRIED_MODULES.values()) + DEVICE_MODULES + ["diffusers_lowmem"]:
        try:
            modules[module] = getattr(importlib.import_module(module), "__file__", None)
        except Exception as error:  # noqa: BLE001 - any import failure is the finding
            modules[module] = None
            problems.append(f"import {module}: {type(error).__name__}: {error}")
    import torch

    env = {
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {name: _version(name) for name in REPORTED_VERSIONS},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "modules": modules,
        "unmet_requirements": _unmet_requirements(list(CARRIED_MODULES)),
        "environment_variables": {
            name: os.environ.get(name)
            for name in ("PYTHONPATH", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "BNB_CUDA_VERSION")
        },
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        env["device"] = {
            "name": properties.name,
            "total_memory_bytes": properties.total_memory,
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "driver": _nvidia_smi("driver_version"),
            "nvidia_smi": _nvidia_smi("name,memory.total,memory.used,clocks.max.sm,power.limit"),
        }
        try:  # bitsandbytes' CUDA library: without it every quantized cell fails, so find out now
            import bitsandbytes.functional as bnb_functional

            weight = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
            error = (bnb_functional.dequantize_4bit(packed, state) - weight).abs().mean().item()
            env["bitsandbytes_cuda_check"] = {"nf4_mean_abs_error": error}
            int8 = bnb_functional.int8_vectorwise_quant(weight)[0]
            env["bitsandbytes_cuda_check"]["int8_dtype"] = str(int8.dtype)
        except Exception as error:  # noqa: BLE001
            problems.append(f"bitsandbytes on CUDA: {type(error).__name__}: {error}")
    else:
        import psutil

        if require_cuda:
            problems.append(f"torch {torch.__version__} sees no CUDA device (CUDA_VISIBLE_DEVICES, driver?)")
        env["device"] = {"name": f"CPU ({platform.machine()})", "total_memory_bytes": psutil.virtual_memory().total}
    env["problems"] = problems
    return env, problems


def _device_used_bytes() -> tuple[int | None, str]:
    """Memory in use on GPU 0 by everything (driver, every process), before or without a CUDA context here."""
    try:
        import pynvml

        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        return int(used), "nvml"
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi (MiB resolution)
        text = _nvidia_smi("memory.used")
        return (int(float(text.splitlines()[0]) * MIB), "nvidia-smi (MiB)") if text else (None, "unavailable")


def calibrate() -> dict:
    """The per-device constants the memory estimate adds, measured in this fresh process.

    - `cuda_context_bytes`: device memory in use after CUDA initialises (and the allocator holds its first block),
      minus that before, minus what the caching allocator reserved: the context, outside `memory_reserved`.
    - `cublas_workspace_bytes`: `memory_allocated` added by the first bf16 (then fp32) matmul beyond its output: the
      cuBLAS / cuBLASLt workspaces, which PyTorch takes from its caching allocator.
    - `first_matmul_outside_allocator_bytes`: device memory the first matmul added outside the allocator (kernel
      modules loaded, library handles).

    Returns:
        The constants in bytes (None where they cannot be measured, with the reason), and the raw readings.
    """
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "skipped": "no CUDA device: the constants are the GPU's", "cuda_context_bytes": None}
    before, source = _device_used_bytes()
    torch.cuda.init()
    first = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after_init, _ = _device_used_bytes()
    reserved_after_init = torch.cuda.memory_reserved()
    result = {
        "device": torch.cuda.get_device_name(0),
        "device_used_source": source,
        "device_used_before_init_bytes": before,
        "device_used_after_init_bytes": after_init,
        "reserved_after_init_bytes": reserved_after_init,
        "cuda_context_bytes": None if before is None else after_init - before - reserved_after_init,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(1024, 1024, device="cuda", dtype=dtype)
        b = torch.randn(1024, 1024, device="cuda", dtype=dtype)
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        used, _ = _device_used_bytes()
        product = a @ b
        torch.cuda.synchronize()
        used_after, _ = _device_used_bytes()
        name = str(dtype).removeprefix("torch.")
        workspace = torch.cuda.memory_allocated() - allocated - product.nbytes
        reserved_growth = torch.cuda.memory_reserved() - reserved
        result[f"first_matmul_{name}"] = {
            "workspace_allocated_bytes": workspace,
            "reserved_growth_bytes": reserved_growth,
            "outside_allocator_bytes": None if used is None else used_after - used - reserved_growth,
        }
    del first
    result["cublas_workspace_bytes"] = sum(
        result[f"first_matmul_{name}"]["workspace_allocated_bytes"] for name in ("bfloat16", "float32")
    )
    result["first_matmul_outside_allocator_bytes"] = result["first_matmul_bfloat16"]["outside_allocator_bytes"]
    return result


# ----------------------------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------------------------


class ResultLog:
    """`results.jsonl`: one JSON line per finished cell or estimate, written and flushed at once (thread-safe)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        with self._lock, open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _profile_args(matrix: Matrix, adapters: list[str], quants: list[str], work: Path):
    from diffusers_lowmem import profile

    argv = ["--task", matrix.task, "--architecture", matrix.architecture, *matrix.flags]
    adapters = list(dict.fromkeys(a for a in adapters if a != QUANT_ONLY)) or ["lora"]
    argv += ["--adapters", ",".join(adapters), "--quant", ",".join(dict.fromkeys(quants))]
    argv += ["--cell_timeout", str(matrix.cell_timeout)]
    argv += ["--output_dir", str(work / matrix.name)]
    return profile.parse_args(argv)


def trainer_module(task: str) -> str:
    """The trainer module of a profile task."""
    return "diffusers_lowmem.train_text_to_image" if task == "text-to-image" else "diffusers_lowmem.train_causal_lm"


def estimate_cell(matrix: Matrix, args, adapter: str, quant: str, data_dir: Path, timeout: float) -> dict:
    """Runs the cell's trainer command with `--estimate_memory` (fake tensors, no training) and reads its JSON.

    Returns:
        `{"estimate_status": "ok", "estimate_peak_bytes", "estimate": {...}}`, or `"n/a"` with the reason in
        `estimate_reason` (no trainer command for the quantization-only row; the trainer has no such flag yet;
        the estimate failed or ran out of time).
    """
    from diffusers_lowmem import profile

    if adapter == QUANT_ONLY:
        return {"estimate_status": "n/a", "estimate_reason": "quantization-only row: no trainer command to estimate"}
    estimate_dir = Path(args.output_dir) / "cells" / f"{adapter}-{quant}" / "estimate"
    estimate_dir.mkdir(parents=True, exist_ok=True)
    argv = profile.trainer_argv(args, adapter, quant, data_dir, estimate_dir) + ["--estimate_memory"]
    command = [sys.executable, "-m", trainer_module(matrix.task), *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("GPU_SUITE_ESTIMATE_THREADS", "2"), HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    log_path = estimate_dir / "estimate.log"
    record = {"estimate_command": " ".join(["python", "-m", trainer_module(matrix.task), *argv])}
    if timeout <= 0:
        return record | {"estimate_status": "n/a", "estimate_reason": "the suite's time budget was spent"}
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = None
    record["estimate_seconds"] = round(time.perf_counter() - started, 2)
    log_text = log_path.read_text(errors="replace")
    estimate_path = estimate_dir / "memory_estimate.json"
    if returncode == 0 and estimate_path.is_file():
        estimate = json.loads(estimate_path.read_text())
        return record | {
            "estimate_status": "ok",
            "estimate_peak_bytes": estimate.get("peak_bytes"),
            "estimate": estimate,
        }
    if returncode is None:
        reason = f"did not finish within {timeout:.0f} s"
    elif "unrecognized arguments" in log_text and "--estimate_memory" in log_text:
        reason = "this trainer has no --estimate_memory yet (argparse: unrecognized arguments)"
    elif returncode == 0:
        reason = f"exit 0 but no {estimate_path.name} was written (the trainer ignored --estimate_memory?)"
    else:
        last_lines = [line for line in log_text.strip().splitlines() if line.strip()][-2:]
        reason = f"exit {returncode}: " + " | ".join(last_lines)[-400:]
    return record | {"estimate_status": "n/a", "estimate_reason": reason}


def _cell_record(matrix: Matrix, args, adapter: str, quant: str, data_dir: Path, result) -> dict:
    from diffusers_lowmem import profile

    cell_dir = Path(args.output_dir) / "cells" / f"{adapter}-{quant}"
    record = {"kind": "cell", "matrix": matrix.name, "architecture": matrix.architecture, "task": matrix.task}
    record |= {k: v for k, v in dataclasses.asdict(result).items() if k != "extra"}
    if adapter == QUANT_ONLY:
        record["command"] = f"profile quantization-only row (measure_frozen_base): {' '.join(_reproduce(args))}"
    else:
        argv = profile.trainer_argv(args, adapter, quant, data_dir, cell_dir)
        record["command"] = " ".join(["python", "-m", trainer_module(matrix.task), *argv])
    return record


def _reproduce(args) -> list[str]:
    from diffusers_lowmem import profile

    return ["python", "-m", "diffusers_lowmem.profile", *profile._reproduce_argv(args)]


def run_matrix(plan: Plan, out: Path, work: Path, deadline: float, estimates: bool = True) -> list[dict]:
    """Measures the plan's cells in order, one process per cell, while the estimates run beside them.

    Each cell gets `min(matrix.cell_timeout, time left)`; once less than 20 s is left the remaining cells are
    recorded as skipped. Estimates run in `plan.estimate_workers` threads, each a CPU process, and stop at the
    deadline.

    Args:
        plan: What to run.
        out: Folder of `results.jsonl`.
        work: Folder for the cells' outputs (weights, logs, data).
        deadline: `time.time()` by which everything must have finished.
        estimates: Whether to run `--estimate_memory` for each cell.

    Returns:
        The records appended to `results.jsonl`.
    """
    from diffusers_lowmem import profile

    log = ResultLog(out / "results.jsonl")
    records: list[dict] = []
    contexts = {}
    for name, matrix in plan.matrices.items():
        adapters = [adapter for m, adapter, _ in plan.cells if m == name]
        quants = list(dict.fromkeys(quant for m, _, quant in plan.cells if m == name))
        if not adapters:
            continue
        args = _profile_args(matrix, adapters, quants, work)
        contexts[name] = (matrix, args, profile.ensure_data(args, Path(args.output_dir)))

    def estimate(name: str, adapter: str, quant: str) -> dict:
        matrix, args, data_dir = contexts[name]
        timeout = min(matrix.estimate_timeout, deadline - time.time())
        record = {"kind": "estimate", "matrix": name, "adapter": adapter, "quant": quant}
        record |= estimate_cell(matrix, args, adapter, quant, data_dir, timeout)
        log.append(record)
        return record

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=plan.estimate_workers)
    futures = [pool.submit(estimate, *cell) for cell in plan.cells] if estimates else []
    for name, adapter, quant in plan.cells:
        matrix, args, data_dir = contexts[name]
        left = deadline - time.time()
        if left < 20:
            record = {"kind": "cell", "matrix": name, "architecture": matrix.architecture, "task": matrix.task}
            record |= {
                "adapter": adapter,
                "quant": quant,
                "status": "skipped",
                "error": "the suite's time budget was spent",
            }
        else:
            args.cell_timeout = int(min(matrix.cell_timeout, left - 5))
            started = time.perf_counter()
            result = profile.run_cell(args, adapter, quant, data_dir, Path(args.output_dir))
            record = _cell_record(matrix, args, adapter, quant, data_dir, result)
            record["wall_seconds"] = round(time.perf_counter() - started, 2)
            record["timeout_seconds"] = args.cell_timeout
            if result.status == "error" and record["wall_seconds"] >= args.cell_timeout:
                record["status"], record["error"] = "timeout", f"over the cell's limit of {args.cell_timeout} s"
        log.append(record)
        records.append(record)
        peak_name = "peak_allocated" if record.get("peak_allocated") else "peak_rss"  # the CPU's: RSS
        peak = record.get(peak_name)
        print(
            f"[suite] {name} {adapter}/{quant}: {record['status']}"
            + (f", {peak_name.replace('_', ' ')} {peak / MIB:.1f} MiB" if peak else "")
            + (f", median step {record['median_step_seconds']:.3f} s" if record.get("median_step_seconds") else "")
            + f" ({max(0, deadline - time.time()):.0f} s left)",
            flush=True,
        )
    for future in futures:
        records.append(future.result())
    pool.shutdown()
    return records


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Everything the report shows, as written to `suite.json`."""

    plan: str
    env: dict
    calibration: dict
    cells: list[dict]
    speed: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    elapsed_seconds: float | None = None
    snapshot: dict | None = None


def read_results(path: Path) -> list[dict]:
    """Cells of `results.jsonl` with their estimates joined in (the last line of each wins)."""
    cells: dict[tuple, dict] = {}
    estimates: dict[tuple, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill
                continue
            key = (record.get("matrix"), record.get("adapter"), record.get("quant"))
            if record.get("kind") in ("cell", "estimate"):
                (cells if record["kind"] == "cell" else estimates)[key] = record
    joined = []
    for key in list(cells) + [key for key in estimates if key not in cells]:
        cell = dict(cells.get(key) or {"matrix": key[0], "adapter": key[1], "quant": key[2], "status": "not run"})
        estimate = estimates.get(key) or {"estimate_status": "n/a", "estimate_reason": "no estimate was recorded"}
        cell |= {k: v for k, v in estimate.items() if k not in ("kind", "matrix", "adapter", "quant")}
        measured, predicted = cell.get("peak_allocated"), cell.get("estimate_peak_bytes")
        cell["measured_over_estimate"] = measured / predicted if measured and predicted else None
        joined.append(cell)
    return joined


def speed_ratios(cells: list[dict]) -> list[dict]:
    """Median step time of each quantized cell over the unquantized cell of the same matrix and adapter."""
    by_key = {(c["matrix"], c["adapter"], c["quant"]): c for c in cells if c.get("status") == "ok"}
    ratios = []
    for (matrix, adapter, quant), cell in by_key.items():
        base = by_key.get((matrix, adapter, "none"))
        if adapter == QUANT_ONLY or quant == "none" or base is None:
            continue
        if cell.get("median_step_seconds") and base.get("median_step_seconds"):
            ratio = cell["median_step_seconds"] / base["median_step_seconds"]
            ratios.append({"matrix": matrix, "adapter": adapter, "quant": quant, "ratio": ratio, "target": 1.5})
    return ratios


def target_checks(cells: list[dict], speed: list[dict]) -> list[dict]:
    """The issues' targets (#15, #19) against the measured cells: met, missed, or not measured."""

    def peak(matrix, adapter, quant):
        cell = next((c for c in cells if (c["matrix"], c["adapter"], c["quant"]) == (matrix, adapter, quant)), {})
        return cell.get("peak_allocated") if cell.get("status") == "ok" else None

    checks = []
    for adapter in sorted({c["adapter"] for c in cells if c["matrix"] == "sd15" and c["adapter"] != QUANT_ONLY}):
        checks.append(
            ("SD 1.5 512 px nf4 + " + adapter + ": peak allocated <= 1.5 GiB", peak("sd15", adapter, "nf4"), 1.5 * GIB)
        )
    checks.append(
        ("SDXL 1024 px nf4 + lokr, cached: peak allocated <= 3.0 GiB", peak("sdxl", "lokr", "nf4"), 3.0 * GIB)
    )
    checks.append(
        ("Llama-2-7B seq 512 nf4 + lora: peak allocated <= 4.5 GiB", peak("llama2-7b", "lora", "nf4"), 4.5 * GIB)
    )
    results = [
        {"target": text, "value": value, "limit": limit, "met": None if value is None else value <= limit}
        for text, value, limit in checks
    ]
    for ratio in speed:
        if ratio["quant"] == "nf4":
            text = f"{ratio['matrix']} {ratio['adapter']}: nf4 step time <= 1.5x unquantized"
            results.append({"target": text, "value": ratio["ratio"], "limit": 1.5, "met": ratio["ratio"] <= 1.5})
    for cell in cells:
        if cell.get("measured_over_estimate") is not None:
            text = f"{cell['matrix']} {cell['adapter']}/{cell['quant']}: measured peak within 5 % of the estimate"
            ratio = cell["measured_over_estimate"]
            results.append({"target": text, "value": ratio, "limit": 0.05, "met": abs(ratio - 1) <= 0.05})
    return results


def _bytes(value, unit=GIB, digits=2) -> str:
    return "-" if value is None else f"{value / unit:.{digits}f}"


def _label(cell: dict) -> str:
    return ("quant only" if cell["adapter"] == QUANT_ONLY else cell["adapter"]) + " / " + cell["quant"]


def markdown(summary: Summary) -> str:
    """`suite.md`: environment, calibration, one table per matrix, speed ratios, targets, failures."""
    env, calibration = summary.env, summary.calibration
    device = env.get("device", {})
    tiny = max((c.get("peak_allocated") or c.get("peak_rss") or 0 for c in summary.cells), default=0) < GIB
    unit, unit_name = (MIB, "MiB") if tiny else (GIB, "GiB")
    versions = env.get("versions", {})
    lines = [
        f"# GPU suite ({summary.plan} plan): {device.get('name', 'unknown device')}",
        "",
        "- Command: `bash benchmarks/gpu/run.sh OUT"
        + (" --dry-run" if summary.plan == "dry" else "")
        + "`"
        + (f", {summary.elapsed_seconds:.0f} s" if summary.elapsed_seconds else ""),
        f"- Device: {device.get('name', '-')}, {_bytes(device.get('total_memory_bytes'))} GiB, driver "
        f"{device.get('driver') or '-'}, capability {device.get('capability', '-')}; Python {env.get('python', '-')}, "
        f"CUDA (torch) {env.get('torch_cuda') or '-'}",
        "- Versions: " + ", ".join(f"{name} {version or '-'}" for name, version in versions.items()),
    ]
    if env.get("problems"):
        lines.append("- Environment problems: " + "; ".join(env["problems"]))
    if env.get("unmet_requirements"):
        lines.append(
            "- Carried wheels' requirements not met (installed with --no-deps): "
            + "; ".join(env["unmet_requirements"])
        )
    lines += ["", "## Calibration constants", ""]
    if calibration.get("cuda_context_bytes") is not None or calibration.get("cublas_workspace_bytes") is not None:
        lines += [
            f"- CUDA context (device used after init - before - allocator reserved): "
            f"{_bytes(calibration.get('cuda_context_bytes'), MIB, 1)} MiB ({calibration.get('device_used_source')})",
            f"- cuBLAS workspace (allocated by the first bf16 + fp32 matmuls beyond their outputs): "
            f"{_bytes(calibration.get('cublas_workspace_bytes'), MIB, 1)} MiB",
            f"- First matmul, outside the allocator: {_bytes(calibration.get('first_matmul_outside_allocator_bytes'), MIB, 1)} MiB",
        ]
    else:
        lines.append(
            f"- not measured: {calibration.get('skipped') or calibration.get('error') or 'no calibration.json'}"
        )
    lines += [
        "",
        "## Measured cells beside `--estimate_memory`",
        "",
        f"Memory in {unit_name}: `torch.cuda.max_memory_allocated` / `max_memory_reserved` of the cell's process (on the"
        " CPU: process RSS), the estimate's `peak_bytes`, measured / estimated. Median step time skips the first step.",
    ]
    for matrix in dict.fromkeys(c["matrix"] for c in summary.cells):
        rows = [c for c in summary.cells if c["matrix"] == matrix]
        lines += [
            "",
            f"### {matrix}",
            "",
            "| cell | status | peak allocated | peak reserved | peak RSS | median step (s) | estimate | measured / estimate | trainable params | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in rows:
            note = c.get("error") if c.get("status") != "ok" else ""
            if c.get("estimate_status") != "ok":
                note = (note + "; " if note else "") + "estimate n/a: " + str(c.get("estimate_reason"))
            ratio = c.get("measured_over_estimate")
            lines.append(
                "| "
                + " | ".join(
                    [
                        _label(c),
                        str(c.get("status")),
                        _bytes(c.get("peak_allocated"), unit),
                        _bytes(c.get("peak_reserved"), unit),
                        _bytes(c.get("peak_rss"), unit),
                        "-" if c.get("median_step_seconds") is None else f"{c['median_step_seconds']:.3f}",
                        _bytes(c.get("estimate_peak_bytes"), unit),
                        "-" if ratio is None else f"{ratio:.3f}",
                        "-" if c.get("trainable_params") is None else f"{c['trainable_params']:,}",
                        str(note or "").replace("|", "/")[:300],
                    ]
                )
                + " |"
            )
    lines += ["", "## Quantized step time over unquantized (same adapter)", ""]
    if summary.speed:
        lines += ["| matrix | adapter | quant | ratio | target |", "|---|---|---|---|---|"]
        lines += [
            f"| {s['matrix']} | {s['adapter']} | {s['quant']} | {s['ratio']:.2f}x | <= {s['target']}x |"
            for s in summary.speed
        ]
    else:
        lines.append("- no pair of finished cells to compare")
    if summary.targets:
        lines += ["", "## Targets", "", "| target | value | met |", "|---|---|---|"]
        for t in summary.targets:
            value = t["value"]
            shown = "-" if value is None else (f"{value / GIB:.2f} GiB" if value > 100 else f"{value:.3f}")
            met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {shown} | {met} |")
    if summary.snapshot:
        snap = summary.snapshot
        lines += [
            "",
            f"Memory snapshot of {snap['matrix']} {snap['adapter']}/{snap['quant']} (measured / estimate "
            f"{snap['measured_over_estimate']:.3f}): {snap['status']}"
            + (" -> snapshot.pickle.gz (pytorch.org/memory_viz)" if snap["status"] == "ok" else ""),
        ]
    lines += ["", "## Commands", ""]
    lines += [f"- {_label(c)} ({c['matrix']}): `{c.get('command', '-')}`" for c in summary.cells if c.get("command")]
    return "\n".join(lines) + "\n"


def pack_cells(work: Path, path: Path) -> Path:
    """`cells.tar.gz`: each cell's logs and reports (logs cut to their last 256 KiB), no weights or events."""
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(work.rglob("*")):
            if not file.is_file() or file.name not in CELL_FILES or "site" in file.relative_to(work).parts[:1]:
                continue
            data = file.read_bytes()
            if file.suffix in (".txt", ".log") and len(data) > MAX_LOG_BYTES:
                data = b"[...cut...]\n" + data[-MAX_LOG_BYTES:]
            info = tarfile.TarInfo(str(file.relative_to(work)))
            info.size, info.mtime = len(data), int(file.stat().st_mtime)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_report(plan_name: str, out: Path, work: Path, elapsed: float | None) -> Summary:
    """Writes `suite.json`, `suite.md` and `cells.tar.gz` under `out` from whatever the steps left there."""

    def read(name):
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else {}

    cells = read_results(out / "results.jsonl")
    speed = speed_ratios(cells)
    targets = target_checks(cells, speed) if PLANS[plan_name].targets else []
    summary = Summary(plan_name, read("env.json"), read("calibration.json"), cells, speed, targets, elapsed)
    if (out / "results.jsonl").is_file():
        lines = (out / "results.jsonl").read_text().splitlines()
        snapshots = [json.loads(line) for line in lines if '"kind": "snapshot"' in line]
        summary.snapshot = snapshots[-1] if snapshots else None
    (out / "suite.json").write_text(json.dumps(dataclasses.asdict(summary), indent=2, default=str))
    (out / "suite.md").write_text(markdown(summary))
    if work.is_dir():
        pack_cells(work, out / "cells.tar.gz")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# A memory snapshot of the cell whose peak the estimate misses most
# ----------------------------------------------------------------------------------------------------------------

SNAPSHOT_TOLERANCE = 0.05  # |measured / estimate - 1| beyond which a cell is worth a snapshot
SNAPSHOT_MAX_ENTRIES = 20_000  # allocator events kept (several KiB each with Python stacks)


def snapshot_candidate(cells: list[dict]) -> dict | None:
    """The finished cell whose measured peak is furthest from its estimate, if more than 5 % away."""
    misses = [c for c in cells if c.get("status") == "ok" and c.get("measured_over_estimate") is not None]
    misses = [c for c in misses if abs(c["measured_over_estimate"] - 1) > SNAPSHOT_TOLERANCE]
    return max(misses, key=lambda c: abs(c["measured_over_estimate"] - 1), default=None)


def record_cell(spec_path: Path, snapshot_path: Path) -> Path:
    """Runs a cell again in this process under `torch.cuda.memory._record_memory_history` and writes the snapshot
    (gzip-compressed pickle, for https://pytorch.org/memory_viz) to `snapshot_path`."""
    import gzip
    import pickle

    import torch

    from diffusers_lowmem import profile

    spec = json.loads(spec_path.read_text())
    argv = list(spec["argv"])
    argv[argv.index("--output_dir") + 1] = str(spec_path.parent / "snapshot-run")
    spec["argv"] = argv
    torch.cuda.memory._record_memory_history("all", stacks="python", max_entries=SNAPSHOT_MAX_ENTRIES)
    try:
        profile.run_cell_in_process(spec)
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(None)
        with gzip.open(snapshot_path, "wb", compresslevel=6) as handle:
            pickle.dump(snapshot, handle)
    return snapshot_path


def run_snapshot(out: Path, work: Path, deadline: float) -> dict | None:
    """When time is left, snapshots the cell the estimate misses most into `out/snapshot.pickle.gz` (dropped if
    over the 16 MiB that come back). Returns what was done, also written to `out/results.jsonl`."""
    candidate = snapshot_candidate(read_results(out / "results.jsonl"))
    if candidate is None:
        return None
    record = {"kind": "snapshot", "matrix": candidate["matrix"], "adapter": candidate["adapter"]}
    record |= {"quant": candidate["quant"], "measured_over_estimate": candidate["measured_over_estimate"]}
    needed = 1.5 * (candidate.get("wall_seconds") or 60) + 10
    if deadline - time.time() < needed:
        record["status"] = f"skipped: {needed:.0f} s needed, {max(0, deadline - time.time()):.0f} s left"
    else:
        spec = work / candidate["matrix"] / "cells" / f"{candidate['adapter']}-{candidate['quant']}" / "cell.json"
        path = out / "snapshot.pickle.gz"
        command = [sys.executable, __file__, "record-cell", "--spec", str(spec), "--out", str(path)]
        try:
            completed = subprocess.run(command, timeout=deadline - time.time(), capture_output=True, text=True)
            record["status"] = "ok" if completed.returncode == 0 else f"exit {completed.returncode}"
            record["error"] = completed.stderr[-500:] if completed.returncode else ""
        except subprocess.TimeoutExpired:
            record["status"] = "timeout"
        if path.is_file() and path.stat().st_size > 16 * MIB:
            record["status"] = f"dropped: {path.stat().st_size / MIB:.0f} MiB is over the 16 MiB that come back"
            path.unlink()
    ResultLog(out / "results.jsonl").append(record)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    size = commands.add_parser("carry-size", help="Working tree + wheels against the device call's limit.")
    size.add_argument("--wheel-dir", type=Path, default=REPO_ROOT / ".whl")
    size.add_argument("--limit-bytes", type=int, default=64 * MIB)
    repack = commands.add_parser("repack", help="Wheels of the installed distributions of a requirements file.")
    repack.add_argument("--requirements", type=Path, default=Path(__file__).with_name("requirements.txt"))
    repack.add_argument("--out", type=Path, required=True)
    env = commands.add_parser("env", help="Write env.json; exit 3 when the environment cannot run the suite.")
    env.add_argument("--out", type=Path, required=True)
    env.add_argument("--require-cuda", action="store_true", help="No CUDA device is a problem (the GPU plan).")
    calibration = commands.add_parser("calibrate", help="Write calibration.json.")
    calibration.add_argument("--out", type=Path, required=True)
    for name in ("matrix", "report"):
        sub = commands.add_parser(name)
        sub.add_argument("--plan", choices=PLANS, default="gpu")
        sub.add_argument("--out", type=Path, required=True)
        sub.add_argument("--work", type=Path, required=True)
        sub.add_argument("--started", type=float, default=time.time(), help="time.time() when the suite started.")
        sub.add_argument("--budget-seconds", type=float, default=510)
    commands.choices["matrix"].add_argument("--no-estimates", action="store_true")
    snapshot = commands.add_parser("snapshot", help="Snapshot the cell the estimate misses most, if time is left.")
    for flag in ("--out", "--work"):
        snapshot.add_argument(flag, type=Path, required=True)
    snapshot.add_argument("--started", type=float, default=time.time())
    snapshot.add_argument("--budget-seconds", type=float, default=510)
    record = commands.add_parser("record-cell", help="Run one cell under the CUDA memory history (internal).")
    record.add_argument("--spec", type=Path, required=True)
    record.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "carry-size":
        size = carry_size(args.wheel_dir)
        for name, value in size["wheels"].items():
            print(f"  {value / MIB:8.2f} MiB  {name}")
        print(
            f"carry size: tree {size['tree_bytes'] / MIB:.2f} MiB + wheels {size['wheel_bytes'] / MIB:.2f} MiB = "
            f"{size['total_bytes'] / MIB:.2f} MiB (limit {args.limit_bytes / MIB:.0f} MiB)"
        )
        if size["total_bytes"] >= args.limit_bytes:
            print("carry size: OVER the limit: carry fewer wheels or slim the tree", file=sys.stderr)
            return 1
        return 0
    if args.command == "repack":
        for name in requirement_names(args.requirements):
            print(f"repacked {repack_wheel(name, args.out).name}")
        return 0
    if args.command == "env":
        env, problems = environment(require_cuda=args.require_cuda)
        args.out.write_text(json.dumps(env, indent=2))
        print(json.dumps({k: env[k] for k in ("python", "versions", "device", "problems")}, indent=2))
        return 3 if problems else 0
    if args.command == "calibrate":
        try:
            result = calibrate()
        except Exception as error:  # noqa: BLE001 - recorded, the matrix still runs
            result = {"error": f"{type(error).__name__}: {error}"}
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    if args.command == "record-cell":
        record_cell(args.spec, args.out)
        return 0
    deadline = args.started + args.budget_seconds
    if args.command == "snapshot":
        print(json.dumps(run_snapshot(args.out, args.work, deadline)))
        return 0
    if args.command == "matrix":
        args.out.mkdir(parents=True, exist_ok=True)
        run_matrix(PLANS[args.plan], args.out, args.work, deadline, estimates=not args.no_estimates)
        return 0
    summary = write_report(args.plan, args.out, args.work, time.time() - args.started)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
