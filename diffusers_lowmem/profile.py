"""Adapter x quantization memory matrix: "which adapter and quantization fit my GPU, and what do they cost?"

    python -m diffusers_lowmem.profile --task text-to-image --architecture sd15 --adapters lora,lokr \\
        --quant none,8bit,nf4 --steps 5 --resolution 512 --gradient_checkpointing --mixed_precision bf16 \\
        --output_dir profile-sd15

Each cell (adapter x quant, plus a no-adapter "quantization only" row) runs in its own process through the real
trainer (`train_text_to_image.main` / `train_causal_lm.main`), so its peak is clean and a cell that runs out of
memory is recorded as OOM instead of ending the matrix. `--architecture` builds real architectures with random
weights from configs shipped in the package (memory does not depend on weight values), so real-scale numbers need
no download. Writes `results.csv`, `results.md`, `results.png` and TensorBoard scalars to `--output_dir`.

With `--estimate`, every cell is the trainer's own `--estimate_memory` instead (its setup and two optimizer steps
replayed on fake tensors, in this process, configs only: no weights, no data), so the whole real-scale matrix takes
seconds per cell on any machine:

    python -m diffusers_lowmem.profile --estimate --task causal-lm --architecture llama2-7b --seq_len 512 \\
        --gradient_checkpointing --mixed_precision bf16 --output_dir estimate-llama2-7b

Memory columns are allocated tensor bytes: `torch.cuda.memory_allocated` on CUDA, the trainers' count of live tensor
storage on CPU (process RSS, which the loaded libraries dominate, only as a side column), the predicted
`torch.cuda.max_memory_allocated` with `--estimate`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TASKS = ("text-to-image", "causal-lm")
QUANT_ONLY = "none"  # the adapter name of the quantization-only row
OOM_MARKERS = (
    "out of memory",
    "OutOfMemoryError",
    "MemoryError",
    "can't allocate memory",
    "Cannot allocate memory",
    "std::bad_alloc",
    "failed to map segment",
)
# Under the CPU cap (RLIMIT_AS) every new thread's stack is address space too, so a thread that cannot start is
# the cap being hit (the datasets library, for one, reads image folders with a thread pool).
CPU_CAP_OOM_MARKERS = ("can't start new thread",)
GIB = 1024**3
MIB = 1024**2


@dataclass
class CellResult:
    """One cell of the matrix; byte values are ints, None where the device does not measure them."""

    adapter: str
    quant: str
    status: str  # "ok", "oom" or "error"
    after_model_load_allocated: int | None = None
    after_adapter_allocated: int | None = None
    after_first_step_allocated: int | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    after_model_load_rss: int | None = None
    after_first_step_rss: int | None = None
    peak_rss: int | None = None
    frozen_weights: int | None = None
    trainable_params_bytes: int | None = None
    gradients: int | None = None
    optimizer_state: int | None = None
    activations_peak: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    median_step_seconds: float | None = None
    quantized_conv_bytes: int | None = None  # the quantized convolutions as stored (text-to-image, --quant)
    held_out_loss_before: float | None = None  # with --train_steps: the held-out loss before training ...
    held_out_loss_after: float | None = None  # ... and after it (text-to-image: diffusion loss; causal LM: eval loss)
    quantization_loss_delta: float | None = None  # held-out loss of the quantized base minus the unquantized one
    phase_of_peak: str = ""  # --estimate: the step in which the peak is reached
    held_at_peak: str = ""  # --estimate: the largest owners of memory at the peak, "owner (kind) bytes; ..."
    cell_seconds: float | None = None  # wall time of the cell
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        adapter = "quant only" if self.adapter == QUANT_ONLY else self.adapter
        return f"{adapter} / {self.quant}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the adapter x quantization memory matrix through the real trainers, one process per cell.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--task", choices=TASKS, required=True, help="Which trainer to profile.")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="Fill every cell from the trainer's --estimate_memory (fake tensors, in this process, seconds per cell,"
        " no GPU, weights or data) instead of running it: predicted peak, breakdown and what holds the peak.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", type=str, help="A local diffusers pipeline or causal-LM directory.")
    source.add_argument(
        "--architecture",
        type=str,
        help="A real architecture with random weights, built from configs shipped in the package (no download): "
        "sd15, sd21, sdxl, llama2-7b, llama3-8b, or tiny-sd / tiny-sdxl / tiny-llama. See `python -m diffusers_lowmem.architectures`.",
    )
    parser.add_argument("--adapters", type=str, default="lora,loha,lokr,locon", help="Comma-separated adapters.")
    parser.add_argument("--quant", type=str, default="none,8bit,nf4", help="Comma-separated: none, 8bit, nf4.")
    parser.add_argument(
        "--steps", type=int, default=5, help="Training steps per cell (the median step time skips the first)."
    )
    parser.add_argument(
        "--train_steps",
        type=int,
        default=None,
        help="Train every cell this many steps (instead of --steps) and add the held-out loss before and after to"
        " the table: text-to-image's deterministic held-out diffusion loss (--validation_loss_steps), the causal"
        " LM's eval loss (--eval_steps). Memory and quality side by side, and a memory-versus-loss scatter.",
    )
    parser.add_argument(
        "--learning_rate", type=float, default=None, help="The trainers' --learning_rate; None keeps their default."
    )
    parser.add_argument(
        "--validation_split",
        type=float,
        default=None,
        help="Text-to-image with --train_steps: share of the images held out (the trainer's --validation_split).",
    )
    parser.add_argument(
        "--num_images", type=int, default=4, help="Text-to-image: size of the generated image-caption data set."
    )
    parser.add_argument("--resolution", type=int, default=None, help="Image resolution (text-to-image).")
    parser.add_argument("--seq_len", type=int, default=None, help="Sequence length, i.e. --block_size (causal LM).")
    parser.add_argument("--batch_size", type=int, default=1, help="Per-device batch size.")
    parser.add_argument("--rank", type=int, default=4, help="Adapter rank.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="Frozen weight dtype.")
    parser.add_argument(
        "--optimizer",
        default="adamw",
        help="The trainers' --optimizer in every cell: adamw, adamw8bit, paged_adamw8bit, paged_adamw32bit, lion8bit.",
    )
    parser.add_argument("--train_text_encoder", action="store_true", help="Adapters on the text encoder(s) too.")
    parser.add_argument("--cache_latents", action="store_true", help="Encode latents once and free the VAE (t2i).")
    parser.add_argument(
        "--cache_text_encoder_outputs",
        action="store_true",
        help="Encode captions once and move the frozen text encoder(s) off the device (t2i).",
    )
    parser.add_argument(
        "--no_quant_only_row", action="store_true", help="Skip the no-adapter 'quantization only' row of the study."
    )
    parser.add_argument(
        "--max_memory",
        type=float,
        default=None,
        help="Memory cap per cell in GiB: on CUDA the process' GPU memory fraction; on CPU the address space the "
        "cell may add after importing its libraries. A cell that exceeds it is recorded as OOM.",
    )
    parser.add_argument("--cell_timeout", type=int, default=3600, help="Seconds before a cell is abandoned.")
    parser.add_argument("--output_dir", type=str, required=True, help="Where results.{csv,md,png} and cells go.")
    parser.add_argument("--run_cell", type=str, default=None, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args(argv)
    args.adapter_list = [a.strip() for a in args.adapters.split(",") if a.strip()]
    args.quant_list = [q.strip() for q in args.quant.split(",") if q.strip()]
    _validate(args, parser)
    return args


def _validate(args, parser) -> None:
    from diffusers_lowmem.adapters import ADAPTER_ALGOS
    from diffusers_lowmem.training import OPTIMIZERS

    if args.optimizer not in OPTIMIZERS:
        parser.error(f"--optimizer: unknown {args.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    unknown = [a for a in args.adapter_list if a not in ADAPTER_ALGOS]
    if unknown:
        parser.error(f"--adapters: unknown {unknown}; choose from {', '.join(ADAPTER_ALGOS)}")
    if args.train_steps is not None and args.train_steps < 1:
        parser.error(f"--train_steps {args.train_steps} must be at least 1.")
    if args.validation_split is not None and not args.train_steps:
        parser.error("--validation_split holds images out for the held-out loss of --train_steps: add --train_steps.")
    unknown = [q for q in args.quant_list if q not in ("none", "8bit", "nf4")]
    if unknown:
        parser.error(f"--quant: unknown {unknown}; choose from none, 8bit, nf4")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.pretrained and not Path(args.pretrained).exists():
        parser.error(f"--pretrained {args.pretrained!r} does not exist")
    if args.architecture:
        from diffusers_lowmem.architectures import ARCHITECTURES

        spec = ARCHITECTURES.get(args.architecture)
        if spec is None:
            parser.error(f"--architecture {args.architecture!r} is unknown; choose from {', '.join(ARCHITECTURES)}")
        if spec.task != args.task:
            parser.error(f"--architecture {args.architecture} is a {spec.task} architecture, not --task {args.task}")


def cells(args) -> list[tuple[str, str]]:
    """The matrix: every adapter x quant, then the quantization-only row (one per quant mode)."""
    matrix = [(adapter, quant) for adapter in args.adapter_list for quant in args.quant_list]
    if not args.no_quant_only_row:
        matrix += [(QUANT_ONLY, quant) for quant in args.quant_list]
    return matrix


def ensure_data(args, output_dir: Path) -> Path:
    """Small local data for the run: an image-caption folder or a text corpus (contents do not change memory)."""
    from diffusers_lowmem import tiny

    if args.task == "text-to-image":
        num_images = max(args.num_images, args.batch_size)
        return tiny.write_image_caption_folder(output_dir / "data" / "images", num_images=num_images)
    return tiny.write_text_corpus(output_dir / "data" / "text")


def trainer_argv(args, adapter: str, quant: str, data_dir: Path, cell_dir: Path) -> list[str]:
    """The command line a user would give the trainer for this cell."""
    model = args.pretrained or f"architecture:{args.architecture}"
    common = [
        "--output_dir", str(cell_dir),
        "--max_train_steps", str(args.train_steps or args.steps),
        "--seed", "0",
        "--mixed_precision", args.mixed_precision,
        "--memory_log_steps", "1",
        "--checkpointing_steps", str(10**9),
    ]  # fmt: skip
    if adapter != QUANT_ONLY:
        common += ["--adapter", adapter, "--optimizer", args.optimizer]
    if args.learning_rate is not None:
        common += ["--learning_rate", str(args.learning_rate)]
    if quant != "none":
        common += ["--quant", quant]
    if args.gradient_checkpointing:
        common.append("--gradient_checkpointing")
    if args.task == "text-to-image":
        argv = [
            "--pretrained_model_name_or_path", model,
            "--train_data_dir", str(data_dir),
            "--resolution", str(args.resolution or 512),
            "--train_batch_size", str(args.batch_size),
            "--rank", str(args.rank),
            "--report_to", "tensorboard",
        ]  # fmt: skip
        if args.train_text_encoder:
            argv.append("--train_text_encoder")
        if args.cache_latents:
            argv.append("--cache_latents")
        if args.cache_text_encoder_outputs:
            argv.append("--cache_text_encoder_outputs")
        if args.train_steps:  # evaluated before training and after the last step
            argv += ["--validation_loss_steps", str(args.train_steps)]
            if args.validation_split is not None:
                argv += ["--validation_split", str(args.validation_split)]
    else:
        argv = [
            "--model_name_or_path", model,
            "--train_file", str(data_dir / "train.txt"),
            "--validation_file", str(data_dir / "validation.txt"),
            "--block_size", str(args.seq_len or 512),
            "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", str(args.batch_size),
            "--rank", str(args.rank),
            "--num_train_epochs", "1",
            "--report_to", "tensorboard",
            "--with_tracking",
        ]  # fmt: skip
        if args.train_steps:
            argv += ["--eval_steps", str(args.train_steps)]
    return argv + common


# ----------------------------------------------------------------------------------------------------------------
# The child process: one cell
# ----------------------------------------------------------------------------------------------------------------


def _apply_memory_cap(max_memory_gib: float | None) -> None:
    if max_memory_gib is None:
        return
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gib * GIB / total))
    else:
        # On the CPU the cap is address space the cell may add to what the imported libraries already map.
        import psutil

        limit = psutil.Process().memory_info().vms + int(max_memory_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def run_cell_in_process(spec: dict) -> None:
    """Runs one cell in this process: the trainer's own `main`, or the quantization-only measurement."""
    trainer = _trainer(spec["task"])
    trainer_args = trainer.parse_args(spec["argv"])
    _apply_memory_cap(spec.get("max_memory"))  # after the imports: the cap is for the models and the training
    if spec["adapter"] == QUANT_ONLY:
        trainer.measure_frozen_base(trainer_args)
    else:
        trainer.main(trainer_args)


