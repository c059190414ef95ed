"""LyCORIS adapters on the tiny UNet, text encoders and Llama: identity at init, parameter counts, save/load,
merge, quantized bases, kohya key names and agreement with diffusers' `load_lora_weights`."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

from diffusers_lowmem import adapters, quantization, tiny
from diffusers_lowmem.adapters import ADAPTER_ALGOS, AdapterConfig

ALGOS = list(ADAPTER_ALGOS)


def unet_inputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor([10, 500]), hidden


def unet_output(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def text_output(text_encoder, input_ids):
    with torch.no_grad():
        return text_encoder(input_ids)[0]


def randomize_(network, seed=1, scale=0.05):
    """Fresh adapters are zero updates; give every adapter tensor random values so outputs change."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture
def sd_pipeline():
    return tiny.build_tiny_sd_pipeline(seed=0)


@pytest.fixture
def input_ids(sd_pipeline):
    return sd_pipeline.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids


@pytest.mark.parametrize("algo", ALGOS)
def test_fresh_adapter_leaves_outputs_unchanged(sd_pipeline, input_ids, algo):
    unet, text_encoder = sd_pipeline.unet, sd_pipeline.text_encoder
    inputs = unet_inputs(unet)
    unet_before, text_before = unet_output(unet, inputs), text_output(text_encoder, input_ids)

    adapters.attach_adapter(unet, AdapterConfig(algo=algo, rank=4), role="unet")
    adapters.attach_adapter(text_encoder, AdapterConfig(algo=algo, rank=4), role="text_encoder")

    assert torch.equal(unet_output(unet, inputs), unet_before)
    assert torch.equal(text_output(text_encoder, input_ids), text_before)


@pytest.mark.parametrize("algo", ALGOS)
def test_only_adapter_parameters_train_and_count_matches_formula(sd_pipeline, algo):
    config = AdapterConfig(algo=algo, rank=4, conv_rank=2)
    unet = sd_pipeline.unet
    network = adapters.attach_adapter(unet, config, role="unet")

    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith(adapters.ADAPTER_MODULE_NAME + ".") for name in trainable)
    expected = sum(adapters.trainable_parameter_count(config, module.org_module[0]) for module in network.loras)
    assert sum(p.numel() for p in unet.parameters() if p.requires_grad) == expected
    if algo in ("lora", "locon"):
        # Hand check of one layer: r (in + out) for a 32 -> 32 attention projection.
        to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        assert adapters.trainable_parameter_count(config, to_q) == 4 * (to_q.in_features + to_q.out_features)


def test_lora_is_linear_only_and_locon_adds_resnet_convolutions(sd_pipeline):
    lora_targets = adapters.find_target_modules(sd_pipeline.unet, "unet", AdapterConfig(algo="lora"))
    locon_targets = adapters.find_target_modules(sd_pipeline.unet, "unet", AdapterConfig(algo="locon"))
    assert all(".attentions." in name for name in lora_targets)
    assert not any("resnets" in name for name in lora_targets)
    spatial = [name for name, m in locon_targets.items() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert any(name.endswith("resnets.0.conv1") for name in spatial)
    assert set(lora_targets) < set(locon_targets)


def test_target_modules_narrow_and_unknown_pattern_raises(sd_pipeline):
    config = AdapterConfig(algo="lora", target_modules=("to_q", "to_v"))
    targets = adapters.find_target_modules(sd_pipeline.unet, "unet", config)
    assert targets and all(name.endswith(("to_q", "to_v")) for name in targets)
    with pytest.raises(ValueError, match="no_such_layer"):
        adapters.find_target_modules(sd_pipeline.unet, "unet", AdapterConfig(target_modules=("no_such_layer",)))


def test_key_names_follow_kohya_convention(sd_pipeline, tmp_path):
    config = AdapterConfig(algo="lora", rank=4)
    networks = {
        "unet": adapters.attach_adapter(sd_pipeline.unet, config, role="unet"),
        "text_encoder": adapters.attach_adapter(sd_pipeline.text_encoder, config, role="text_encoder"),
    }
    path = adapters.save_adapter(tmp_path, networks, config, metadata={"base_model": "tiny"})
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for key in keys)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == "lora"
    assert json.loads(metadata["diffusers_lowmem.roles"]) == ["text_encoder", "unet"]
    assert metadata["diffusers_lowmem.base_model"] == "tiny"
    assert AdapterConfig.from_metadata(metadata) == config


