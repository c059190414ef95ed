"""The causal-LM loss over sequence chunks, so that the full-vocabulary logits never exist at once.

transformers' `ForCausalLM` models compute `logits = lm_head(hidden_states)` for every position (batch x sequence x
vocabulary; for Llama-3's 128,256-token vocabulary at batch 2 x 2,048 tokens that is 1 GiB in bf16), then the loss
upcasts them to fp32 (2 GiB) and `cross_entropy` keeps its fp32 `log_softmax` for backward (2 GiB more), and
backward builds gradients of the same size. `causal_lm_loss` instead:

1. runs the model's own forward (so DDP, accelerate's autocast wrapper and every hook see the call) with the output
   embedding temporarily replaced by a pass-through that returns the final hidden states (batch x sequence x
   hidden: 32 MiB in that example), and no `labels`;
2. applies the real output embedding per chunk of `chunk_size` tokens inside the loss, under
   `torch.utils.checkpoint` (non-reentrant), so each chunk's logits are freed at once and recomputed in backward;
3. returns `sum of per-chunk cross-entropy sums / number of tokens with a label`, which is transformers'
   `ForCausalLMLoss`: labels shifted by one, `-100` ignored, mean over the valid tokens of the whole batch.

Models that change their logits after the output embedding are handled where the change is known and elementwise
(Gemma 2/3 `final_logit_softcapping`, Cohere `logit_scale`, Granite `logits_scaling`), and checked once per model:
the model's own transform of the pass-through's output must equal ours exactly; a model that does something else
falls back to the plain loss with one warning. The module tree is restored after every call, so saving, peft export
and `accelerator.unwrap_model` see the original model.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Tokens per chunk. Each chunk's logits live only while the chunk is computed (and again while it is recomputed in
# backward): 256 tokens x 128,256 (Llama 3) in fp32 is 125 MiB per tensor, against 2 GiB per tensor for the whole
# batch 2 x 2,048 at once. Large enough that the per-chunk matrix product stays efficient on a GPU.
DEFAULT_CHUNK_SIZE = 256


class UnsupportedModelError(ValueError):
    """The model's output cannot be reproduced chunk by chunk (why in the message)."""


class _HiddenStatesPassthrough(nn.Module):
    """Stands in for the output embedding during the forward: returns its input, the final hidden states, and keeps
    it and the autocast state in force, so the real head can be applied per chunk under the same autocast."""

    def __init__(self):
        super().__init__()
        self.hidden_states = None
        self.autocast_kwargs = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.hidden_states = hidden_states
        self.autocast_kwargs = _autocast_kwargs(hidden_states.device.type)
        return hidden_states


