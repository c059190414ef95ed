"""Memory estimate: a training command replayed on fake tensors, its live tensor bytes counted.

`--estimate_memory [GIB]` makes a trainer run its own setup and two optimizer steps under
`torch._subclasses.fake_tensor.FakeTensorMode`: every tensor has its real shape, dtype and device, but no data, so
a Llama-2-7B or SDXL step takes seconds on a CPU and no memory. A `memory.LiveTensorCounter` counts the storages
those fake tensors would occupy, as they are made and freed, which predicts `torch.cuda.max_memory_allocated` of the
real run. This module holds what both trainers need for that: the fake run itself, the JSON report and its table,
the verdict against a memory budget, and the search for flags that would make a run fit.

What differs from a CUDA run (the fake run executes the CPU kernels of a CPU build of torch, which cannot make fake
CUDA tensors): attention runs through the CPU's fused SDPA kernel, which saves the same output and log-sum-exp as
CUDA's flash attention; bitsandbytes' 8-bit matmul takes its CPU path, which dequantizes the int8 weight to the
compute dtype for the product (one layer at a time) where CUDA multiplies in int8. The caching allocator's block
rounding (512 bytes) is applied; its fragmentation (reserved minus allocated) is not predicted.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake, unset_fake_temporarily

from diffusers_lowmem import activation_offload, allocator
from diffusers_lowmem.memory import BREAKDOWN_FIELDS, GIB, MIB, LiveTensorCounter, MemoryBreakdown

logger = logging.getLogger(__name__)

ESTIMATE_JSON = "memory_estimate.json"
ESTIMATE_STEPS = 2
# A fit with less than this share of the budget to spare is flagged: fragmentation can take that much.
TIGHT_MARGIN = 0.05
# What a CUDA device holds besides the tensors PyTorch allocates, added to the predicted peak for the verdict.
# CUDA context: no fixed value is published; it depends on the CUDA version (lazy module loading, the default on
# Linux since CUDA 12.2, shrinks it), the driver and the device, and is typically a few hundred MiB. 500 MiB is a
# conservative placeholder until benchmarks/gpu/run.sh measures it on a device.
CUDA_CONTEXT_BYTES = 500 * MIB
# cuBLAS workspace: NVIDIA's cuBLAS API reference (cublasSetWorkspace) recommends 32 MiB on Hopper and 4 MiB on
# earlier GPUs, and PyTorch gives cuBLASLt 32 MiB on compute capability 9.0 and newer (pytorch/pytorch#120925):
# the larger one is used.
CUBLAS_WORKSPACE_BYTES = 32 * MIB
DEVICE_OVERHEAD_SOURCES = {
    "cuda_context": "placeholder (no published value; depends on CUDA version, driver, device): 500 MiB",
    "cublas_workspace": "cuBLAS API reference, cublasSetWorkspace: 32 MiB recommended on Hopper",
}


def device_overhead_bytes() -> dict[str, int]:
    """The per-device bytes outside PyTorch's allocator that the verdict adds (see the module constants)."""
    return {"cuda_context": CUDA_CONTEXT_BYTES, "cublas_workspace": CUBLAS_WORKSPACE_BYTES}


@contextmanager
def _bitsandbytes_maps_on_real_tensors():
    """bitsandbytes' quantization maps made on real tensors, also inside fake mode.

    bitsandbytes builds its maps from Python lists (`.tolist()`), which fake tensors cannot give: the blockwise and
    NF4 ops build them on first use (cached), and every 8-bit optimizer builds its own in `__init__`. The maps are
    small constants; here they are made outside fake mode (a missing bitsandbytes is left alone).
    """
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        yield
        return
    originals = {name: getattr(bnb_functional, name) for name in ("create_dynamic_map", "create_normal_map")}

    def outside_fake_mode(make_map):
        def make(*args, **kwargs):
            with unset_fake_temporarily():
                return make_map(*args, **kwargs)

        return make

    for name, make_map in originals.items():
        setattr(bnb_functional, name, outside_fake_mode(make_map))
    weight = torch.zeros(64, 64)  # fills the caches the functional ops keep
    bnb_functional.quantize_4bit(weight, compress_statistics=True, quant_type="nf4")
    bnb_functional.quantize_blockwise(weight.flatten(), blocksize=256)
    try:
        yield
    finally:
        for name, make_map in originals.items():
            setattr(bnb_functional, name, make_map)