def test_sdxl_text_encoders_get_te1_and_te2_prefixes():
    pipeline = tiny.build_tiny_sdxl_pipeline(seed=0)
    config = AdapterConfig(algo="lokr", rank=4)
    te1 = adapters.attach_adapter(pipeline.text_encoder, config, role="text_encoder", sdxl=True)
    te2 = adapters.attach_adapter(pipeline.text_encoder_2, config, role="text_encoder_2", sdxl=True)
    assert all(k.startswith("lora_te1_text_model_encoder_layers_") for k in te1.state_dict())
    assert all(k.startswith("lora_te2_text_model_encoder_layers_") for k in te2.state_dict())


@pytest.mark.parametrize("algo", ALGOS)
def test_save_then_load_reproduces_outputs_exactly(sd_pipeline, input_ids, tmp_path, algo):
    config = AdapterConfig(algo=algo, rank=4, alpha=2.0)
    networks = {
        "unet": adapters.attach_adapter(sd_pipeline.unet, config, role="unet"),
        "text_encoder": adapters.attach_adapter(sd_pipeline.text_encoder, config, role="text_encoder"),
    }
    for seed, network in enumerate(networks.values()):
        randomize_(network, seed=seed + 1)
    inputs = unet_inputs(sd_pipeline.unet)
    trained_unet = unet_output(sd_pipeline.unet, inputs)
    trained_text = text_output(sd_pipeline.text_encoder, input_ids)
    path = adapters.save_adapter(tmp_path, networks, config)

    fresh = tiny.build_tiny_sd_pipeline(seed=0)
    base_unet = unet_output(fresh.unet, inputs)
    loaded = adapters.load_adapter(fresh, tmp_path)

    assert set(loaded) == {"unet", "text_encoder"}
    assert not torch.equal(trained_unet, base_unet)
    assert torch.equal(unet_output(fresh.unet, inputs), trained_unet)
    assert torch.equal(text_output(fresh.text_encoder, input_ids), trained_text)
    assert path == adapters.resolve_weight_file(tmp_path)


@pytest.mark.parametrize("algo", ALGOS)
def test_merged_equals_unmerged(sd_pipeline, tmp_path, algo):
    config = AdapterConfig(algo=algo, rank=4, alpha=2.0, conv_alpha=1.0)  # scales other than 1 must merge right
    network = adapters.attach_adapter(sd_pipeline.unet, config, role="unet")
    randomize_(network, scale=0.02)
    inputs = unet_inputs(sd_pipeline.unet)
    unmerged = unet_output(sd_pipeline.unet, inputs)
    adapters.save_adapter(tmp_path, {"unet": network}, config)

    fresh = tiny.build_tiny_sd_pipeline(seed=0)
    adapters.load_adapter(fresh.unet, tmp_path, merge=True)

    assert not hasattr(fresh.unet, adapters.ADAPTER_MODULE_NAME)
    torch.testing.assert_close(unet_output(fresh.unet, inputs), unmerged, atol=1e-5, rtol=0)


def test_multiplier_zero_is_the_base_model(sd_pipeline, tmp_path):
    config = AdapterConfig(algo="loha", rank=4)
    network = adapters.attach_adapter(sd_pipeline.unet, config, role="unet")
    randomize_(network)
    adapters.save_adapter(tmp_path, {"unet": network}, config)
    fresh = tiny.build_tiny_sd_pipeline(seed=0)
    inputs = unet_inputs(fresh.unet)
    base = unet_output(fresh.unet, inputs)
    adapters.load_adapter(fresh.unet, tmp_path, multiplier=0.0)
    assert torch.equal(unet_output(fresh.unet, inputs), base)