def _autocast_kwargs(device_type: str) -> dict:
    return {
        "device_type": device_type,
        "dtype": torch.get_autocast_dtype(device_type),
        "enabled": torch.is_autocast_enabled(device_type),
    }


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel or `torch.compile` wrappers (`.module`, `._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The elementwise change a transformers model makes to `lm_head`'s output before its loss, from its config.

    Args:
        config: The model's `PretrainedConfig`.

    Returns:
        None for models that use the head's output as is (Llama, GPT-2, Mistral, Qwen, ...), else the function:
        `tanh(x / c) * c` for `final_logit_softcapping` (Gemma 2/3), `x * logit_scale` (Cohere),
        `x / logits_scaling` (Granite).

    Raises:
        UnsupportedModelError: If the config asks for more than one of them.
    """
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale = getattr(config, "logit_scale", None)
    logits_scaling = getattr(config, "logits_scaling", None)
    given = [name for name, value in (("final_logit_softcapping", softcap), ("logit_scale", logit_scale),
                                      ("logits_scaling", logits_scaling)) if value is not None]  # fmt: skip
    if len(given) > 1:
        raise UnsupportedModelError(f"the config sets several logit transforms ({', '.join(given)})")
    if softcap is not None:
        return lambda logits: torch.tanh(logits / softcap) * softcap
    if logit_scale is not None:
        return lambda logits: logits * logit_scale
    if logits_scaling is not None:
        return lambda logits: logits / logits_scaling
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `causal_lm_loss` cannot compute `model`'s loss chunk by chunk, or None when it can.

    The head is called outside the model's forward, so wrappers that gather parameters only inside it (FSDP,
    DeepSpeed ZeRO-3) are refused, as are models without an output embedding.
    """
    for module in model.modules():
        if "FullyShardedDataParallel" in type(module).__name__ or type(module).__name__.startswith("FSDP"):
            return "FSDP gathers the output embedding only inside the model's forward"
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        return f"{type(inner).__name__} has no output embedding (get_output_embeddings() is None)"
    if any(hasattr(parameter, "ds_status") for parameter in head.parameters()):
        return "DeepSpeed ZeRO-3 gathers the output embedding only inside the model's forward"
    try:
        logit_transform(inner.config)
    except UnsupportedModelError as error:
        return str(error)
    return None


def _parent_and_name(root: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for parent in root.modules():
        for name, child in parent.named_children():
            if child is module:
                return parent, name
    raise UnsupportedModelError(f"the output embedding of {type(root).__name__} is not one of its submodules")


@contextlib.contextmanager
def head_replaced_by_passthrough(model: nn.Module):
    """Within the block, `model`'s output embedding is a `_HiddenStatesPassthrough` (yielded with the real head).

    Args:
        model: A transformers causal LM, possibly wrapped (DDP, accelerate).

    Yields:
        `(passthrough, head)`.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings()
    parent, name = _parent_and_name(inner, head)
    passthrough = _HiddenStatesPassthrough()
    setattr(parent, name, passthrough)
    try:
        yield passthrough, head
    finally:
        setattr(parent, name, head)


def _chunk_loss_sum(hidden_chunk, labels_chunk, head, transform, autocast_kwargs) -> torch.Tensor:
    # As in the model's forward and transformers' ForCausalLMLoss: head (and transform) under the forward's autocast,
    # logits upcast to fp32, summed cross-entropy over the chunk's valid tokens.
    with torch.autocast(**autocast_kwargs):
        logits = head(hidden_chunk)
        if transform is not None:
            logits = transform(logits)
        return F.cross_entropy(logits.float(), labels_chunk, ignore_index=IGNORE_INDEX, reduction="sum")


# Models whose output under the pass-through was checked against the logit transform (once per model object).
_verified_models: weakref.WeakSet = weakref.WeakSet()


def _verify_transform(inner: nn.Module, hidden: torch.Tensor, model_logits: torch.Tensor, transform) -> None:
    if inner in _verified_models:
        return
    if transform is None and model_logits is hidden:  # the head's output went to the loss untouched
        _verified_models.add(inner)
        return
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(hidden):  # memory estimation: no values to compare
        return
    with torch.no_grad():
        expected = hidden if transform is None else transform(hidden)
        if model_logits.shape != expected.shape or not torch.equal(model_logits.float(), expected.float()):
            raise UnsupportedModelError(
                f"{type(inner).__name__} changes the output embedding's result before its loss in a way this loss"
                " does not reproduce"
            )
    _verified_models.add(inner)


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int = DEFAULT_CHUNK_SIZE):
    """transformers' causal-LM loss of `model` on `batch`, computed `chunk_size` tokens at a time.

    Equal to `model(**batch).loss` (up to the summation order of floating point): labels shifted by one, `-100`
    ignored, mean over every labelled token of the batch. The logits of one chunk exist at a time, in forward and
    again in backward (recomputed from the chunk's hidden states), never those of the whole batch.

    Args:
        model: A transformers causal LM (`get_output_embeddings()`), possibly wrapped by DDP or accelerate.
        batch: The model's inputs with `labels` (batch x sequence, int64); `input_ids`, `attention_mask`, ...
        chunk_size: Tokens (over batch x sequence) per chunk, >= 1.

    Returns:
        The scalar fp32 loss, with a graph to the trainable parameters when gradients are enabled.

    Raises:
        ValueError: If `chunk_size` < 1 or `batch` has no `labels`.
        UnsupportedModelError: If the model's logits cannot be reproduced chunk by chunk (see `unsupported_reason`),
            or the model changed the pass-through's output other than by `logit_transform`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}")
    if "labels" not in batch:
        raise ValueError("causal_lm_loss needs batch['labels'] (the inputs' token ids, -100 where ignored)")
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedModelError(reason)
    inner = unwrap_model(model)
    transform = logit_transform(inner.config)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with head_replaced_by_passthrough(model) as (passthrough, head):
        outputs = model(**inputs)
    hidden, autocast_kwargs = passthrough.hidden_states, passthrough.autocast_kwargs
    passthrough.hidden_states = None
    if hidden is None:
        raise UnsupportedModelError(f"{type(inner).__name__}'s forward did not call its output embedding")
    model_logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    _verify_transform(inner, hidden, model_logits, transform)
    del outputs, model_logits

    labels = batch["labels"].to(hidden.device)
    shift_labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # as ForCausalLMLoss
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if flat_hidden.shape[0] != shift_labels.shape[0]:
        raise UnsupportedModelError(
            f"the output embedding saw {flat_hidden.shape[0]} positions but the labels have {shift_labels.shape[0]}"
        )
    loss_sum = None
    for start in range(0, flat_hidden.shape[0], chunk_size):
        end = start + chunk_size
        chunk_sum = checkpoint(
            _chunk_loss_sum,
            flat_hidden[start:end],
            shift_labels[start:end],
            head,
            transform,
            autocast_kwargs,
            use_reentrant=False,
        )
        loss_sum = chunk_sum if loss_sum is None else loss_sum + chunk_sum
    return loss_sum / (shift_labels != IGNORE_INDEX).sum()


def plain_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss, `model(**batch).loss`, on the full logits (upstream's)."""
    return model(**batch).loss


class CausalLMLoss:
    """The trainer's loss: `causal_lm_loss` with `chunk_size` tokens, or the model's own loss when chunking is off
    or the model is not supported (then one warning says why, and every later call uses the plain loss).

    Args:
        chunk_size: Tokens per chunk; 0 or None computes `model(**batch).loss` as upstream.
    """

    def __init__(self, chunk_size: int | None = DEFAULT_CHUNK_SIZE):
        self.chunk_size = chunk_size or 0
        self.fallback_reason = None

    @property
    def chunked(self) -> bool:
        """Whether calls compute the loss chunk by chunk."""
        return bool(self.chunk_size) and self.fallback_reason is None

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of `model` on `batch` (with `labels`); see `causal_lm_loss`."""
        if self.chunked:
            try:
                return causal_lm_loss(model, batch, self.chunk_size)
            except UnsupportedModelError as error:
                self.fallback_reason = str(error)
                logger.warning(
                    f"--loss_chunk_size {self.chunk_size}: {error}; computing the loss on the full logits instead."
                )
        return plain_loss(model, batch)