def estimate_cell(args, adapter: str, quant: str, data_dir: Path, output_dir: Path) -> CellResult:
    """One cell from the trainer's own estimate, in this process: `replay_on_fake_tensors` (or, for the
    quantization-only row, `replay_frozen_base_on_fake_tensors`) on the cell's command line plus `--estimate_memory`.

    Writes the cell's `memory_estimate.json` (the trainer's report) to `OUTPUT_DIR/cells/ADAPTER-QUANT/`.

    Returns:
        The cell: `peak_allocated` is the predicted peak (bytes), the breakdown columns are the report's, and
        `extra["estimate"]` holds the whole report; status "error" (with the last line of the error) if the trainer
        could not estimate it.
    """
    from accelerate.state import AcceleratorState

    from diffusers_lowmem import estimate

    trainer = _trainer(args.task)
    cell_dir = output_dir / "cells" / f"{adapter}-{quant}"
    argv = trainer_argv(args, adapter, quant, data_dir, cell_dir) + ["--estimate_memory"]
    trainer_args = trainer.parse_args(argv)
    try:
        if adapter == QUANT_ONLY:
            report = trainer.replay_frozen_base_on_fake_tensors(trainer_args)
        else:
            report = trainer.replay_on_fake_tensors(trainer_args)
    except Exception as error:  # one cell that cannot be estimated does not end the matrix
        logger.exception(f"{adapter}/{quant}: the estimate failed")
        status = "oom" if any(marker in str(error) for marker in OOM_MARKERS) else "error"
        return CellResult(adapter, quant, status, error=f"{type(error).__name__}: {error}"[-500:])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # the next cell sets up its own accelerator
    report["command"] = f"{trainer.__name__.rsplit('.', 1)[-1]} " + " ".join(argv)
    estimate.write_report(report, cell_dir)
    breakdown = report["breakdown"]
    return CellResult(
        adapter=adapter,
        quant=quant,
        status="ok",
        peak_allocated=report["peak_bytes"],
        frozen_weights=breakdown["frozen_weights"],
        trainable_params_bytes=breakdown["trainable_params"],
        gradients=breakdown["gradients"],
        optimizer_state=breakdown["optimizer_state"],
        activations_peak=breakdown["activations_peak"],
        phase_of_peak=report["phase_of_peak"],
        held_at_peak=held_at_peak(report["at_peak"]),
        extra={"estimate": report},
    )