@pytest.mark.parametrize("mode", ["8bit", "nf4"])
@pytest.mark.parametrize("algo", ALGOS)
def test_adapters_train_on_quantized_bases(sd_pipeline, input_ids, mode, algo):
    unet, text_encoder = sd_pipeline.unet, sd_pipeline.text_encoder
    quantization.quantize_model(unet, mode, compute_errors=False)
    quantization.quantize_model(text_encoder, mode, compute_errors=False)
    config = AdapterConfig(algo=algo, rank=4)
    inputs = unet_inputs(unet)
    before = unet_output(unet, inputs)
    unet_network = adapters.attach_adapter(unet, config, role="unet")
    text_network = adapters.attach_adapter(text_encoder, config, role="text_encoder")
    assert torch.equal(unet_output(unet, inputs), before)
    assert all(
        module.bypass_mode for module in unet_network.loras if quantization.is_quantized_module(module.org_module[0])
    )

    sample, timesteps, _ = inputs
    sample = sample.clone().requires_grad_(True)
    hidden = text_encoder(input_ids.repeat(2, 1))[0]
    loss = unet(sample, timesteps, hidden).sample.square().mean()
    loss.backward()

    for network in (unet_network, text_network):
        grads = [p.grad for p in network.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    frozen = [p for n, p in unet.named_parameters() if not n.startswith(adapters.ADAPTER_MODULE_NAME)]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("mode", ["nf4"])
@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_load_into_quantized_model_matches_and_refuses_merge(sd_pipeline, tmp_path, mode, algo):
    config = AdapterConfig(algo=algo, rank=4)
    quantization.quantize_model(sd_pipeline.unet, mode, compute_errors=False)
    network = adapters.attach_adapter(sd_pipeline.unet, config, role="unet")
    randomize_(network, scale=0.02)
    inputs = unet_inputs(sd_pipeline.unet)
    trained = unet_output(sd_pipeline.unet, inputs)
    adapters.save_adapter(tmp_path, {"unet": network}, config)

    fresh = tiny.build_tiny_sd_pipeline(seed=0)
    quantization.quantize_model(fresh.unet, mode, compute_errors=False)
    adapters.load_adapter(fresh.unet, tmp_path)
    assert torch.equal(unet_output(fresh.unet, inputs), trained)

    other = tiny.build_tiny_sd_pipeline(seed=0)
    quantization.quantize_model(other.unet, mode, compute_errors=False)
    with pytest.raises(ValueError, match="quantized"):
        adapters.load_adapter(other.unet, tmp_path, merge=True)


@pytest.mark.parametrize("algo", ["lora", "locon"])
def test_diffusers_load_lora_weights_agrees_with_load_adapter(sd_pipeline, input_ids, tmp_path, algo):
    config = AdapterConfig(algo=algo, rank=4, alpha=2.0)
    networks = {
        "unet": adapters.attach_adapter(sd_pipeline.unet, config, role="unet"),
        "text_encoder": adapters.attach_adapter(sd_pipeline.text_encoder, config, role="text_encoder"),
    }
    for seed, network in enumerate(networks.values()):
        randomize_(network, seed=seed + 3, scale=0.03)
    adapters.save_adapter(tmp_path, networks, config)
    inputs = unet_inputs(sd_pipeline.unet)

    ours = tiny.build_tiny_sd_pipeline(seed=0)
    adapters.load_adapter(ours, tmp_path)
    theirs = tiny.build_tiny_sd_pipeline(seed=0)
    base_unet = unet_output(theirs.unet, inputs)
    theirs.load_lora_weights(str(tmp_path))

    ours_unet, theirs_unet = unet_output(ours.unet, inputs), unet_output(theirs.unet, inputs)
    assert (theirs_unet - base_unet).abs().max() > 1e-3  # diffusers applied it
    torch.testing.assert_close(theirs_unet, ours_unet, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        text_output(theirs.text_encoder, input_ids), text_output(ours.text_encoder, input_ids), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("algo", ALGOS)
def test_llm_adapters_on_all_linear_layers_except_head(algo, tmp_path):
    model, _ = tiny.build_tiny_llama(seed=0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids).logits
    config = AdapterConfig(algo=algo, rank=4)
    network = adapters.attach_adapter(model, config, role="llm")
    names = {module.lora_name for module in network.loras}
    linear_names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.startswith("lycoris")
    }
    assert names == {adapters.lora_name("lycoris", name) for name in linear_names}
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, before)
    randomize_(network, scale=0.02)
    with torch.no_grad():
        trained = model(input_ids).logits
    adapters.save_adapter(tmp_path / adapters.LYCORIS_WEIGHT_NAME, {"llm": network}, config)

    fresh, _ = tiny.build_tiny_llama(seed=0)
    adapters.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids).logits, trained)


