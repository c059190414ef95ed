"""The chunked causal-LM loss equals transformers' loss and gradients (fp32, bf16, nf4, tied embeddings, soft-capping,
checkpointing), goes through the model's forward, restores the module tree, and never builds the full logits."""

import logging

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from diffusers_lowmem import adapters, chunked_loss, quantization, tiny

BATCH, SEQ = 2, 24
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
BF16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_config(**overrides) -> dict:
    """The tiny Llama's sizes, for the other architectures too."""
    config = {key: value for key, value in tiny.TINY_LLAMA_CONFIG.items() if not key.endswith("token_id")}
    return {**config, **overrides}


def with_random_adapter(model, seed: int = 0):
    """A LoRA on every linear layer with random (not zero) factors, so every adapter parameter gets a gradient."""
    network = adapters.attach_adapter(model, adapters.AdapterConfig(algo="lora", rank=4), role="llm")
    network.to(dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model, network


def make_batch(vocab_size: int, seed: int = 1) -> dict:
    """Token ids with ignored labels: the first sequence's first 5 positions and its last 3 (as padding would)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = chunked_loss.IGNORE_INDEX
    labels[0, -3:] = chunked_loss.IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_gradients(loss_fn, model, network, batch):
    network.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in network.named_parameters()}
    network.zero_grad(set_to_none=True)
    return loss.detach(), gradients


def assert_equal_to_plain(model, network, batch, chunk_size, tolerance):
    plain_loss, plain_gradients = loss_and_gradients(chunked_loss.plain_loss, model, network, batch)
    loss, gradients = loss_and_gradients(
        lambda m, b: chunked_loss.causal_lm_loss(m, b, chunk_size), model, network, batch
    )
    torch.testing.assert_close(loss.float(), plain_loss.float(), **tolerance)
    assert gradients.keys() == plain_gradients.keys() and len(gradients) > 0
    for name in gradients:
        assert gradients[name].abs().sum() > 0, name
        torch.testing.assert_close(gradients[name], plain_gradients[name], **tolerance, msg=name)


def tiny_llama(tie_word_embeddings: bool = False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**tiny_config(tie_word_embeddings=tie_word_embeddings))).eval()


@pytest.mark.parametrize("chunk_size", [1, 7, BATCH * SEQ, 1000])
def test_fp32_loss_and_adapter_gradients_equal_transformers_loss(chunk_size):
    model, network = with_random_adapter(tiny_llama())
    assert_equal_to_plain(model, network, make_batch(model.config.vocab_size), chunk_size, FP32_TOLERANCE)


@pytest.mark.parametrize("family", ["gpt2", "llama_tied"])
def test_tied_embeddings(family, tiny_gpt2_path):
    if family == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
        quantization.conv1d_to_linear_(model)
    else:  # SmolLM-style: a Llama whose output embedding is its input embedding
        model = tiny_llama(tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model, network = with_random_adapter(model)
    assert_equal_to_plain(model, network, make_batch(model.config.vocab_size), 5, FP32_TOLERANCE)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_gradient_checkpointing():
    model, network = with_random_adapter(tiny_llama())
    model.train()  # transformers checkpoints only in training mode
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_equal_to_plain(model, network, make_batch(model.config.vocab_size), 7, FP32_TOLERANCE)


def test_nf4_base():
    model = tiny_llama()
    quantization.quantize_model(model, "nf4", skip=quantization.DEFAULT_SKIP_CAUSAL_LM, compute_errors=False)
    model, network = with_random_adapter(model)
    assert_equal_to_plain(model, network, make_batch(model.config.vocab_size), 7, FP32_TOLERANCE)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_bf16_under_accelerate_autocast(quant):
    """As the trainer runs it: a bf16 base, fp32 adapters, accelerate's bf16 autocast around the prepared model's
    forward (the head applied per chunk outside it must run under the same autocast)."""
    model = tiny_llama().to(torch.bfloat16)
    if quant == "nf4":
        quantization.quantize_model(
            model, "nf4", compute_dtype=torch.bfloat16, skip=quantization.DEFAULT_SKIP_CAUSAL_LM, compute_errors=False
        )
    model, network = with_random_adapter(model)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    prepared = accelerator.prepare(model)
    batch = make_batch(model.config.vocab_size)
    plain_loss, plain_gradients = loss_and_gradients(chunked_loss.plain_loss, prepared, network, batch)
    loss, gradients = loss_and_gradients(lambda m, b: chunked_loss.causal_lm_loss(m, b, 7), prepared, network, batch)
    assert loss.dtype == plain_loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, **BF16_TOLERANCE)
    for name in gradients:
        scale = plain_gradients[name].abs().max()
        torch.testing.assert_close(gradients[name] / scale, plain_gradients[name] / scale, **BF16_TOLERANCE)


@pytest.mark.parametrize(
    "model_class, config",
    [
        (Gemma2ForCausalLM, Gemma2Config(**tiny_config(head_dim=16), final_logit_softcapping=0.5)),
        (CohereForCausalLM, CohereConfig(**tiny_config(), logit_scale=0.5)),
        (GraniteForCausalLM, GraniteConfig(**tiny_config(), logits_scaling=4.0)),
    ],
    ids=["gemma2_softcapping", "cohere_logit_scale", "granite_logits_scaling"],
)
def test_logit_transforms_after_the_head_are_reproduced(model_class, config, caplog):
    torch.manual_seed(0)
    model = model_class(config).eval()
    model, network = with_random_adapter(model)
    assert chunked_loss.unsupported_reason(model) is None
    assert chunked_loss.logit_transform(model.config) is not None
    assert_equal_to_plain(model, network, make_batch(model.config.vocab_size), 7, FP32_TOLERANCE)
    loss_fn = chunked_loss.CausalLMLoss(7)
    with caplog.at_level(logging.WARNING, logger=chunked_loss.__name__):
        loss_fn(model, make_batch(model.config.vocab_size))
    assert loss_fn.chunked and not [record for record in caplog.records if record.name == chunked_loss.__name__]


def test_a_logit_change_it_cannot_reproduce_falls_back_to_the_full_logits(caplog):
    """A Llama whose config carries Cohere's `logit_scale`: Llama ignores it, so applying it per chunk would be
    wrong; the check against the model's own output catches that and the loss falls back, with one warning."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(), logit_scale=0.5)).eval()
    model, network = with_random_adapter(model)
    batch = make_batch(model.config.vocab_size)
    loss_fn = chunked_loss.CausalLMLoss(7)
    with caplog.at_level(logging.WARNING, logger=chunked_loss.__name__):
        losses = [loss_and_gradients(loss_fn, model, network, batch) for _ in range(2)]
    plain_loss, plain_gradients = loss_and_gradients(chunked_loss.plain_loss, model, network, batch)
    assert not loss_fn.chunked and "does not reproduce" in loss_fn.fallback_reason
    warnings = [record for record in caplog.records if record.name == chunked_loss.__name__]
    assert len(warnings) == 1 and "--loss_chunk_size 7" in warnings[0].getMessage()
    for loss, gradients in losses:
        assert torch.equal(loss, plain_loss)
        assert all(torch.equal(gradients[name], plain_gradients[name]) for name in gradients)
    with pytest.raises(chunked_loss.UnsupportedModelError, match="does not reproduce"):
        chunked_loss.causal_lm_loss(model, batch, 7)


def test_goes_through_the_models_forward_and_restores_the_module_tree():
    model, network = with_random_adapter(tiny_llama())
    head = model.get_output_embeddings()
    modules_before = [(name, type(module)) for name, module in model.named_modules()]
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(sorted(kwargs)), with_kwargs=True)
    chunked_loss.causal_lm_loss(model, make_batch(model.config.vocab_size), 7).backward()
    assert calls == [["attention_mask", "input_ids"]]  # one forward, without labels
    assert model.get_output_embeddings() is head and model.lm_head is head
    assert [(name, type(module)) for name, module in model.named_modules()] == modules_before
    # Also when the forward fails.
    with pytest.raises(IndexError):
        chunked_loss.causal_lm_loss(model, {"input_ids": torch.full((1, 4), 10**6), "labels": torch.zeros(1, 4)}, 7)
    assert model.lm_head is head


