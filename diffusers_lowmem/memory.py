"""Memory accounting: exact tensor bytes as stored, device statistics, and the `MemoryTracker` both trainers use."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

try:
    import resource
except ImportError:  # Windows: no ru_maxrss; the peak RSS is then the largest sample.
    resource = None

logger = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2


def _quant_state_tensors(quant_state) -> Iterator[torch.Tensor]:
    """Yields the tensors of a bitsandbytes `QuantState`, including the nested state of double quantization."""
    while quant_state is not None:
        for value in vars(quant_state).values():
            if isinstance(value, torch.Tensor):
                yield value
        quant_state = getattr(quant_state, "state2", None)


def stored_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yields every tensor that holds the bytes of `tensor` as stored.

    A plain tensor is itself. A bitsandbytes `Params4bit` also keeps its absmax, nested absmax and quantization maps
    in `quant_state`, and an `Int8Params` its row scales in `SCB`: these are neither parameters nor buffers, so a
    count over `model.parameters()` alone misses them.
    """
    yield tensor
    yield from _quant_state_tensors(getattr(tensor, "quant_state", None))
    for attribute in ("CB", "SCB"):
        extra = getattr(tensor, attribute, None)
        if isinstance(extra, torch.Tensor):
            yield extra


def _storage_key(tensor: torch.Tensor) -> tuple:
    if tensor.device.type == "meta":
        return ("meta", id(tensor))
    if is_fake(tensor):
        # Fake tensors have no data pointer; torch keeps one Python object per storage, so its id names it.
        return ("fake", id(tensor.untyped_storage()))
    return (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())


def _storage_bytes(tensor: torch.Tensor) -> int:
    if tensor.device.type == "meta":
        return tensor.numel() * tensor.element_size()
    return tensor.untyped_storage().nbytes()


def count_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes held by `tensors` as stored, each storage counted once.

    Args:
        tensors: Tensors or parameters; bitsandbytes parameters contribute their quantization state too.
        seen: Storage keys already counted elsewhere; updated in place so several calls never count a storage twice.

    Returns:
        The number of bytes.
    """
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        for stored in stored_tensors(tensor):
            key = _storage_key(stored)
            if key in seen:
                continue
            seen.add(key)
            total += _storage_bytes(stored)
    return total


def stored_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers of `module` as stored (quantized weights at their packed size)."""
    return count_bytes(list(module.parameters()) + list(module.buffers()))


# --------------------------------------------------------------------------------------------------------------------
# Breakdown by role: frozen weights, trainable parameters, gradients, optimizer state.
# --------------------------------------------------------------------------------------------------------------------

BREAKDOWN_FIELDS = ("frozen_weights", "trainable_params", "gradients", "optimizer_state", "activations_peak")


@dataclass
class MemoryBreakdown:
    """Bytes of a training setup by role, counted from the tensors themselves (exact and device-independent).

    Attributes:
        frozen_weights: Parameters with `requires_grad=False` plus all buffers; quantized weights at their stored size,
            quantization state included.
        trainable_params: Parameters with `requires_grad=True`.
        gradients: The `.grad` tensors of the parameters that hold one at the time of counting.
        optimizer_state: Every tensor in the optimizer's `state` (moments, step counters, 8-bit quantization maps).
        activations_peak: Peak allocated device memory minus the static bytes resident on that device, where the
            device measures a peak (CUDA); `None` elsewhere.
    """

    frozen_weights: int
    trainable_params: int
    gradients: int
    optimizer_state: int
    activations_peak: int | None = None

    @property
    def static_total(self) -> int:
        """Bytes of everything but activations: frozen weights, trainable parameters, gradients and optimizer state."""
        return self.frozen_weights + self.trainable_params + self.gradients + self.optimizer_state

    def to_dict(self) -> dict:
        """The fields as a plain dict, in declaration order."""
        return asdict(self)


def _unwrap_model(model: nn.Module) -> nn.Module:
    # DDP and DataParallel keep the model in `.module`, torch.compile in `._orig_mod`: count the model itself so
    # the same model passed wrapped and unwrapped is one model.
    for _ in range(8):
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _unwrap_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer (itself a torch Optimizer) keeps the real one, and its state, in `.optimizer`.
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or not hasattr(inner, "state"):
            break
        optimizer = inner
    return optimizer


def _as_module_list(models: Iterable[nn.Module] | nn.Module | None) -> list[nn.Module]:
    if models is None:
        return []
    if isinstance(models, nn.Module):
        models = [models]
    return [_unwrap_model(model) for model in models if model is not None]


def _unique_parameters(models: list[nn.Module]) -> list[nn.Parameter]:
    """Parameters of all `models`, each once even when models share modules."""
    unique = {}
    for model in models:
        for parameter in model.parameters():
            unique.setdefault(id(parameter), parameter)
    return list(unique.values())


def _unique_buffers(models: list[nn.Module]) -> list[torch.Tensor]:
    unique = {}
    for model in models:
        for buffer in model.buffers():
            unique.setdefault(id(buffer), buffer)
    return list(unique.values())


def _nested_tensors(value) -> Iterator[torch.Tensor]:
    """Yields the tensors in a nested structure of dicts, lists and tuples (an optimizer's per-parameter state)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _nested_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nested_tensors(item)


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor in the state of `optimizer` (unwrapped from accelerate's `AcceleratedOptimizer`).

    Args:
        optimizer: A torch or bitsandbytes optimizer, possibly wrapped; `None` gives no tensors.

    Returns:
        The tensors, as stored: bitsandbytes 8-bit optimizers contribute `state1`/`state2`, `absmax*` and the `qmap*`
        maps they share between parameters (`count_bytes` counts a shared storage once).
    """
    if optimizer is None:
        return []
    return list(_nested_tensors(dict(_unwrap_optimizer(optimizer).state)))