def held_at_peak(at_peak: list[dict], top: int = 3) -> str:
    """The largest entries of an estimate's `at_peak` as "owner (kind) size; ..." (MiB, KiB below one MiB)."""

    def size(num_bytes: int) -> str:
        return f"{num_bytes / MIB:.0f} MiB" if num_bytes >= MIB else f"{num_bytes / 1024:.0f} KiB"

    return "; ".join(f"{entry['owner']} ({entry['kind']}) {size(entry['bytes'])}" for entry in at_peak[:top])


def _trainer(task: str):
    if task == "text-to-image":
        from diffusers_lowmem import train_text_to_image as trainer
    else:
        from diffusers_lowmem import train_causal_lm as trainer
    return trainer


def run_cell(args, adapter: str, quant: str, data_dir: Path, output_dir: Path) -> CellResult:
    """Launches one cell in a fresh process and reads back its memory report."""
    cell_dir = output_dir / "cells" / f"{adapter}-{quant}"
    spec = {
        "task": args.task,
        "adapter": adapter,
        "argv": trainer_argv(args, adapter, quant, data_dir, cell_dir),
        "max_memory": args.max_memory,
    }
    cell_dir.mkdir(parents=True, exist_ok=True)
    spec_path = cell_dir / "cell.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, "-m", "diffusers_lowmem.profile", "--task", args.task, "--output_dir", str(cell_dir)]
    command += ["--architecture" if args.architecture else "--pretrained", args.architecture or args.pretrained]
    command += ["--run_cell", str(spec_path)]
    log_path = cell_dir / "log.txt"
    with open(log_path, "w") as log_file:
        try:
            completed = subprocess.run(
                command, stdout=log_file, stderr=subprocess.STDOUT, timeout=args.cell_timeout, env=_child_env()
            )
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            returncode = -1
    log_text = log_path.read_text(errors="replace")
    report_path = cell_dir / "memory_report.json"
    if returncode == 0 and report_path.is_file():
        return _result_from_report(adapter, quant, report_path, cell_dir)
    oom_markers = OOM_MARKERS + (CPU_CAP_OOM_MARKERS if args.max_memory else ())
    status = "oom" if any(marker in log_text for marker in oom_markers) else "error"
    last_lines = " | ".join(line for line in log_text.strip().splitlines()[-3:])
    result = CellResult(adapter, quant, status, error=last_lines[-500:])
    if report_path.is_file():  # an OOM in training still leaves the report written up to that point
        partial = _result_from_report(adapter, quant, report_path, cell_dir)
        partial.status, partial.error = status, result.error
        return partial
    return result


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _result_from_report(adapter: str, quant: str, report_path: Path, cell_dir: Path) -> CellResult:
    report = json.loads(report_path.read_text())
    milestones = report.get("milestones", {})
    breakdown = report.get("breakdown", {})
    peak = report.get("peak", {})
    params = report.get("params", {})

    def milestone(name, key):
        return milestones.get(name, {}).get(key)

    summary_path = cell_dir / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    step_times = report.get("step_seconds") or summary.get("step_seconds", [])
    timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step pays for warm-up
    quantization = report.get("quantization") or summary.get("quantization") or {}
    return CellResult(
        adapter=adapter,
        quant=quant,
        status="ok",
        after_model_load_allocated=milestone("after_model_load", "allocated"),
        after_adapter_allocated=milestone("after_adapter", "allocated"),
        after_first_step_allocated=milestone("after_first_step", "allocated"),
        peak_allocated=peak.get("allocated"),
        peak_reserved=peak.get("reserved"),
        after_model_load_rss=milestone("after_model_load", "rss"),
        after_first_step_rss=milestone("after_first_step", "rss"),
        peak_rss=peak.get("rss"),
        frozen_weights=breakdown.get("frozen_weights"),
        trainable_params_bytes=breakdown.get("trainable_params"),
        gradients=breakdown.get("gradients"),
        optimizer_state=breakdown.get("optimizer_state"),
        activations_peak=breakdown.get("activations_peak"),
        trainable_params=params.get("trainable"),
        total_params=params.get("total"),
        median_step_seconds=statistics.median(timed) if timed else None,
        quantized_conv_bytes=quantized_conv_bytes(quantization),
        **held_out_losses(summary),
        extra={"quantization": quantization} if quantization else {},
    )


