"""Activations saved for backward kept in host memory: copied off the device in forward, back in backward.

`offload_activations()` is a `torch.autograd.graph.saved_tensors_hooks` context: every tensor autograd saves while
it is active (outside checkpointed regions) is copied to host memory (pinned when CUDA is available, copied without
blocking) and copied back when backward needs it. With non-reentrant gradient checkpointing (transformers'
`gradient_checkpointing_enable(use_reentrant=False)`, diffusers' checkpointing) the only activations kept per layer
are the layer's inputs, and torch saves those through the same hooks (`_CheckpointFrame.save_inputs`), so they move
to the host too; `tests/test_activation_offload.py` checks that each decoder layer's input is offloaded.

Unlike `torch.autograd.graph.save_on_cpu`, which copies every saved tensor, this skips what offloading cannot help
or would make worse:

- parameters and views of them (linear layers save the weight's transpose; copying it would move the model),
- tensors below `min_bytes` (the copy's latency costs more than the bytes save),
- tensors already on the host (unless `copy_host_tensors`, which tests and the CPU benchmark use to exercise the
  copy path without a GPU),
- a tensor saved again by another op (q, k and v projections share their input): it is copied once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger(__name__)

# Tensors smaller than this stay on the device: a decoder layer's input is MiBs (Llama-3-8B, 2 x 2,048 tokens in
# bf16: 32 MiB), while biases, norms' statistics and masks are KiBs.
DEFAULT_MIN_BYTES = 1 << 20
HOST = torch.device("cpu")

# Set by `simulated_host`: makes the context under which host copies are made (None: offload for real).
_host_copy_context: Callable[[], contextlib.AbstractContextManager] | None = None


def _pause_active_counters() -> contextlib.ExitStack:
    """Pauses every active dispatch mode that counts tensors (those with a `paused()` context, such as
    `memory.LiveTensorCounter`), so tensors made inside are not counted."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    stack = contextlib.ExitStack()
    for mode in _get_current_dispatch_mode_stack():
        if callable(getattr(mode, "paused", None)):
            stack.enter_context(mode.paused())
    return stack


@contextlib.contextmanager
def simulated_host(host_copy_context: Callable[[], contextlib.AbstractContextManager] | None = None):
    """For memory estimates whose fake run puts the trainer's device tensors on the CPU: inside the block every
    `ActivationOffload` made also moves CPU tensors, and makes each host copy under `host_copy_context()`, so a
    counter of device memory sees the activation leave and not its copy arrive (and sees it come back in backward).

    Args:
        host_copy_context: Makes a context in which new tensors are not counted; None pauses every active counting
            dispatch mode (`memory.LiveTensorCounter.paused`).
    """
    global _host_copy_context
    previous, _host_copy_context = _host_copy_context, host_copy_context or _pause_active_counters
    try:
        yield
    finally:
        _host_copy_context = previous


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep large activations in host memory; counts what it moved.

    Args:
        pin_memory: Copy into page-locked host memory, without blocking (None: when CUDA is available).
        min_bytes: Smallest tensor (in bytes) that is offloaded.
        copy_host_tensors: Also copy tensors already on the host (to test and benchmark the copy path on a CPU).

    Attributes:
        offloaded_tensors: How many tensors were copied to the host.
        offloaded_bytes: Their bytes.
        offloaded_shapes: Their shapes, in order.
    """

    def __init__(self, pin_memory: bool | None = None, min_bytes: int = DEFAULT_MIN_BYTES, copy_host_tensors=False):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.min_bytes = min_bytes
        self._host_copy_context = _host_copy_context or contextlib.nullcontext
        self.copy_host_tensors = copy_host_tensors or _host_copy_context is not None
        self.offloaded_tensors = 0
        self.offloaded_bytes = 0
        self.offloaded_shapes: list[tuple[int, ...]] = []
        # The same tensor object saved twice (and not modified in between) shares one host copy.
        self._host_copies = WeakIdKeyDictionary()
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> ActivationOffload:
        super().__enter__()
        return self

    def _keeps_on_device(self, tensor: torch.Tensor) -> bool:
        return (
            isinstance(tensor, nn.Parameter)
            or isinstance(tensor._base, nn.Parameter)  # a weight's transpose, saved by linear layers
            or (type(tensor) is not torch.Tensor and not is_fake(tensor))  # DTensor and other subclasses
            or tensor.layout is not torch.strided
            or tensor.numel() * tensor.element_size() < self.min_bytes
            or (tensor.device.type == HOST.type and not self.copy_host_tensors)
            or tensor.device.type == "meta"
        )

    def _pack(self, tensor: torch.Tensor):
        if self._keeps_on_device(tensor):
            return tensor
        copy = self._host_copies.get(tensor)
        if copy is not None and copy[0] == tensor._version:
            return copy[1]
        pin = self.pin_memory and tensor.device.type != HOST.type and not is_fake(tensor)
        with self._host_copy_context():
            host = torch.empty(tensor.size(), dtype=tensor.dtype, device=HOST, pin_memory=pin)
            # Non-blocking into pinned memory: the copy is ordered on the device's stream before any later reuse of
            # the tensor's memory by the caching allocator and before the copy back in backward.
            host.copy_(tensor, non_blocking=pin)
        packed = (tensor.device, host, pin)
        self._host_copies[tensor] = (tensor._version, packed)
        self.offloaded_tensors += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        self.offloaded_shapes.append(tuple(tensor.shape))
        return packed

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, pin = packed
        return host.to(device, non_blocking=pin) if device != host.device else host.clone()


def offload_activations(
    enabled: bool = True,
    pin_memory: bool | None = None,
    min_bytes: int = DEFAULT_MIN_BYTES,
    copy_host_tensors: bool = False,
):
    """A context under which the activations autograd saves live in host memory until backward.

    Wrap the forward (and loss) only; backward may run outside it.

    Args:
        enabled: False returns a context that does nothing (so call sites need no branch).
        pin_memory: Page-locked host memory with non-blocking copies (None: when CUDA is available).
        min_bytes: Smallest tensor, in bytes, worth moving.
        copy_host_tensors: Also copy tensors that are already on the host (tests, CPU benchmarks).

    Returns:
        An `ActivationOffload` (with its counters) or a `contextlib.nullcontext()`.
    """
    if not enabled:
        return contextlib.nullcontext()
    return ActivationOffload(pin_memory=pin_memory, min_bytes=min_bytes, copy_host_tensors=copy_host_tensors)