def _logical_numel(parameter: torch.Tensor) -> int:
    # A packed 4-bit weight stores two values a byte: its quant_state (bitsandbytes' layers) or its logical_shape
    # (quantized convolutions) keeps the shape of the original weight.
    shape = getattr(parameter, "logical_shape", None) or getattr(
        getattr(parameter, "quant_state", None), "shape", None
    )
    return math.prod(shape) if shape is not None else parameter.numel()


def _on_device(tensors: Iterable[torch.Tensor], device_type: str) -> Iterator[torch.Tensor]:
    """The stored tensors of `tensors` (quantization state included) that live on a device of `device_type`."""
    for tensor in tensors:
        for stored in stored_tensors(tensor):
            if stored.device.type == device_type:
                yield stored


@dataclass
class _StaticCount:
    """What `MemoryTracker.watch` counts once: the parameters and buffers, which change only when models change."""

    frozen_weights: int
    trainable_params: int
    total_params: int
    trainable_param_count: int
    # Storage keys of the counted parameters and buffers, so gradients and optimizer state never count them again.
    seen: set
    # The same, restricted to the tracked device, for the activation estimate.
    bytes_on_device: int
    seen_on_device: set


def _count_static(
    models: list[nn.Module], device_type: str | None, resident: Callable[[torch.Tensor], bool] | None = None
) -> tuple[_StaticCount, list[nn.Parameter]]:
    """Bytes of parameters and buffers; with `resident`, only of those it says the device holds (bytes), while the
    parameter counts cover every parameter."""
    parameters = _unique_parameters(models)
    held = [tensor for tensor in parameters + _unique_buffers(models) if resident is None or resident(tensor)]
    frozen = [tensor for tensor in held if not tensor.requires_grad]
    trainable = [tensor for tensor in held if tensor.requires_grad]
    seen: set = set()
    frozen_bytes = count_bytes(frozen, seen)
    trainable_bytes = count_bytes(trainable, seen)
    seen_on_device: set = set()
    bytes_on_device = 0
    if device_type is not None:
        bytes_on_device = count_bytes(_on_device(frozen + trainable, device_type), seen_on_device)
    static = _StaticCount(
        frozen_weights=frozen_bytes,
        trainable_params=trainable_bytes,
        total_params=sum(_logical_numel(parameter) for parameter in parameters),
        trainable_param_count=sum(_logical_numel(parameter) for parameter in trainable),
        seen=seen,
        bytes_on_device=bytes_on_device,
        seen_on_device=seen_on_device,
    )
    return static, parameters


def _count_dynamic(
    static: _StaticCount, parameters: Iterable[nn.Parameter], optimizer, device_type: str | None
) -> tuple[int, int, int]:
    """Bytes of gradients and optimizer state, and the static + dynamic bytes resident on `device_type`."""
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    state = optimizer_state_tensors(optimizer)
    # Copies, so counting again at the next milestone starts from the parameters alone.
    seen = set(static.seen)
    gradient_bytes = count_bytes(gradients, seen)
    state_bytes = count_bytes(state, seen)
    bytes_on_device = static.bytes_on_device
    if device_type is not None:
        bytes_on_device += count_bytes(_on_device(gradients + state, device_type), set(static.seen_on_device))
    return gradient_bytes, state_bytes, bytes_on_device


def memory_breakdown(
    models: Iterable[nn.Module] | nn.Module, optimizer=None, counter: LiveTensorCounter | None = None
) -> MemoryBreakdown:
    """Bytes of `models` and `optimizer` by role, exact and from the objects themselves.

    Each storage is counted once, also when several models share modules or a model is passed wrapped in DDP.
    Quantized bitsandbytes weights count at their stored size plus their quantization state. Gradients count only
    while they exist: between `backward()` and `optimizer.zero_grad()` (which sets them to `None`).

    Args:
        models: Models (or one model), plain, DDP-wrapped or compiled.
        optimizer: A torch or bitsandbytes optimizer, possibly accelerate-wrapped, or `None`.
        counter: Where the counted device is the CPU: parameters and buffers it `forget`s (models moved off the
            device) are left out of the bytes, as a GPU's breakdown leaves out what went back to the host.

    Returns:
        The breakdown; `activations_peak` is `None` (it needs a device measurement: see `MemoryTracker`).
    """
    resident = None if counter is None else (lambda tensor: not counter.forgot(tensor))
    static, parameters = _count_static(_as_module_list(models), device_type=None, resident=resident)
    gradient_bytes, state_bytes, _ = _count_dynamic(static, parameters, optimizer, device_type=None)
    return MemoryBreakdown(
        frozen_weights=static.frozen_weights,
        trainable_params=static.trainable_params,
        gradients=gradient_bytes,
        optimizer_state=state_bytes,
    )


# --------------------------------------------------------------------------------------------------------------------
# Live tensor storage, counted op by op.
# --------------------------------------------------------------------------------------------------------------------

# CUDA's caching allocator rounds every block up to a multiple of 512 bytes (`kMinBlockSize` in PyTorch's
# c10/cuda/CUDACachingAllocator.cpp), and `torch.cuda.memory_allocated` counts the rounded sizes.
CUDA_BLOCK_BYTES = 512
# Kinds of live memory, by what made it.
KIND_WEIGHTS = "weights"
KIND_ACTIVATIONS = "activations"
KIND_BACKWARD = "backward"
KIND_GRADIENTS = "gradients"
KIND_OPTIMIZER_STATE = "optimizer state"
PHASE_FORWARD = "forward"
PHASE_BACKWARD = "backward"
PHASE_OPTIMIZER_STEP = "optimizer step"
# A new snapshot of what is live is taken when the peak grows by this fraction over the last snapshot's.
_SNAPSHOT_GROWTH = 0.002
_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