class VocabularySizedTensors(TorchDispatchMode):
    """Records the rows of every tensor an operator creates whose last dimension is the vocabulary."""

    def __init__(self, vocab_size: int, exclude: list[torch.Tensor]):
        super().__init__()
        self.vocab_size = vocab_size
        self.excluded_storages = {tensor.untyped_storage().data_ptr() for tensor in exclude}
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(output):
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[-1] != self.vocab_size:
                continue
            if tensor.untyped_storage().data_ptr() in self.excluded_storages:  # the head's weight (transposed)
                continue
            self.rows.append(tensor.numel() // self.vocab_size)
        return output


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_full_logits_never_exist(checkpointing):
    model, network = with_random_adapter(tiny_llama())
    if checkpointing:
        model.train()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch(model.config.vocab_size)
    exclude = list(model.parameters())
    with VocabularySizedTensors(model.config.vocab_size, exclude) as plain:
        chunked_loss.plain_loss(model, batch).backward()
    with VocabularySizedTensors(model.config.vocab_size, exclude) as chunked:
        chunked_loss.causal_lm_loss(model, batch, 7).backward()
    assert max(plain.rows) == BATCH * SEQ
    assert max(chunked.rows) == 7 and len(chunked.rows) > 0
    with torch.no_grad(), VocabularySizedTensors(model.config.vocab_size, exclude) as evaluation:
        chunked_loss.causal_lm_loss(model, batch, 7)
    assert max(evaluation.rows) == 7


def test_no_grad_evaluation_and_all_ignored_labels_match_transformers():
    model = tiny_llama()
    batch = make_batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_loss.causal_lm_loss(model, batch, 5), chunked_loss.plain_loss(model, batch), **FP32_TOLERANCE
        )
        batch["labels"][:] = chunked_loss.IGNORE_INDEX
        assert chunked_loss.plain_loss(model, batch).isnan()
        assert chunked_loss.causal_lm_loss(model, batch, 5).isnan()


def test_causal_lm_loss_off_is_the_models_own_loss():
    model = tiny_llama()
    batch = make_batch(model.config.vocab_size)
    loss_fn = chunked_loss.CausalLMLoss(0)
    assert not loss_fn.chunked
    assert torch.equal(loss_fn(model, batch), model(**batch).loss)


def test_unsupported_models_are_named():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**tiny_config())).model  # a decoder without an output embedding
    assert "no output embedding" in chunked_loss.unsupported_reason(base)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss.causal_lm_loss(tiny_llama(), make_batch(10), 0)
    with pytest.raises(ValueError, match="labels"):
        chunked_loss.causal_lm_loss(tiny_llama(), {"input_ids": torch.zeros(1, 4, dtype=torch.long)}, 4)