def fill_quantization_loss_deltas(results: list[CellResult]) -> None:
    """Where the trainer did not measure it (an `architecture:` model), a quantized cell's quantization loss delta
    is its loss before training minus that of the unquantized cell with the same adapter: both are the base's,
    adapters start as the identity."""
    before_unquantized = {r.adapter: r.held_out_loss_before for r in results if r.quant == "none"}
    for result in results:
        reference = before_unquantized.get(result.adapter)
        if result.quantization_loss_delta is None and result.quant != "none" and result.held_out_loss_before:
            if reference is not None:
                result.quantization_loss_delta = result.held_out_loss_before - reference


def quantized_conv_bytes(quantization: dict) -> int | None:
    """Stored bytes of the quantized convolutions (layers with a 3-d or 4-d weight) in the quantization reports."""
    layers = [layer for report in quantization.values() for layer in report.get("layers", [])]
    conv_layers = [layer for layer in layers if len(layer["shape"]) > 2]
    return sum(layer["bytes_after"] for layer in conv_layers) if conv_layers else None


def held_out_losses(summary: dict) -> dict:
    """The held-out loss before and after training from a trainer's summary (`--train_steps` cells)."""
    held_out = summary.get("held_out_loss")  # text-to-image
    if held_out:
        return {
            "held_out_loss_before": held_out["before"],
            "held_out_loss_after": held_out["after"],
            "quantization_loss_delta": held_out.get("quantization_loss_delta"),
        }
    history = summary.get("eval_history")  # causal LM: [step, eval loss, perplexity]
    if history:
        return {
            "held_out_loss_before": history[0][1],
            "held_out_loss_after": history[-1][1],
            "quantization_loss_delta": summary.get("quantization_loss_delta"),
        }
    return {}


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------