class _Storage:
    """What the counter keeps of one live storage: its rounded bytes, what made it, and in which module."""

    __slots__ = ("nbytes", "kind", "owner")

    def __init__(self, nbytes: int, kind: str, owner: str):
        self.nbytes, self.kind, self.owner = nbytes, kind, owner


# Setup phases make weights; these make what a forward makes.
_ACTIVATION_PHASES = (PHASE_FORWARD, "VAE encode", "text encode", "validation")


def _kind_of_phase(phase: str) -> str:
    if phase in _ACTIVATION_PHASES:
        return KIND_ACTIVATIONS
    return {PHASE_BACKWARD: KIND_BACKWARD, PHASE_OPTIMIZER_STEP: KIND_OPTIMIZER_STATE}.get(phase, KIND_WEIGHTS)


class LiveTensorCounter(TorchDispatchMode):
    """Counts the bytes of live tensor storage on one device type as ops make and free tensors, with their peak.

    It measures what `torch.cuda.memory_allocated` / `max_memory_allocated` measure on CUDA, on any device and on
    fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`), where nothing is allocated at all. Every tensor an
    op returns on `device_type` registers its untyped storage once (torch keeps one Python object per storage; views
    share their base's), rounded up to `block_bytes`, with a `weakref.finalize` that subtracts it when the storage is
    freed. Storages made before the counter was entered count only if passed to `adopt`.

    Each storage is labelled with the phase it was made in (`phase`, set by the caller: "load", "quantize", ...;
    "backward" while the autograd engine runs and "optimizer step" inside `Optimizer.step`, both detected) and the
    innermost module whose forward made it (names from `name_modules`), so `at_peak` can say what held the peak.

    Use it as a context manager (`with LiveTensorCounter("cpu") as counter:`), or `start()` / `stop()`.

    Args:
        device_type: The device type to count (`"cuda"`, `"cpu"`); tensors elsewhere (and on `meta`) are ignored.
        block_bytes: Each storage counts as its size rounded up to a multiple of this (512: CUDA's allocator).
    """

    def __init__(self, device_type: str = "cpu", block_bytes: int = CUDA_BLOCK_BYTES):
        super().__init__()
        self.device_type = device_type
        self.block_bytes = max(1, block_bytes)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phase = "load"
        self.phase_of_peak = self.phase
        self._live: dict[int, _Storage] = {}
        self._snapshot: list[_Storage] = []
        self._snapshot_bytes = 0
        self._module_names: dict[int, str] = {}
        self._module_stack: list[str] = []
        self._hook_handles: list = []
        self._phase_before_step: list[str] = []
        self._paused = 0
        # Storages `forget` took off the count, which `adopt` must not bring back (weak: ids are reused).
        self._forgotten: dict[int, weakref.ref] = {}

    # ---- bookkeeping ---------------------------------------------------------------------------------------------

    def _rounded(self, nbytes: int) -> int:
        return -(-nbytes // self.block_bytes) * self.block_bytes

    def _register(self, storage, kind: str, owner: str, phase: str | None = None) -> None:
        key = id(storage)
        if key in self._live:
            return
        record = _Storage(self._rounded(storage.nbytes()), kind, owner)
        self._live[key] = record
        self.live_bytes += record.nbytes
        weakref.finalize(storage, self._free, key)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.phase_of_peak = phase or self.phase
            if self.live_bytes > self._snapshot_bytes * (1 + _SNAPSHOT_GROWTH):
                self._snapshot = list(self._live.values())
                self._snapshot_bytes = self.live_bytes

    def _free(self, key: int) -> None:
        record = self._live.pop(key, None)
        if record is not None:
            self.live_bytes -= record.nbytes

    def _counts(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self.device_type

    def _current_phase(self) -> str:
        if self.phase != PHASE_OPTIMIZER_STEP and torch._C._current_autograd_node() is not None:
            return PHASE_BACKWARD
        return self.phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and self._counts(value):
                storage = value.untyped_storage()
                if id(storage) not in self._live:
                    phase = self._current_phase()
                    owner = self._module_stack[-1] if self._module_stack else phase
                    self._register(storage, _kind_of_phase(phase), owner, phase)
        return out

    # ---- what callers use ----------------------------------------------------------------------------------------

    def adopt(self, tensors: Iterable[torch.Tensor], kind: str = KIND_WEIGHTS, owner: str = "weights") -> None:
        """Counts tensors made before the counter started (their quantization state included), each storage once;
        storages `forget` took off the count stay off.

        Args:
            tensors: Tensors or parameters; those not on `device_type` are skipped.
            kind: What they are, for `at_peak`.
            owner: Who holds them, for `at_peak`.
        """
        for tensor in tensors:
            for stored in stored_tensors(tensor):
                if self._counts(stored) and not self._was_forgotten(stored.untyped_storage()):
                    self._register(stored.untyped_storage(), kind, owner)

    def forgot(self, tensor: torch.Tensor) -> bool:
        """Whether `forget` took `tensor`'s storage off the count (its model left the device)."""
        return any(self._was_forgotten(stored.untyped_storage()) for stored in stored_tensors(tensor))

    def _was_forgotten(self, storage) -> bool:
        reference = self._forgotten.get(id(storage))
        return reference is not None and reference() is storage

    def forget(self, tensors: Iterable[torch.Tensor]) -> int:
        """Stops counting `tensors` (their quantization state included), as if they had left the device.

        For models moved off the accelerator where the counted device is the CPU (a CPU run, or the memory
        estimate's fake CPU device): `model.to("cpu")` frees nothing there, but on a GPU it would.

        Returns:
            The bytes no longer counted.
        """
        forgotten = 0
        for tensor in tensors:
            for stored in stored_tensors(tensor):
                if self._counts(stored):
                    storage = stored.untyped_storage()
                    self._forgotten[id(storage)] = weakref.ref(storage)
                    record = self._live.pop(id(storage), None)
                    if record is not None:
                        self.live_bytes -= record.nbytes
                        forgotten += record.nbytes
        return forgotten

    def name_modules(self, models: dict[str, nn.Module]) -> None:
        """Names every module of `models` by `"{prefix}.{qualified name}"`, for `at_peak`; also relabels the live
        storages of their parameters, buffers and gradients as frozen weights, adapter weights or gradients.

        Args:
            models: `{prefix: model}`, e.g. `{"unet": unet, "text_encoder": text_encoder}`.
        """
        for prefix, model in models.items():
            model = _unwrap_model(model)
            for name, module in model.named_modules():
                self._module_names[id(module)] = f"{prefix}.{name}" if name else prefix
        self.label_tensors(models)

    def label_tensors(self, models: dict[str, nn.Module], optimizer=None) -> None:
        """Labels the live storages of the parameters, buffers, gradients of `models` and the state of `optimizer`.

        Args:
            models: `{prefix: model}`.
            optimizer: A torch or bitsandbytes optimizer (possibly accelerate-wrapped), or `None`.
        """
        for prefix, model in models.items():
            model = _unwrap_model(model)
            for name, parameter in model.named_parameters():
                kind = "adapter weights" if parameter.requires_grad else "frozen weights"
                self._relabel(parameter, kind, f"{prefix}.{name}")
                if parameter.grad is not None:
                    self._relabel(parameter.grad, KIND_GRADIENTS, f"{prefix}.{name}")
            for name, buffer in model.named_buffers():
                self._relabel(buffer, "frozen weights", f"{prefix}.{name}")
        for tensor in optimizer_state_tensors(optimizer):
            self._relabel(tensor, KIND_OPTIMIZER_STATE, "optimizer")

    def _relabel(self, tensor: torch.Tensor, kind: str, owner: str) -> None:
        for stored in stored_tensors(tensor):
            if self._counts(stored):
                record = self._live.get(id(stored.untyped_storage()))
                if record is not None:
                    record.kind, record.owner = kind, owner

    @contextlib.contextmanager
    def paused(self):
        """Tensors made inside are not counted (those freed inside still are, if counted before)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset_peak(self) -> None:
        """Starts a new peak from the bytes live now (as `torch.cuda.reset_peak_memory_stats`)."""
        self.peak_bytes = self.live_bytes
        self.phase_of_peak = self.phase
        self._snapshot = list(self._live.values())
        self._snapshot_bytes = self.live_bytes

    def at_peak(self, top: int = 12) -> list[dict]:
        """What was live at the peak, grouped by kind and owner (layer indices folded: `layers.*.mlp`), largest first.

        Args:
            top: How many groups to return; the rest are summed into one `"other"` entry.

        Returns:
            `[{"kind": str, "owner": str, "bytes": int}, ...]`; the bytes add up to `peak_bytes` (to within the
            0.2 % the peak may grow after the last snapshot).
        """
        groups: dict[tuple[str, str], int] = {}
        for record in self._snapshot:
            key = (record.kind, _LAYER_INDEX.sub(".*", record.owner))
            groups[key] = groups.get(key, 0) + record.nbytes
        ranked = sorted(groups.items(), key=lambda item: -item[1])
        entries = [{"kind": kind, "owner": owner, "bytes": nbytes} for (kind, owner), nbytes in ranked[:top]]
        rest = sum(nbytes for _, nbytes in ranked[top:])
        if rest:
            entries.append({"kind": "other", "owner": f"{len(ranked) - top} more groups", "bytes": rest})
        return entries

    def bytes_by_kind_at_peak(self) -> dict[str, int]:
        """Bytes live at the peak by kind (weights, activations, gradients, optimizer state, ...)."""
        kinds: dict[str, int] = {}
        for record in self._snapshot:
            kinds[record.kind] = kinds.get(record.kind, 0) + record.nbytes
        return kinds

    # ---- module and optimizer hooks ------------------------------------------------------------------------------

    def _push_module(self, module, args) -> None:
        self._module_stack.append(self._module_names.get(id(module), type(module).__name__))

    def _pop_module(self, module, args, output) -> None:
        if self._module_stack:
            self._module_stack.pop()

    def _enter_step(self, optimizer, args, kwargs) -> None:
        self._phase_before_step.append(self.phase)
        self.phase = PHASE_OPTIMIZER_STEP

    def _leave_step(self, optimizer, args, kwargs) -> None:
        self.phase = self._phase_before_step.pop() if self._phase_before_step else self.phase

    @property
    def active(self) -> bool:
        """Whether the counter is entered (counting)."""
        return bool(self._hook_handles)

    def start(self) -> LiveTensorCounter:
        """Enters the counter (as `with` does) and installs its module and optimizer hooks; returns it."""
        self.__enter__()
        return self

    def stop(self) -> None:
        """Leaves the counter and removes its hooks; what it counted stays readable. Call it with no dispatch mode
        entered after this one (modes leave in the order they came)."""
        if self.active:
            self.__exit__(None, None, None)

    def stop_if_innermost(self) -> None:
        """`stop`, only where this counter is the innermost dispatch mode (else leaving it would leave another)."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if self.active and _get_current_dispatch_mode() is self:
            self.stop()

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hook_handles = [
            register_module_forward_pre_hook(self._push_module),
            register_module_forward_hook(self._pop_module, always_call=True),
            register_optimizer_step_pre_hook(self._enter_step),
            register_optimizer_step_post_hook(self._leave_step),
        ]
        return super().__enter__()

    def __exit__(self, exc_type, exc_value, traceback):
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._module_stack.clear()
        return super().__exit__(exc_type, exc_value, traceback)


# --------------------------------------------------------------------------------------------------------------------
# Device statistics.
# --------------------------------------------------------------------------------------------------------------------

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Per pid: a file or `psutil.Process` opened before a fork (data-loader workers) would report the parent.
_STATM_FILES: dict[int, int | None] = {}
_PROCESSES: dict[int, psutil.Process] = {}


def _statm_file() -> int | None:
    """A descriptor of this process's `/proc/<pid>/statm`, opened once; `None` where there is no such file."""
    pid = os.getpid()
    if pid not in _STATM_FILES:
        try:
            _STATM_FILES[pid] = os.open(f"/proc/{pid}/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            _STATM_FILES[pid] = None
    return _STATM_FILES[pid]


def _rss_bytes() -> int:
    """Resident set size of this process now."""
    statm = _statm_file()
    if statm is not None:
        # Re-reading an open statm costs ~3 µs; `psutil.Process().memory_info()` opens the file each time (~40 µs),
        # which is most of a logged step on CPU. The second field is the resident size in pages.
        return int(os.pread(statm, 128, 0).split()[1]) * _PAGE_SIZE
    pid = os.getpid()
    if pid not in _PROCESSES:
        _PROCESSES[pid] = psutil.Process(pid)
    return _PROCESSES[pid].memory_info().rss


def _peak_rss_bytes() -> int | None:
    """Lifetime peak resident set size of this process, where the OS keeps one."""
    if resource is None:
        return None
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return max_rss if sys.platform == "darwin" else max_rss * 1024


def host_memory() -> dict:
    """Resident set size of this process now and at its peak, in bytes.

    Returns:
        `{"rss": int, "peak_rss": int}`; the peak is the OS's lifetime maximum (`ru_maxrss`), or the current value
        where the OS keeps none.
    """
    rss = _rss_bytes()
    peak_rss = _peak_rss_bytes()
    return {"rss": rss, "peak_rss": max(rss, peak_rss or 0)}


def _cuda_memory(device: torch.device) -> dict:
    # One read of the allocator's statistics: `memory_allocated`, `memory_reserved` and `max_memory_allocated` each
    # go through `memory_stats`, which also flattens and sorts every statistic in Python; the nested dict skips that.
    stats = torch.cuda.memory_stats_as_nested_dict(device)
    if not stats:  # CUDA not initialised yet: nothing allocated
        return dict.fromkeys(("allocated", "reserved", "active", "peak_allocated", "peak_reserved"), 0)
    allocated, reserved = stats["allocated_bytes"]["all"], stats["reserved_bytes"]["all"]
    return {
        "allocated": allocated["current"],
        "reserved": reserved["current"],
        "active": stats["active_bytes"]["all"]["current"],
        "peak_allocated": allocated["peak"],
        "peak_reserved": reserved["peak"],
    }


def device_memory(device: torch.device | str) -> dict:
    """Memory statistics of `device` and of this process, in bytes.

    Args:
        device: The training device.

    Returns:
        On CUDA: `allocated`, `reserved`, `active`, `peak_allocated`, `peak_reserved` (peaks since the last
        `torch.cuda.reset_peak_memory_stats`), plus `rss` and `peak_rss` of the process. Elsewhere `rss` and
        `peak_rss` only.
    """
    device = torch.device(device)
    stats = _cuda_memory(device) if device.type == "cuda" else {}
    stats.update(host_memory())
    return stats


def _reset_peak(device: torch.device) -> None:
    # Before CUDA is initialised there is no peak to reset (and resetting would initialise it).
    if device.type == "cuda" and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(device)


def _torch_tensorboard_file_writer(tracker):
    """The event file writer of an accelerate TensorBoard tracker built on torch's `SummaryWriter`, else `None`."""
    if getattr(tracker, "name", None) != "tensorboard":
        return None
    writer = getattr(tracker, "writer", None)
    if type(writer).__module__ != "torch.utils.tensorboard.writer":
        return None
    # `None` once the writer is closed: the caller then goes through `tracker.log`, which reopens it.
    return getattr(writer, "file_writer", None)


def _scalars_summary(values: dict):
    """One TensorBoard `Summary` holding every `tag: value` of `values` as a scalar."""
    # Imported here: only runs with a TensorBoard tracker need it, and those have imported it already.
    from tensorboard.compat.proto.summary_pb2 import Summary

    value = Summary.Value
    return Summary(value=[value(tag=tag, simple_value=scalar) for tag, scalar in values.items()])


def _gib(num_bytes: int) -> float:
    return num_bytes / GIB


def _max_or_none(*values: int | None) -> int | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


# --------------------------------------------------------------------------------------------------------------------
# The tracker both trainers use.
# --------------------------------------------------------------------------------------------------------------------

MILESTONE_FIELDS = ("allocated", "reserved", "active", "rss")
# Which statistics raise each of the run's peaks.
_PEAK_SOURCES = (
    ("allocated", ("allocated", "peak_allocated")),
    ("reserved", ("reserved", "peak_reserved")),
    ("rss", ("rss", "peak_rss")),
)
STEP_FIELDS = ("allocated", "reserved", "peak_allocated", "rss", "peak_rss")
_STEP_TAGS = {field: f"memory/step/{field}_gib" for field in STEP_FIELDS}


REPORT_JSON = "memory_report.json"
REPORT_MARKDOWN = "memory_report.md"


def _format_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "n/a"
    return f"{num_bytes / GIB:.3f} GiB ({num_bytes / MIB:.1f} MiB)"


def _size_columns(num_bytes: int | None) -> tuple[str, str, str]:
    # Exact bytes too: adapters and their optimizer state are often well under a MiB.
    if num_bytes is None:
        return ("n/a", "n/a", "n/a")
    return (f"{num_bytes / GIB:.3f}", f"{num_bytes / MIB:.1f}", f"{num_bytes:,}")


def _markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """A `MemoryTracker.report()` as markdown tables: milestones and peak, breakdown, parameter counts.

    Args:
        report: The dict `MemoryTracker.report` returns.

    Returns:
        The tables, sizes in GiB and MiB.
    """
    memory_rows = [
        (name, *(_format_bytes(values[field]) for field in ("allocated", "reserved", "rss")))
        for name, values in report["milestones"].items()
    ]
    memory_rows.append(
        ("**peak**", *(_format_bytes(report["peak"][field]) for field in ("allocated", "reserved", "rss")))
    )
    breakdown = report["breakdown"]
    static_total = sum(breakdown[field] for field in BREAKDOWN_FIELDS[:4])
    breakdown_rows = [(field, *_size_columns(breakdown[field])) for field in BREAKDOWN_FIELDS]
    breakdown_rows.append(("**static total**", *_size_columns(static_total)))
    total, trainable = report["params"]["total"], report["params"]["trainable"]
    share = f" ({100 * trainable / total:.3f}%)" if total else ""
    params_rows = [("total", f"{total:,}"), ("trainable", f"{trainable:,}{share}")]
    return "\n\n".join(
        [
            f"Device `{report['device']}`, {report['steps_logged']} steps logged.",
            _markdown_table(("milestone", "allocated", "reserved", "rss"), memory_rows),
            _markdown_table(("breakdown", "GiB", "MiB", "bytes"), breakdown_rows),
            _markdown_table(("parameters", "count"), params_rows),
        ]
    )


class MemoryTracker:
    """Records memory at named milestones and every few steps, logs it to the accelerate trackers, writes a report.

    Per-step logging reads device statistics and the process RSS only; the breakdown, which walks all parameters,
    is counted at `watch` (parameters and buffers) and at milestones (gradients and optimizer state).

    With several processes (`accelerator.num_processes > 1`) every logged number is the maximum over ranks, taken
    with one small `accelerator.reduce(..., "max")` per milestone or logged step: only the main process has
    trackers, and the rank closest to running out of memory is the one to watch. `milestone` and `log_step` are
    then collective and must be called on every rank at the same step; `report`, `summary_table` and
    `write_report` are not, and only the main process writes report files.

    On CUDA, `log_step` resets the allocator's peak statistics (`torch.cuda.reset_peak_memory_stats`) after each
    read, so that each logged peak covers its own interval; the tracker keeps the run's peak itself.

    Elsewhere (CPU runs) there is no allocator to ask: with `count_tensor_steps` N > 0 a `LiveTensorCounter` counts
    the tensors made on the device from the tracker's creation through the first N logged steps (setup and the
    first optimizer steps, where a run's peak is reached; counting costs a Python call per op, so it stops there).
    Milestones and steps in that window then get `allocated` and `peak_allocated` as CUDA would report them, and
    the breakdown its `activations_peak`; models passed to `watch` are counted whole. Models moved off the device
    stop counting through `counter.forget`, as they would on a GPU.

    Args:
        device: The training device (`accelerator.device`).
        accelerator: The `accelerate.Accelerator` whose trackers receive the values, or `None` to only record.
        output_dir: Default folder of `write_report`.
        log_every: Log device statistics every this many steps; below 1 turns step logging off.
        models: Models the breakdown counts (see `watch`).
        optimizer: Optimizer the breakdown counts (see `watch`).
        count_tensor_steps: Off CUDA, count live tensor bytes until this many steps have gone through `log_step`;
            0 counts nothing.
    """

    def __init__(
        self,
        device,
        accelerator=None,
        output_dir=None,
        log_every: int = 1,
        models=(),
        optimizer=None,
        count_tensor_steps: int = 0,
    ):
        self.device = torch.device(device)
        self.accelerator = accelerator
        # Read once: fixed for the run, and accelerate's properties cost a few µs each on the per-step path.
        self._num_processes = accelerator.num_processes if accelerator is not None else 1
        self._is_main_process = accelerator is None or accelerator.is_main_process
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_every = log_every
        self.milestones: dict[str, dict] = {}
        self.steps_logged = 0
        self._peak = {"allocated": None, "reserved": None, "rss": 0}
        self._last_breakdown: MemoryBreakdown | None = None
        # Milestones taken before `accelerator.init_trackers` (model load, adapter): logged once trackers exist.
        self._pending_logs: list[tuple[dict, int]] = []
        # Weak references: a tracker that kept a deleted model or optimizer alive would leak the memory it reports.
        self._models: list[weakref.ref] = []
        self._parameters: list[weakref.ref] = []
        self._optimizer: weakref.ref | None = None
        self._static: _StaticCount | None = None
        self._bytes_on_device = 0
        # The allocator's peak then covers this run, not what the process did before.
        _reset_peak(self.device)
        self.counter: LiveTensorCounter | None = None
        self._steps_to_count = count_tensor_steps
        if self.device.type != "cuda" and count_tensor_steps > 0:
            self.counter = LiveTensorCounter(self.device.type).start()
            # A tracker dropped before its steps ran out (an error, a test) leaves no counter behind.
            weakref.finalize(self, self.counter.stop_if_innermost)
        self.watch(models=models, optimizer=optimizer)

    @property
    def counting(self) -> bool:
        """Whether the live-tensor counter is counting now (off CUDA, in the first `count_tensor_steps` steps)."""
        return self.counter is not None and self.counter.active

    @property
    def _measures_device(self) -> bool:
        return self.device.type == "cuda" or self.counter is not None

    def _device_memory(self) -> dict:
        """`device_memory`, plus the counter's `allocated` (while it counts) and `peak_allocated` off CUDA."""
        stats = device_memory(self.device)
        if self.counter is not None:
            if self.counter.active:
                stats["allocated"] = self.counter.live_bytes
            stats["peak_allocated"] = self.counter.peak_bytes
        return stats

    @property
    def _counted_device_type(self) -> str | None:
        # Bytes resident on the device are only needed for the activation estimate, which needs a measured peak.
        return self.device.type if self._measures_device else None

    def _resident(self, tensor: torch.Tensor) -> bool:
        """Whether the tracked device holds `tensor`: the breakdown leaves out models moved off it."""
        if self.counter is not None:
            return not self.counter.forgot(tensor)
        return self.device.type == "cpu" or tensor.device.type == self.device.type

    def watch(self, models=None, optimizer=None) -> None:
        """Sets what the breakdown counts, and counts the parameters and buffers (once, here).

        Call it again whenever the models change: after loading, after attaching an adapter, with the optimizer
        after `accelerator.prepare`. Only weak references are kept, so a model the script deletes is freed.

        Args:
            models: Models to count (plain, DDP-wrapped or compiled); `None` keeps the current ones.
            optimizer: Optimizer to count (possibly accelerate-wrapped); `None` keeps the current one.
        """
        if models is not None:
            self._models = [weakref.ref(model) for model in _as_module_list(models)]
        if optimizer is not None:
            self._optimizer = weakref.ref(optimizer)
        live_models = [model for model in (reference() for reference in self._models) if model is not None]
        if self.counting:
            for model in live_models:
                self.counter.adopt(list(model.parameters()) + list(model.buffers()))
        self._static, parameters = _count_static(live_models, self._counted_device_type, self._resident)
        self._parameters = [weakref.ref(parameter) for parameter in parameters]
        self._bytes_on_device = self._static.bytes_on_device
        self._last_breakdown = None

    def breakdown(self) -> MemoryBreakdown:
        """Counts the breakdown now: parameters and buffers as of the last `watch`, gradients and optimizer state now.

        Returns:
            The breakdown of this process; `activations_peak` from the peak allocated so far, on CUDA only.
        """
        parameters = [
            parameter for parameter in (reference() for reference in self._parameters) if parameter is not None
        ]
        optimizer = self._optimizer() if self._optimizer is not None else None
        gradient_bytes, state_bytes, self._bytes_on_device = _count_dynamic(
            self._static, parameters, optimizer, self._counted_device_type
        )
        return MemoryBreakdown(
            frozen_weights=self._static.frozen_weights,
            trainable_params=self._static.trainable_params,
            gradients=gradient_bytes,
            optimizer_state=state_bytes,
            activations_peak=self._activations_peak(),
        )

    def _activations_peak(self) -> int | None:
        if not self._measures_device:
            return None
        self._update_peak(self._device_memory())
        return max(0, self._peak["allocated"] - self._bytes_on_device)

    def _update_peak(self, stats: dict) -> None:
        """Raises the run's peaks to the current and peak values in `stats` (fields missing or `None` are skipped)."""
        for peak_field, fields in _PEAK_SOURCES:
            for field in fields:
                value = stats.get(field)
                if value is not None and (self._peak[peak_field] is None or value > self._peak[peak_field]):
                    self._peak[peak_field] = value

    def _max_over_ranks(self, values: dict) -> dict:
        """`values` (bytes or `None`) reduced to their maximum over processes; unchanged with one process."""
        if self._num_processes <= 1:
            return values
        # -1 stands for "not measured": every rank has the same device type, so all ranks agree on which are.
        encoded = torch.tensor(
            [-1 if value is None else value for value in values.values()], dtype=torch.int64, device=self.device
        )
        reduced = self.accelerator.reduce(encoded, reduction="max").tolist()
        return {key: (None if value < 0 else value) for key, value in zip(values, reduced)}

    def _log(self, values: dict, step: int, keep_until_trackers: bool = False) -> None:
        """Logs `values` through `accelerator.log` (main process only; kept for later if no tracker exists yet)."""
        if self.accelerator is None or not self._is_main_process:
            return
        if not self.accelerator.trackers:
            if keep_until_trackers:
                self._pending_logs.append((values, step))
            return
        self._log_pending()
        self.accelerator.log(values, step=step)

    def _log_pending(self) -> None:
        for pending_values, pending_step in self._pending_logs:
            self.accelerator.log(pending_values, step=pending_step)
        self._pending_logs.clear()

    def _log_step_values(self, values: dict, step: int) -> None:
        """Logs per-step `values` to every tracker; to TensorBoard as one event, without forcing a file flush.

        Through `accelerator.log`, accelerate's TensorBoard tracker writes one event per value and flushes the file,
        which waits for the writer thread (pure-Python CRCs per event): that was most of a logged step's cost. One
        event with all values goes to the same writer instead; the file is flushed by the trainer's next
        `accelerator.log` (the loss, every step), every `flush_secs`, and at `end_training`. Other trackers, and
        a TensorBoard tracker that is not torch's `SummaryWriter`, get their own `log`.
        """
        if self.accelerator is None or not self._is_main_process:
            return
        if self._pending_logs and self.accelerator.trackers:
            self._log_pending()
        for tracker in self.accelerator.trackers:
            file_writer = _torch_tensorboard_file_writer(tracker)
            if file_writer is not None:
                file_writer.add_summary(_scalars_summary(values), global_step=step)
            else:
                tracker.log(values, step=step)

    def milestone(self, name: str, step: int = 0) -> dict:
        """Records device memory, RSS and the breakdown at a named point of the run, and logs them.

        Tags: `memory/{name}/allocated_gib`, `memory/{name}/reserved_gib`, `memory/{name}/active_gib` (CUDA only),
        `memory/{name}/rss_gib`, and `memory/breakdown/{frozen_weights,trainable_params,gradients,optimizer_state}_gib`
        plus `memory/breakdown/activations_peak_gib` (CUDA only). A milestone taken before
        `accelerator.init_trackers` is logged as soon as trackers exist.

        Gradients count only while they exist: take a milestone between `backward()` and `optimizer.zero_grad()` to
        see them.

        Args:
            name: The milestone, e.g. `"after_model_load"`, `"after_adapter"`, `"after_first_step"`.
            step: The step the values are logged at.

        Returns:
            The values logged, by tag, in GiB.
        """
        stats = self._device_memory()
        self._update_peak(stats)
        measured = {field: stats.get(field) for field in MILESTONE_FIELDS}
        breakdown = self.breakdown()
        measured.update({f"breakdown/{field}": value for field, value in breakdown.to_dict().items()})
        measured = self._max_over_ranks(measured)
        self._update_peak(measured)
        self.milestones[name] = {field: measured[field] for field in ("allocated", "reserved", "rss")}
        self._last_breakdown = MemoryBreakdown(**{field: measured[f"breakdown/{field}"] for field in BREAKDOWN_FIELDS})
        values = {
            f"memory/{key}_gib" if key.startswith("breakdown/") else f"memory/{name}/{key}_gib": _gib(value)
            for key, value in measured.items()
            if value is not None
        }
        self._log(values, step, keep_until_trackers=True)
        logger.info(
            f"Memory at {name}: "
            + ", ".join(f"{key} {_format_bytes(value)}" for key, value in measured.items() if value is not None)
        )
        return values

    def log_step(self, step: int) -> dict | None:
        """Logs device memory and RSS every `log_every` steps; cheap: no walk over parameters.

        Tags: `memory/step/allocated_gib`, `memory/step/reserved_gib`, `memory/step/peak_allocated_gib` (CUDA only;
        the peak over the interval since the previous logged step, whose statistics are then reset), and
        `memory/step/rss_gib`, `memory/step/peak_rss_gib` (the process's lifetime peak).

        Args:
            step: The global step.

        Returns:
            The values logged, by tag, in GiB, or `None` on a step that is not logged.
        """
        if self.counting:
            self._steps_to_count -= 1
        if self.log_every < 1 or step % self.log_every:
            self._stop_counting_when_done()
            return None
        stats = self._device_memory()
        _reset_peak(self.device)
        if self.counting:
            self.counter.reset_peak()  # each logged peak covers its own interval, as on CUDA
        self._stop_counting_when_done()
        self._update_peak(stats)
        if self._num_processes > 1:
            stats = self._max_over_ranks({field: stats.get(field) for field in STEP_FIELDS})
            self._update_peak(stats)
        values = {_STEP_TAGS[field]: stats[field] / GIB for field in STEP_FIELDS if stats.get(field) is not None}
        self._log_step_values(values, step)
        self.steps_logged += 1
        return values

    def _stop_counting_when_done(self) -> None:
        if self.counting and self._steps_to_count <= 0:
            self._update_peak({"peak_allocated": self.counter.peak_bytes})
            self.counter.stop()

    def report(self) -> dict:
        """The run's memory as a JSON-ready dict, bytes as ints.

        Returns:
            `{"device", "milestones": {name: {"allocated", "reserved", "rss"}}, "peak": {"allocated", "reserved",
            "rss"}, "breakdown": {MemoryBreakdown fields}, "params": {"total", "trainable"}, "steps_logged"}`;
            `allocated` and `reserved` are `None` off CUDA. The breakdown is the last milestone's, or counted now if
            `watch` was called since; its `activations_peak` covers the whole run (on CUDA; `None` elsewhere).
        """
        self._update_peak(self._device_memory())
        breakdown = (self._last_breakdown or self.breakdown()).to_dict()
        if self._measures_device:
            # The milestone's estimate used the peak up to then; the run's peak may have come later.
            breakdown["activations_peak"] = _max_or_none(breakdown["activations_peak"], self._activations_peak())
        return {
            "device": str(self.device),
            "milestones": {name: dict(values) for name, values in self.milestones.items()},
            "peak": dict(self._peak),
            "breakdown": breakdown,
            "params": {"total": self._static.total_params, "trainable": self._static.trainable_param_count},
            "steps_logged": self.steps_logged,
        }

    def summary_table(self) -> str:
        """The report as markdown tables (sizes in GiB and MiB), for printing at the end of a run."""
        return report_markdown(self.report())

    def write_report(self, output_dir=None, extra: dict | None = None) -> tuple[Path, Path]:
        """Writes `memory_report.json` and `memory_report.md` (main process only; other processes write nothing).

        Args:
            output_dir: Folder to write to; defaults to the tracker's `output_dir`.
            extra: More JSON-ready top-level entries for the JSON report (e.g. the quantization summary); they may
                not replace the report's own keys.

        Returns:
            The paths of the JSON and the markdown report.
        """
        directory = Path(output_dir) if output_dir is not None else self.output_dir
        if directory is None:
            raise ValueError("write_report needs an output_dir: pass one here or to MemoryTracker")
        json_path, markdown_path = directory / REPORT_JSON, directory / REPORT_MARKDOWN
        if not self._is_main_process:
            return json_path, markdown_path
        report = self.report()
        clashing = set(extra or {}) & set(report)
        if clashing:
            raise ValueError(f"extra entries would replace the report's own keys: {sorted(clashing)}")
        directory.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**report, **(extra or {})}, indent=2) + "\n")
        markdown_path.write_text("# Memory report\n\n" + report_markdown(report) + "\n")
        logger.info(f"Wrote the memory report to {json_path} and {markdown_path}")
        return json_path, markdown_path