def test_locon_on_a_model_without_convolutions_says_it_is_lora(caplog):
    model, _ = tiny.build_tiny_llama(seed=0)
    with caplog.at_level(logging.INFO, logger="diffusers_lowmem.adapters"):
        network = adapters.attach_adapter(model, AdapterConfig(algo="locon"), role="llm")
    assert "is lora" in caplog.text
    assert all(type(module).__name__ == "LoConModule" for module in network.loras)


def test_load_adapter_weights_restores_and_rejects_other_configs(sd_pipeline, tmp_path):
    config = AdapterConfig(algo="lokr", rank=4)
    network = adapters.attach_adapter(sd_pipeline.unet, config, role="unet")
    randomize_(network)
    path = adapters.save_adapter(tmp_path, {"unet": network}, config)
    saved = {k: v.clone() for k, v in network.state_dict().items()}

    other = tiny.build_tiny_sd_pipeline(seed=0)
    other_network = adapters.attach_adapter(other.unet, config, role="unet")
    adapters.load_adapter_weights({"unet": other_network}, path)
    assert all(torch.equal(other_network.state_dict()[k], v) for k, v in saved.items())

    third = tiny.build_tiny_sd_pipeline(seed=0)
    lora_network = adapters.attach_adapter(third.unet, AdapterConfig(algo="lora"), role="unet")
    with pytest.raises(ValueError, match="does not match"):
        adapters.load_adapter_weights({"unet": lora_network}, path)


def test_loading_into_the_wrong_model_names_the_problem(sd_pipeline, tmp_path):
    config = AdapterConfig(algo="lora")
    network = adapters.attach_adapter(sd_pipeline.unet, config, role="unet")
    adapters.save_adapter(tmp_path, {"unet": network}, config)
    model, _ = tiny.build_tiny_llama(seed=0)
    with pytest.raises(ValueError, match="different model"):
        adapters.load_adapter(model, tmp_path)


def test_unknown_algorithm_and_bad_rank_raise():
    with pytest.raises(ValueError, match="Unknown adapter"):
        AdapterConfig(algo="dora")
    with pytest.raises(ValueError, match="rank"):
        AdapterConfig(rank=0)


@pytest.mark.parametrize("algo", ALGOS)
def test_merge_adapter_on_a_trained_llm_equals_the_adapted_model(algo):
    model, _ = tiny.build_tiny_llama(seed=0)
    network = adapters.attach_adapter(model, AdapterConfig(algo=algo, rank=4, alpha=2.0), role="llm")
    randomize_(network, scale=0.02)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids).logits
    adapters.merge_adapter(model)
    assert not hasattr(model, adapters.ADAPTER_MODULE_NAME)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, adapted, atol=1e-5, rtol=0)