CSV_FIELDS = [name for name in CellResult.__dataclass_fields__ if name != "extra"]


def device_description() -> tuple[str, int | None]:
    """A device name for the results and its total memory in bytes (None on CPU)."""
    import torch

    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        return properties.name, properties.total_memory
    import platform

    import psutil

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", psutil.virtual_memory().total


def write_csv(results: list[CellResult], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for result in results:
            row = asdict(result)
            row.pop("extra")
            writer.writerow(row)
    return path


def _gib(value: int | None, unit: int = GIB) -> str:
    return "-" if value is None else f"{value / unit:.2f}"


def table_unit(results: list[CellResult]) -> tuple[int, str]:
    """GiB for real-scale tables, MiB when every tensor measure is below 1 GiB (the tiny models).

    Only the cells' own tensor bytes choose the unit. The process's peak RSS is left out: it is a lifetime high-water
    mark that carries whatever the process did before the matrix (another model loaded earlier in the same process
    would otherwise turn a tiny model's table into GiB columns of zeros).
    """
    tensor_measures = ("peak_allocated", "peak_reserved", "frozen_weights")
    values = [getattr(r, name) or 0 for r in results for name in tensor_measures]
    return (GIB, "GiB") if max(values, default=0) >= GIB else (MIB, "MiB")


def _loss(value: float | None, sign: str = "") -> str:
    return "-" if value is None else f"{value:{sign}.4f}"


def _percent(value: int | None, total: int | None) -> str:
    return "-" if value is None or not total else f"{100 * value / total:.1f}%"


MEASURES = {
    "cuda": "allocated",  # torch.cuda.memory_allocated
    "cpu": "allocated",  # the trainers' count of live tensor storage (memory.LiveTensorCounter)
    "estimate": "estimated allocated",  # --estimate: the predicted torch.cuda.max_memory_allocated
}


def markdown_table(results: list[CellResult], device_memory: int | None, mode: str) -> str:
    """Rows = cells; memory in GiB (MiB for tiny models), allocated tensor bytes in every mode.

    Args:
        results: The cells.
        device_memory: The device's memory in bytes, for the "% of device" column (not shown for estimates).
        mode: "cuda" (with peak reserved), "cpu" (counted tensor bytes, process RSS as a side column) or
            "estimate" (with the peak plus the CUDA context and cuBLAS workspace, the phase and what holds the peak).
    """
    from diffusers_lowmem.estimate import device_overhead_bytes

    unit, unit_name = table_unit(results)
    measure = f"{MEASURES[mode]}, {unit_name}"
    header = ["cell", "status"]
    if mode != "estimate":
        header += [f"after load ({measure})", f"after 1 step ({measure})"]
    header.append(f"peak ({measure})")
    header.append("peak + CUDA overhead" if mode == "estimate" else "peak % of device")
    header += {"cuda": ["peak reserved"], "cpu": ["peak RSS (process)"], "estimate": []}[mode]
    header += ["frozen weights", "trainable", "grads", "optimizer", "activations"]
    if mode != "estimate":  # the estimate counts bytes, not parameters
        header.append("trainable params")
    header += ["phase of peak", "held at the peak", "estimate (s)"] if mode == "estimate" else ["median step (s)"]
    show_convs = any(r.quantized_conv_bytes is not None for r in results)
    show_losses = any(r.held_out_loss_after is not None for r in results)
    if show_convs:
        header.append("quantized convs")
    if show_losses:
        header += ["held-out loss before", "held-out loss after", "quantization loss delta"]
    overhead = sum(device_overhead_bytes().values())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r.label, r.status]
        if mode != "estimate":
            row += [_gib(r.after_model_load_allocated, unit), _gib(r.after_first_step_allocated, unit)]
        row.append(_gib(r.peak_allocated, unit))
        if mode == "estimate":
            row.append(_gib(None if r.peak_allocated is None else r.peak_allocated + overhead, unit))
        else:
            row.append(_percent(r.peak_allocated, device_memory))
        row += {"cuda": [_gib(r.peak_reserved, unit)], "cpu": [_gib(r.peak_rss, unit)], "estimate": []}[mode]
        row += [
            _gib(r.frozen_weights, unit),
            _gib(r.trainable_params_bytes, unit),
            _gib(r.gradients, unit),
            _gib(r.optimizer_state, unit),
            _gib(r.activations_peak, unit),
        ]
        if mode != "estimate":
            row.append("-" if r.trainable_params is None else f"{r.trainable_params:,}")
        if mode == "estimate":
            row += [r.phase_of_peak or "-", r.held_at_peak or "-", _seconds(r.cell_seconds, ".0f")]
        else:
            row.append(_seconds(r.median_step_seconds, ".3f"))
        if show_convs:
            row.append(_gib(r.quantized_conv_bytes, unit))
        if show_losses:
            row += [_loss(r.held_out_loss_before), _loss(r.held_out_loss_after), _loss(r.quantization_loss_delta, "+")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _seconds(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def library_versions() -> str:
    """The versions that decide the numbers: "torch 2.x, diffusers ..., ..." (installed ones only)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "lycoris-lora", "peft")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


MEASURE_NOTES = {
    "cuda": "`torch.cuda.memory_allocated` (peak: `max_memory_allocated`), reserved beside it.",
    "cpu": "tensor bytes counted by the trainer (live tensor storage, the same count as `torch.cuda` allocated"
    " would give; measured over setup and the first steps); the process RSS, which the loaded libraries dominate,"
    " only as a side column.",
    "estimate": "the trainer's `--estimate_memory`: its setup and two optimizer steps replayed on fake tensors (no"
    " GPU, weights or data), the predicted `torch.cuda.max_memory_allocated`; 'peak + CUDA overhead' adds the CUDA"
    " context and cuBLAS workspace (`diffusers_lowmem.estimate.device_overhead_bytes`), what a device must hold."
    " 'held at the peak': the largest owners of memory at the peak (module, kind), from the cell's"
    " `cells/ADAPTER-QUANT/memory_estimate.json`.",
}


def write_markdown(results, path: Path, args, device_name: str, device_memory: int | None, mode: str) -> Path:
    command = "python -m diffusers_lowmem.profile " + " ".join(_reproduce_argv(args))
    machine = "Estimated on" if mode == "estimate" else "Device"
    text = [
        f"# Memory matrix: {args.architecture or args.pretrained} ({args.task})",
        "",
        f"- {machine}: {device_name}" + (f", {device_memory / GIB:.1f} GiB" if device_memory else ""),
        f"- Versions: {library_versions()}",
        f"- Command: `{command}`",
        f"- Memory in GiB (MiB where the header says so): {MEASURE_NOTES[mode]} Breakdown columns are exact tensor"
        " bytes (quantized weights as stored). 'quant only' rows load and quantize the frozen base and run one"
        " forward pass, without an adapter.",
    ]
    if any(r.quantized_conv_bytes is not None for r in results):
        text.append(
            "- 'quantized convs': bytes of the UNet's convolutions as stored under --quant (part of frozen weights)."
        )
    if any(r.held_out_loss_after is not None for r in results):
        text.append(
            f"- Held-out loss before and after {args.train_steps} training steps, the same problem in every cell: "
            + (
                "the trainer's deterministic held-out diffusion loss (fixed split, noise and timesteps; plain MSE)"
                if args.task == "text-to-image"
                else "the trainer's eval loss on the validation split"
            )
            + ". 'quantization loss delta': the quantized base's held-out loss minus the unquantized base's, before"
            " training (measured by the trainer on both bases; for an `architecture:` model, the cell's loss before"
            " training minus the unquantized cell's)."
        )
    text += ["", markdown_table(results, device_memory, mode), ""]
    failed = [r for r in results if r.status != "ok"]
    if failed:
        text += ["Cells that did not finish:", ""] + [f"- {r.label}: {r.status}: `{r.error}`" for r in failed] + [""]
    path.write_text("\n".join(text))
    return path


def _reproduce_argv(args) -> list[str]:
    argv = ["--task", args.task]
    argv += ["--architecture", args.architecture] if args.architecture else ["--pretrained", args.pretrained]
    argv += ["--adapters", args.adapters, "--quant", args.quant, "--steps", str(args.steps)]
    if args.resolution:
        argv += ["--resolution", str(args.resolution)]
    if args.seq_len:
        argv += ["--seq_len", str(args.seq_len)]
    argv += ["--batch_size", str(args.batch_size), "--mixed_precision", args.mixed_precision]
    flags = ("gradient_checkpointing", "train_text_encoder", "cache_latents", "cache_text_encoder_outputs")
    for flag in (*flags, "no_quant_only_row"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.estimate:
        argv.append("--estimate")
    if args.max_memory:
        argv += ["--max_memory", str(args.max_memory)]
    if args.optimizer != "adamw":
        argv += ["--optimizer", args.optimizer]
    for option in ("train_steps", "learning_rate", "validation_split"):
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    if args.task == "text-to-image" and args.num_images != 4:
        argv += ["--num_images", str(args.num_images)]
    return argv + ["--output_dir", args.output_dir]


def write_png(results: list[CellResult], path: Path, mode: str, title: str) -> Path | None:
    """Bars per cell of allocated tensor bytes: after load, after one step and peak (measured runs), or the
    estimated peak stacked by role (frozen weights, trainable, gradients, optimizer state, activations)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'diffusers_lowmem[plot]'): skipping results.png")
        return None
    import numpy as np

    unit, unit_name = table_unit(results)

    def values(attribute):
        return np.array([(getattr(r, attribute) or 0) / unit for r in results])

    positions = np.arange(len(results))
    with_losses = [r for r in results if r.held_out_loss_after is not None]
    bar_width = max(6, 0.9 * len(results) + 2)
    if with_losses:
        figure, (axis, scatter_axis) = plt.subplots(1, 2, figsize=(bar_width + 6, 4.5))
        _memory_loss_scatter(scatter_axis, with_losses, unit, unit_name)
    else:
        figure, axis = plt.subplots(figsize=(bar_width, 4.5))
    if mode == "estimate":
        bottom = np.zeros(len(results))
        roles = ("frozen_weights", "trainable_params_bytes", "gradients", "optimizer_state", "activations_peak")
        for role in roles:
            heights = values(role)
            axis.bar(positions, heights, 0.6, bottom=bottom, label=role.replace("_bytes", "").replace("_", " "))
            bottom += heights
    else:
        series = {
            "after load": values("after_model_load_allocated"),
            "after 1 step": values("after_first_step_allocated"),
            "peak": values("peak_allocated"),
        }
        width = 0.27
        for offset, (name, heights) in enumerate(series.items()):
            axis.bar(positions + (offset - 1) * width, heights, width, label=name)
    for index, result in enumerate(results):
        if result.status != "ok":
            axis.annotate(result.status.upper(), (positions[index], 0), ha="center", va="bottom", color="red")
    axis.set_xticks(positions)
    axis.set_xticklabels([r.label for r in results], rotation=45, ha="right")
    axis.set_ylabel(f"{unit_name} ({MEASURES[mode]} tensor bytes)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _memory_loss_scatter(axis, results: list[CellResult], unit: int, unit_name: str) -> None:
    """Peak allocated memory against the held-out loss after training, one labelled point per cell."""
    peaks = [(r.peak_allocated or 0) / unit for r in results]
    losses = [r.held_out_loss_after for r in results]
    axis.scatter(peaks, losses)
    for result, peak, loss in zip(results, peaks, losses):
        axis.annotate(result.label, (peak, loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel(f"peak {unit_name} (allocated)")
    axis.set_ylabel("held-out loss after training")
    axis.set_title("memory vs held-out loss")


def log_to_tensorboard(results: list[CellResult], output_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(output_dir / "logs"))
    for index, result in enumerate(results):
        for name in ("peak_allocated", "peak_rss", "after_first_step_allocated", "frozen_weights"):
            value = getattr(result, name)
            if value is not None:
                writer.add_scalar(f"profile/{result.adapter}-{result.quant}/{name}_gib", value / GIB, index)
        for name in ("held_out_loss_before", "held_out_loss_after", "quantization_loss_delta"):
            value = getattr(result, name)
            if value is not None:
                writer.add_scalar(f"profile/{result.adapter}-{result.quant}/{name}", value, index)
        writer.add_text(f"profile/{result.adapter}-{result.quant}/status", result.status, index)
    writer.close()


def main(args: argparse.Namespace) -> list[CellResult]:
    """Runs the matrix and writes the result files. Returns the cells."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # An estimate reads no data (the trainers ignore the data flags), so none is generated for it.
    data_dir = output_dir / "data" if args.estimate else ensure_data(args, output_dir)
    matrix = cells(args)
    results = []
    progress = tqdm(matrix, desc="Estimate cells" if args.estimate else "Profile cells")
    for adapter, quant in progress:
        progress.set_postfix(cell=f"{adapter}/{quant}")
        started = time.perf_counter()
        if args.estimate:
            result = estimate_cell(args, adapter, quant, data_dir, output_dir)
        else:
            result = run_cell(args, adapter, quant, data_dir, output_dir)
        result.cell_seconds = time.perf_counter() - started
        results.append(result)
        logger.info(f"{result.label}: {result.status}, peak {_gib(result.peak_allocated or result.peak_rss)} GiB")
    fill_quantization_loss_deltas(results)
    device_name, device_memory = device_description()
    mode = "estimate" if args.estimate else "cpu" if "CPU" in device_name else "cuda"
    write_csv(results, output_dir / "results.csv")
    write_markdown(results, output_dir / "results.md", args, device_name, device_memory, mode)
    title = f"{args.architecture or args.pretrained} ({'estimated on ' if args.estimate else ''}{device_name})"
    write_png(results, output_dir / "results.png", mode, title)
    log_to_tensorboard(results, output_dir)
    print(markdown_table(results, device_memory, mode))
    print(f"\nWrote {output_dir / 'results.md'}, results.csv, results.png")
    return results


def cli(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if args.run_cell:
        run_cell_in_process(json.loads(Path(args.run_cell).read_text()))
        return
    main(args)


if __name__ == "__main__":
    cli()