@contextmanager
def fake_run(device_type: str = "cpu"):
    """Fake mode and a live-tensor counter: everything made inside has shapes and no data, and is counted.

    Args:
        device_type: The device type the trainer places tensors on in the fake run.

    Yields:
        The `memory.LiveTensorCounter`; set its `phase` to name the setup steps ("load", "quantize", ...).
    """
    # Real tensors made before (tokenizer outputs, bitsandbytes' maps, rotary tables) may meet fake ones.
    # On the fake CPU device, `--offload_activations` must still be seen to move activations off "the device".
    offload_to_host = activation_offload.simulated_host() if device_type == "cpu" else contextlib.nullcontext()
    with (
        _bitsandbytes_maps_on_real_tensors(),
        _unpacked_sequences(),
        offload_to_host,
        FakeTensorMode(allow_non_fake_inputs=True),
        LiveTensorCounter(device_type) as counter,
    ):
        yield counter


@contextmanager
def _unpacked_sequences():
    """transformers' decision for a training batch of whole blocks, which it cannot take on fake tensors.

    With no attention mask, transformers looks at the position ids for packed sequences; it reads their values, and
    on fake tensors (which have none) it assumes packing and builds a 4-d mask, which also turns off SDPA's grouped
    query attention (the keys and values are then repeated per head). The batches both trainers make are blocks of
    unpacked text, for which it finds no packing and uses SDPA's causal kernel: the estimate says so directly.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    find_packed = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = find_packed


def _counters_entered() -> list[LiveTensorCounter]:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return [mode for mode in _get_current_dispatch_mode_stack() if isinstance(mode, LiveTensorCounter)]


@contextmanager
def real_tensors():
    """Inside a fake run: real tensors again, and not counted. For building a model's skeleton on the meta device
    (its parameters become fake as the trainer materialises or quantizes them), and for library code that reads
    tensor values while it builds (LyCORIS modules, whose parameters `fake_copies_` then replaces)."""
    counters = _counters_entered()
    with unset_fake_temporarily(), contextlib.ExitStack() as stack:
        for counter in counters:
            stack.enter_context(counter.paused())
        yield


def fake_copies_(module: nn.Module) -> nn.Module:
    """Replaces every real parameter and buffer of `module` by an uninitialised one of the same shape and dtype on
    the same device, made in the fake mode in force (and so counted), in place. Values do not matter to the
    estimate; requires_grad is kept.

    Returns:
        `module`.
    """
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None and not is_fake(parameter):
                fake = torch.empty(parameter.shape, dtype=parameter.dtype, device=parameter.device)
                submodule._parameters[name] = nn.Parameter(fake, requires_grad=parameter.requires_grad)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and not is_fake(buffer):
                submodule._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=buffer.device)
    return module


def module_to_(module: nn.Module, device=None, dtype: torch.dtype | None = None) -> nn.Module:
    """`module.to(device, dtype)` that also works on fake tensors; `dtype` applies to floating tensors only.

    `nn.Module.to` swaps fake parameters (`torch.utils.swap_tensors`), which fails on them (fake mode holds a weak
    reference to each). On fake modules this assigns `.data` instead, as `nn.Module.to` does for ordinary tensors,
    so parameters keep their identity either way. Real modules go through `nn.Module.to` unchanged.

    Args:
        module: The module, changed in place.
        device: The target device, or `None` to stay.
        dtype: The floating dtype, or `None` to keep each tensor's.

    Returns:
        `module`.
    """
    if not is_fake_module(module):
        return module.to(device=device, dtype=dtype)
    for parameter in module.parameters():  # each once: a tied parameter is moved once, and stays tied
        parameter.data = _moved(parameter.data, device, dtype)
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = _moved(buffer, device, dtype)
    return module


def _moved(tensor: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)


def is_fake_module(module: nn.Module) -> bool:
    """Whether `module` holds fake tensors (it was built inside `fake_run`)."""
    return any(is_fake(tensor) for tensor in module.parameters())


def build_report(
    counter: LiveTensorCounter, breakdown: MemoryBreakdown, command: str, budget_gib: float | None = None
) -> dict:
    """The estimate as a JSON-ready dict.

    Args:
        counter: The counter of the fake run.
        breakdown: Bytes by role, counted after the first optimizer step (gradients and optimizer state held).
        command: What was estimated (the trainer's command line), for the report.
        budget_gib: The memory budget in GiB (`--estimate_memory GIB`), or `None` for no verdict.

    Returns:
        `{"peak_bytes": int (the predicted torch.cuda.max_memory_allocated), "breakdown": {frozen_weights,
        trainable_params, gradients, optimizer_state, activations_peak}, "at_peak": [{kind, owner, bytes}],
        "bytes_by_kind_at_peak": {...}, "phase_of_peak": str, "device_overhead_bytes": {...}, "command": str}`, plus
        `budget_bytes`, `required_bytes`, `fits` and `margin_bytes` with a budget.
    """
    values = breakdown.to_dict()
    values["activations_peak"] = max(0, counter.peak_bytes - breakdown.static_total)
    report = {
        "peak_bytes": int(counter.peak_bytes),
        "breakdown": {field: int(values[field]) for field in BREAKDOWN_FIELDS},
        "at_peak": counter.at_peak(),
        "bytes_by_kind_at_peak": counter.bytes_by_kind_at_peak(),
        "phase_of_peak": counter.phase_of_peak,
        "device_overhead_bytes": device_overhead_bytes(),
        "command": command,
    }
    if budget_gib is not None:
        report.update(verdict(report["peak_bytes"], budget_gib))
    return report


def verdict(peak_bytes: int, budget_gib: float) -> dict:
    """Whether a run whose allocated peak is `peak_bytes` fits a device of `budget_gib` GiB.

    The peak plus the per-device overhead (`device_overhead_bytes`) must not exceed the budget.

    Returns:
        `{"budget_bytes", "required_bytes", "fits", "margin_bytes"}` (margin negative when it does not fit).
    """
    budget_bytes = int(budget_gib * GIB)
    required = int(peak_bytes) + sum(device_overhead_bytes().values())
    return {
        "budget_bytes": budget_bytes,
        "required_bytes": required,
        "fits": required <= budget_bytes,
        "margin_bytes": budget_bytes - required,
    }


def suggest_variants(
    args, variants: Iterable[tuple[str, dict]], estimate_peak: Callable[[object], int], budget_gib: float
) -> list[dict]:
    """Re-estimates `args` with each variant's flag changes and returns those that fit, smallest peak first.

    Args:
        args: The parsed command line (an `argparse.Namespace`); copied, never changed.
        variants: `(flags as the user would type them, {attribute: new value})` pairs.
        estimate_peak: Runs the trainer's estimate for a namespace and returns its peak bytes.
        budget_gib: The memory budget in GiB.

    Returns:
        `[{"flags": str, "peak_bytes": int, "fits": bool}]` for every variant tried, fitting ones first.
    """
    suggestions = []
    variants = list(variants)
    for number, (flags, changes) in enumerate(variants, start=1):
        logger.info(f"Re-estimating with {flags} ({number}/{len(variants)})")
        variant = copy.copy(args)
        for attribute, value in changes.items():
            setattr(variant, attribute, value)
        try:
            peak = estimate_peak(variant)
        except Exception as error:  # a variant the model cannot take (e.g. a too small resolution) is skipped
            logger.info(f"Variant {flags} could not be estimated: {error}")
            continue
        suggestions.append({"flags": flags, "peak_bytes": int(peak), "fits": verdict(peak, budget_gib)["fits"]})
    return sorted(suggestions, key=lambda entry: (not entry["fits"], entry["peak_bytes"]))


def estimate_command(
    args, replay: Callable[[object], dict], variants: list[tuple[str, dict]], output_dir=None
) -> dict:
    """What `--estimate_memory [GIB]` does in either trainer: estimates, judges the budget, tries `variants` when it
    does not fit (plus all of them together), prints the table and writes `OUTPUT_DIR/memory_estimate.json`.

    Args:
        args: The trainer's parsed command line; `args.estimate_memory` is the budget in GiB (0: none).
        replay: The trainer's `replay_on_fake_tensors`, returning `build_report`'s dict for a namespace.
        variants: `(flags, {attribute: value})` changes that save memory, for `suggest_variants`.
        output_dir: Where the JSON goes; `None` writes none.

    Returns:
        The report: `build_report`'s fields, the allocator setting the run gets and, with a budget, the verdict and
        the suggestions.
    """
    report = {**replay(args), **allocator.report_entry()}
    if args.estimate_memory:
        report.update(verdict(report["peak_bytes"], args.estimate_memory))
    # The command's own estimate and verdict first: each variant below takes as long again.
    print(report_table(report))
    if output_dir is not None:
        logger.info(f"Wrote {write_report(report, output_dir)}")
    if args.estimate_memory and not report["fits"]:
        if len(variants) > 1:
            everything = {key: value for _, changes in variants for key, value in changes.items()}
            variants = [*variants, (" ".join(flags for flags, _ in variants), everything)]
        logger.info(f"It does not fit: re-estimating {len(variants)} variants.")
        report["suggestions"] = suggest_variants(
            args, variants, lambda variant: replay(variant)["peak_bytes"], args.estimate_memory
        )
        print(suggestions_table(report))
        if output_dir is not None:
            write_report(report, output_dir)
    return report


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f} GiB"


def report_table(report: dict) -> str:
    """The estimate as the plain-text table the trainers print, with the budget's verdict (the variants tried are
    `suggestions_table`'s)."""
    lines = [f"Estimated peak memory (torch.cuda.max_memory_allocated): {_gib(report['peak_bytes'])}"]
    lines.append(f"  peak reached during: {report['phase_of_peak']}")
    for field in BREAKDOWN_FIELDS:
        lines.append(f"  {field:<18} {_gib(report['breakdown'][field]):>12}")
    lines.append("  held at the peak (largest first):")
    for entry in report["at_peak"]:
        lines.append(f"    {entry['bytes'] / MIB:>10.1f} MiB  {entry['kind']:<16} {entry['owner']}")
    if "fits" in report:
        overhead = sum(report["device_overhead_bytes"].values())
        verdict_word = "FITS" if report["fits"] else "DOES NOT FIT"
        if report["fits"] and report["margin_bytes"] < TIGHT_MARGIN * report["budget_bytes"]:
            verdict_word = "FITS, TIGHTLY (allocator fragmentation is not predicted: keep a few % free)"
        lines.append(
            f"Budget {_gib(report['budget_bytes'])}: needs {_gib(report['required_bytes'])} (peak + "
            f"{overhead / MIB:.0f} MiB CUDA context and cuBLAS workspace): {verdict_word}, margin "
            f"{_gib(report['margin_bytes'])}"
        )
        if report["budget_bytes"] <= overhead:
            lines.append(
                f"  The budget is below the CUDA context and cuBLAS workspace alone ({overhead / MIB:.0f} MiB): no"
                " flags can fit it."
            )
    return "\n".join(lines)


def suggestions_table(report: dict) -> str:
    """The variants `estimate_command` tried, as printed lines: each one's need and verdict, fitting ones first."""
    overhead = sum(report["device_overhead_bytes"].values())
    suggestions = report.get("suggestions", [])
    lines = []
    for suggestion in suggestions:
        mark = "fits" if suggestion["fits"] else "does not fit"
        needs = suggestion["peak_bytes"] + overhead
        lines.append(
            f"  with {suggestion['flags']}: needs {_gib(needs)} (peak {_gib(suggestion['peak_bytes'])}): {mark}"
        )
    if suggestions and not any(suggestion["fits"] for suggestion in suggestions):
        smallest = min(suggestion["peak_bytes"] for suggestion in suggestions) + overhead
        lines.append(f"  Nothing tried fits: the smallest needs {_gib(smallest)}.")
    return "\n".join(lines)


def write_report(report: dict, output_dir) -> Path:
    """Writes `OUTPUT_DIR/memory_estimate.json` and returns its path."""
    path = Path(output_dir) / ESTIMATE_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