def test_dropout_is_applied_in_training_and_off_in_eval(sd_pipeline):
    unet = sd_pipeline.unet
    network = adapters.attach_adapter(unet, AdapterConfig(algo="loha", rank=4, dropout=0.5), role="unet")
    randomize_(network)
    inputs = unet_inputs(unet)
    unet.eval()
    assert torch.equal(unet_output(unet, inputs), unet_output(unet, inputs))
    unet.train()
    torch.manual_seed(0)
    first = unet_output(unet, inputs)
    torch.manual_seed(1)
    assert not torch.equal(first, unet_output(unet, inputs))


def test_gpt2_adapter_loads_into_a_fresh_gpt2(tmp_path):
    model, _ = tiny.build_tiny_gpt2(seed=0)
    quantization.conv1d_to_linear_(model)
    config = AdapterConfig(algo="lokr", rank=4)
    network = adapters.attach_adapter(model, config, role="llm")
    randomize_(network, scale=0.02)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(input_ids).logits
    adapters.save_adapter(tmp_path / adapters.LYCORIS_WEIGHT_NAME, {"llm": network}, config)
    fresh, _ = tiny.build_tiny_gpt2(seed=0)  # Conv1D layers, as transformers loads them
    adapters.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids).logits, trained, atol=1e-5, rtol=1e-5)


def test_role_prefixed_target_patterns_narrow_one_model_each(sd_pipeline, tmp_path):
    unet, text_encoder = sd_pipeline.unet, sd_pipeline.text_encoder
    config = AdapterConfig(algo="lora", target_modules=("unet:to_q", "text_encoder:q_proj", "to_v"))
    unet_targets = adapters.find_target_modules(unet, "unet", config)
    text_targets = adapters.find_target_modules(text_encoder, "text_encoder", config)
    assert {name.rsplit(".", 1)[1] for name in unet_targets} == {"to_q", "to_v"}
    assert {name.rsplit(".", 1)[1] for name in text_targets} == {"q_proj"}  # to_v names no CLIP layer

    # A model no pattern applies to keeps its preset's targets.
    unet_only = AdapterConfig(algo="lora", target_modules=("unet:to_q",))
    assert adapters.find_target_modules(text_encoder, "text_encoder", unet_only).keys() == (
        adapters.find_target_modules(text_encoder, "text_encoder", AdapterConfig(algo="lora")).keys()
    )
    networks = {
        "unet": adapters.attach_adapter(unet, config, role="unet"),
        "text_encoder": adapters.attach_adapter(text_encoder, config, role="text_encoder"),
    }
    path = adapters.save_adapter(tmp_path, networks, config)
    fresh = tiny.build_tiny_sd_pipeline(seed=0)
    loaded = adapters.load_adapter(fresh, path)
    assert {module.lora_name for module in loaded["text_encoder"].loras} == {
        adapters.lora_name("lora_te_text_model", name) for name in text_targets
    }
    assert AdapterConfig.from_metadata(json_metadata(path)) == config


def json_metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_pattern_matching_nothing_in_one_model_names_it_and_its_prefix(sd_pipeline):
    """A UNet-only pattern with --train_text_encoder: the error names the text encoder and `text_encoder:`."""
    config = AdapterConfig(algo="lora", target_modules=("to_q", "to_k"))
    assert adapters.find_target_modules(sd_pipeline.unet, "unet", config)
    with pytest.raises(ValueError) as raised:
        adapters.find_target_modules(sd_pipeline.text_encoder, "text_encoder", config)
    message = str(raised.value)
    assert "the text_encoder (CLIPTextModel)" in message and "--target_modules to_q to_k" in message
    assert "'text_encoder:'" in message and "q_proj" in message and "text_encoder:" in message


@pytest.mark.parametrize("pattern, expected", [("vae:conv_in", "unknown role prefix 'vae'"), ("unet:", "no module")])
def test_bad_role_prefix_is_refused_by_the_config(pattern, expected):
    with pytest.raises(ValueError, match=expected):
        AdapterConfig(target_modules=(pattern,))
    assert adapters.split_target_pattern("text_encoder_2:q_proj") == ("text_encoder_2", "q_proj")
    assert adapters.split_target_pattern("down_blocks.0.*") == (None, "down_blocks.0.*")
