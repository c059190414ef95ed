"""LyCORIS -> peft conversion on the tiny Llama and GPT-2 (no trainer): peft's own key format, exact scales, and
`PeftModel.from_pretrained` reproducing the LyCORIS-adapted outputs; what peft cannot represent is not written."""

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from diffusers_lowmem import adapters, peft_format, quantization, tiny
from diffusers_lowmem.adapters import AdapterConfig

LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_(network, seed=1, scale=0.1):
    """Fresh adapters are zero updates; random values in every factor make the comparison meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def token_ids(seed=0, vocab=tiny.LLAMA_VOCAB_SIZE):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def llama(quant="none"):
    model, _ = tiny.build_tiny_llama(seed=0)
    if quant != "none":
        quantization.quantize_model(model, quant, skip=quantization.DEFAULT_SKIP_CAUSAL_LM, compute_errors=False)
    return model


def adapted_llama(config, quant="none", seed=1):
    model = llama(quant)
    network = adapters.attach_adapter(model, config, role="llm")
    randomize_(network, seed=seed)
    return model, network


def assert_peft_reproduces(model, peft_dir, base, ids):
    """`PeftModel.from_pretrained(base, peft_dir)` computes what `model` (with its LyCORIS adapter) computes."""
    expected, without_adapter = logits(model, ids), logits(base, ids)
    # The update is not a no-op, so the comparison can tell a missing or mis-scaled adapter apart.
    assert (expected - without_adapter).abs().max() > 1e-3
    peft_model = PeftModel.from_pretrained(base, peft_dir)
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=1e-5, rtol=1e-5)


def test_keys_are_those_peft_itself_saves(tmp_path):
    """Our LoRA export and a peft model saved by peft name the same tensors with the same shapes."""
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    config = AdapterConfig(algo="lora", rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model, network = adapted_llama(config)
    assert peft_format.save_peft_adapter(ours_dir, network, config, model, "tiny-llama") == ours_dir

    reference = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    reference.save_pretrained(theirs_dir)
    ours, theirs = (
        load_file(ours_dir / "adapter_model.safetensors"),
        load_file(theirs_dir / "adapter_model.safetensors"),
    )
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours  # no adapter name in keys

    saved = json.loads((ours_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == 8
    assert saved["base_model_name_or_path"] == "tiny-llama" and saved["task_type"] == "CAUSAL_LM"
    assert sorted(saved["target_modules"]) == sorted(
        f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")
    )


@pytest.mark.parametrize(
    "config",
    [
        AdapterConfig(algo="lora", rank=4, alpha=8),
        AdapterConfig(algo="lora", rank=8, alpha=2),
        AdapterConfig(algo="locon", rank=4),
        AdapterConfig(algo="loha", rank=4, alpha=2),
        AdapterConfig(algo="lokr", rank=4, alpha=2),  # w1 full; w2 full on 64-dim layers, low rank on 128
        AdapterConfig(algo="lokr", rank=16, alpha=4),  # both factors full: LyCORIS scale 1 -> alpha_pattern
        AdapterConfig(algo="lokr", rank=2, alpha=4, lokr_factor=4),
    ],
    ids=lambda config: f"{config.algo}-r{config.rank}-a{config.alpha}-f{config.lokr_factor}",
)
def test_peft_model_reproduces_the_lycoris_outputs(config, tmp_path):
    model, network = adapted_llama(config)
    assert peft_format.save_peft_adapter(tmp_path, network, config, model, "tiny-llama") == tmp_path
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"lora": "LORA", "locon": "LORA", "loha": "LOHA", "lokr": "LOKR"}[config.algo]
    assert len(saved["target_modules"]) == 2 * len(LLAMA_LINEAR_NAMES)
    assert_peft_reproduces(model, tmp_path, llama(), token_ids())


def test_lokr_scale_one_with_two_full_factors_goes_to_alpha_pattern(tmp_path):
    """LyCORIS ignores alpha when both Kronecker factors are full; peft scales by alpha / r, so alpha becomes r."""
    config = AdapterConfig(algo="lokr", rank=6, alpha=3)
    model, network = adapted_llama(config)
    peft_config, _ = peft_format.peft_state_dict(network, config, model)
    scales = {
        path: peft_config.alpha_pattern.get(path, peft_config.alpha) / peft_config.rank_pattern.get(path, 6)
        for path in peft_config.target_modules
    }
    lycoris_scales = {path: module.scale for path, module, _ in peft_format.adapted_layers(network, model)}
    assert scales == pytest.approx(lycoris_scales)
    # Attention layers (64 = 8 x 8): both factors full, scale 1; MLP layers (128 = 8 x 16): w2 low rank, 3 / 6.
    assert set(scales.values()) == {1.0, 0.5}
    assert peft_format.save_peft_adapter(tmp_path, network, config, model) == tmp_path
    assert_peft_reproduces(model, tmp_path, llama(), token_ids())


def test_multiplier_is_folded_into_alpha(tmp_path):
    config = AdapterConfig(algo="lora", rank=4, alpha=4)
    model, network = adapted_llama(config)
    network.set_multiplier(0.5)
    peft_format.save_peft_adapter(tmp_path, network, config, model)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 2.0
    assert_peft_reproduces(model, tmp_path, llama(), token_ids())


@pytest.mark.parametrize("quant", ["nf4", "8bit"])
def test_lora_on_a_quantized_base_is_exported(quant, tmp_path):
    config = AdapterConfig(algo="lora", rank=4, alpha=8)
    model, network = adapted_llama(config, quant)
    assert peft_format.save_peft_adapter(tmp_path, network, config, model) == tmp_path
    assert_peft_reproduces(model, tmp_path, llama(quant), token_ids())


@pytest.mark.parametrize("quant", ["nf4", "8bit"])
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_loha_and_lokr_on_a_quantized_base_are_not_exported(algo, quant, tmp_path, caplog):
    config = AdapterConfig(algo=algo, rank=4)
    model, network = adapted_llama(config, quant)
    with caplog.at_level(logging.INFO, logger="diffusers_lowmem.peft_format"):
        assert peft_format.save_peft_adapter(tmp_path, network, config, model) is None
    assert "bitsandbytes" in caplog.text
    assert not list(tmp_path.iterdir())


def test_peft_on_nf4_cannot_run_loha(tmp_path):
    """Why LoHa on a quantized base is not exported: peft's LoHa layer fails on a packed 4-bit weight."""
    from peft import LoHaConfig

    peft_model = get_peft_model(llama("nf4"), LoHaConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(RuntimeError):
        logits(peft_model, token_ids())


def test_lokr_factorised_differently_from_peft_is_not_exported(tmp_path, caplog):
    """A factor above the square root: LyCORIS factors 64 as (4, 16), peft as (16, 4)."""
    config = AdapterConfig(algo="lokr", rank=2, lokr_factor=16)
    model, network = adapted_llama(config)
    with caplog.at_level(logging.INFO, logger="diffusers_lowmem.peft_format"):
        assert peft_format.save_peft_adapter(tmp_path, network, config, model) is None
    assert "lays the factors out differently" in caplog.text
    assert not list(tmp_path.iterdir())


def gpt2(seed=0):
    model, _ = tiny.build_tiny_gpt2(seed=seed)
    return model


def test_lora_on_gpt2_conv1d_loads_into_the_original_gpt2(tmp_path):
    """GPT-2's Conv1D layers are trained as nn.Linear; peft adapts the original Conv1D with fan_in_fan_out."""
    model = gpt2()
    converted = quantization.conv1d_to_linear_(model)
    config = AdapterConfig(algo="lora", rank=4, alpha=8)
    network = adapters.attach_adapter(model, config, role="llm")
    randomize_(network)
    assert peft_format.save_peft_adapter(tmp_path, network, config, model, conv1d_modules=converted) == tmp_path
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    assert sorted(saved["target_modules"]) == sorted(converted)
    assert_peft_reproduces(model, tmp_path, gpt2(), token_ids(vocab=tiny.GPT2_VOCAB_SIZE))


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_loha_and_lokr_on_gpt2_conv1d_are_not_exported(algo, tmp_path, caplog):
    model = gpt2()
    converted = quantization.conv1d_to_linear_(model)
    config = AdapterConfig(algo=algo, rank=4)
    network = adapters.attach_adapter(model, config, role="llm")
    with caplog.at_level(logging.INFO, logger="diffusers_lowmem.peft_format"):
        assert peft_format.save_peft_adapter(tmp_path, network, config, model, conv1d_modules=converted) is None
    assert "Conv1D" in caplog.text
