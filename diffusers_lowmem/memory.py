"""Memory accounting: exact tensor bytes as stored, device statistics, and the `MemoryTracker` both trainers use."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

GIB = 1024**3


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
