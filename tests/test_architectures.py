"""Real architectures built on meta from the shipped configs: parameter counts, layer split, tokenizers, tiny runs."""

import gc
import time

import psutil
import pytest
import torch
from torch import nn

from diffusers_lowmem import architectures
from diffusers_lowmem.architectures import ARCHITECTURES

MIB = 1024**2

MODEL_COMPONENTS = [(spec.name, component) for spec in ARCHITECTURES.values() for component in spec.model_components]

# Published parameter counts, written out here so that a changed config or spec cannot silently move both sides.
PUBLISHED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,  # CLIP ViT-L/14 text tower
    ("sd21", "unet"): 865_910_724,
    ("sd21", "vae"): 83_653_863,
    ("sd21", "text_encoder"): 340_387_840,  # OpenCLIP ViT-H/14 text tower, 23 of its 24 layers
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG/14 text tower with projection
    ("llama2-7b", "model"): 6_738_415_616,
    ("llama3-8b", "model"): 8_030_261_248,
}


def materialize_on_cpu(module: nn.Module, seed: int = 0) -> nn.Module:
    """Gives a meta module real CPU storage and a fresh init, keeping its (already real) buffers."""
    real_buffers = dict(module.named_buffers())
    module.to_empty(device="cpu")
    for name, buffer in real_buffers.items():
        owner_name, _, leaf = name.rpartition(".")
        module.get_submodule(owner_name)._buffers[leaf] = buffer

    torch.manual_seed(seed)
    initialized = set()
    for submodule in module.modules():
        if hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()
            initialized.update(id(parameter) for parameter in submodule.parameters(recurse=False))
    # What no `reset_parameters` covers: norm scales such as LlamaRMSNorm's weight start at one, the rest small.
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if id(parameter) in initialized:
                continue
            if parameter.ndim == 1:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.normal_(0.0, 0.02)
    return module


def test_list_architectures():
    assert architectures.list_architectures() == [
        "sd15",
        "sd21",
        "sdxl",
        "llama2-7b",
        "llama3-8b",
        "tiny-sd",
        "tiny-sdxl",
        "tiny-llama",
    ]
    tasks = {name: spec.task for name, spec in ARCHITECTURES.items()}
    assert [name for name, task in tasks.items() if task == "causal-lm"] == ["llama2-7b", "llama3-8b", "tiny-llama"]
    assert ARCHITECTURES["tiny-sdxl"].family == "sdxl"


def test_every_config_file_is_shipped_and_loads():
    for spec in ARCHITECTURES.values():
        for component, file_name in spec.components.items():
            assert (architectures.CONFIG_DIR / file_name).is_file()
            assert isinstance(architectures.load_config(spec.name, component), dict)


def test_unknown_names_are_reported():
    with pytest.raises(KeyError, match="unknown architecture 'sd3'"):
        architectures.load_config("sd3", "unet")
    with pytest.raises(KeyError, match="has no component 'unet'"):
        architectures.load_config("llama2-7b", "unet")


def test_published_shapes():
    unet = architectures.load_config("sd15", "unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["cross_attention_dim"] == 768
    sdxl_unet = architectures.load_config("sdxl", "unet")
    assert sdxl_unet["transformer_layers_per_block"] == [1, 2, 10]
    assert sdxl_unet["projection_class_embeddings_input_dim"] == 2816  # 6 x 256 time ids + 1280 pooled text
    assert architectures.load_config("sdxl", "vae")["scaling_factor"] == 0.13025
    assert architectures.load_config("sd21", "text_encoder")["num_hidden_layers"] == 23
    llama3 = architectures.load_config("llama3-8b", "model")
    assert (llama3["num_key_value_heads"], llama3["vocab_size"], llama3["rope_theta"]) == (8, 128256, 500000.0)


@pytest.mark.parametrize("name, component", MODEL_COMPONENTS)
def test_builds_on_meta_in_seconds(name, component):
    # Importing diffusers and transformers takes seconds of its own; the budget is for the build.
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, LlamaForCausalLM  # noqa: F401

    started = time.perf_counter()
    module = architectures.build_on_meta(name, component)
    elapsed = time.perf_counter() - started

    assert elapsed < 10.0
    assert {parameter.device.type for parameter in module.parameters()} == {"meta"}
    assert {parameter.dtype for parameter in module.parameters()} == {torch.float32}
    assert all(buffer.device.type == "cpu" for buffer in module.buffers())


def test_building_sd15_unet_allocates_no_weights():
    from diffusers import UNet2DConditionModel  # noqa: F401  (import cost is not the build's)

    architectures.build_on_meta("tiny-sd", "unet")  # first-use caches of diffusers and accelerate
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    unet = architectures.build_on_meta("sd15", "unet")
    rss_growth = psutil.Process().memory_info().rss - rss_before

    assert architectures.parameter_count(unet) * 4 > 3_200 * MIB  # what real fp32 weights would have cost
    assert rss_growth < 200 * MIB


@pytest.mark.parametrize("name, component", sorted(PUBLISHED))
def test_parameter_count_matches_published(name, component):
    assert ARCHITECTURES[name].published_params[component] == PUBLISHED[name, component]
    module = architectures.build_on_meta(name, component)
    assert architectures.parameter_count(module) == PUBLISHED[name, component]


def test_every_published_count_is_tested():
    specified = {(spec.name, c) for spec in ARCHITECTURES.values() for c in spec.published_params}
    assert specified == set(PUBLISHED)


def test_component_bytes():
    assert architectures.component_bytes("sd15", "unet", torch.bfloat16) == 2 * 859_520_964
    assert architectures.component_bytes("llama3-8b", "model", torch.float32) == 4 * 8_030_261_248
    assert architectures.component_bytes("tiny-sd", "unet", torch.float32) < 8 * MIB  # tiny means a few MB


def test_sd15_unet_linear_conv_split():
    split = architectures.parameters_by_layer_type(architectures.build_on_meta("sd15", "unet"))
    # 31.4 % linear (attention, feed-forward, time embedding); conv includes the 48,063,040 parameters of the 1x1
    # proj_in / proj_out convolutions that SD 1.x uses around its transformers.
    assert split == {"linear": 270_209_280, "conv": 589_111_364, "other": 200_320}
    assert round(split["linear"] / sum(split.values()), 3) == 0.314


def test_sdxl_unet_is_mostly_linear():
    unet = architectures.build_on_meta("sdxl", "unet")
    split = architectures.parameters_by_layer_type(unet)
    assert split == {"linear": 2_233_603_520, "conv": 333_272_004, "other": 588_160}
    assert round(split["linear"] / sum(split.values()), 3) == 0.870
    # 4 + 20 transformer blocks down, 10 in the middle, 30 + 6 up.
    assert sum(type(module).__name__ == "BasicTransformerBlock" for module in unet.modules()) == 70


@pytest.mark.parametrize("name, prediction_type", [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon")])
def test_scheduler_is_the_training_ddpm(name, prediction_type):
    scheduler = architectures.build_on_meta(name, "scheduler")
    assert type(scheduler).__name__ == "DDPMScheduler"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.betas[0].item() == pytest.approx(0.00085)
    assert scheduler.betas[-1].item() == pytest.approx(0.012)
    # scaled_linear: linear in sqrt(beta) over the 1000 steps.
    sqrt_beta_500 = 0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * 500 / 999
    assert scheduler.betas[500].item() == pytest.approx(sqrt_beta_500**2, rel=1e-5)


CAPTIONS = ["a photo of a cat riding a bicycle, 35mm, golden hour", "x", "Ünïcode ✓ " * 40]


@pytest.mark.parametrize(
    "name, component, vocab_size, pad_id",
    [
        ("sd15", "tokenizer", 49408, 49407),
        ("sd21", "tokenizer", 49408, 0),
        ("sdxl", "tokenizer", 49408, 49407),
        ("sdxl", "tokenizer_2", 49408, 0),
        ("tiny-sd", "tokenizer", 1000, 999),
        ("tiny-sdxl", "tokenizer_2", 1000, 0),
    ],
)
def test_clip_tokenizer_ids_and_length(name, component, vocab_size, pad_id):
    tokenizer = architectures.build_tokenizer(name, component)
    ids = tokenizer(CAPTIONS, max_length=tokenizer.model_max_length, padding="max_length", truncation=True).input_ids

    assert len(tokenizer) == vocab_size
    assert tokenizer.model_max_length == 77
    assert [len(row) for row in ids] == [77, 77, 77]
    assert max(max(row) for row in ids) == vocab_size - 1  # eos is the last id, as in CLIP
    assert min(min(row) for row in ids) >= 0
    assert (ids[0][0], tokenizer.eos_token_id, tokenizer.pad_token_id) == (vocab_size - 2, vocab_size - 1, pad_id)
    assert ids[1][:3] == [vocab_size - 2, ids[1][1], vocab_size - 1] and ids[1][3] == pad_id


@pytest.mark.parametrize(
    "name, vocab_size, bos_id, eos_id",
    [("llama2-7b", 32000, 1, 2), ("llama3-8b", 128256, 128000, 128001), ("tiny-llama", 1000, 1, 2)],
)
def test_llama_tokenizer_ids(name, vocab_size, bos_id, eos_id):
    tokenizer = architectures.build_tokenizer(name)
    ids = tokenizer(CAPTIONS).input_ids

    assert len(tokenizer) == vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (bos_id, eos_id)
    assert all(row[0] == bos_id for row in ids)
    assert all(0 <= token < vocab_size for row in ids for token in row)
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == CAPTIONS[0]


def test_tiny_sd_materializes_and_runs():
    tokenizer = architectures.build_tokenizer("tiny-sd")
    text_encoder = materialize_on_cpu(architectures.build_on_meta("tiny-sd", "text_encoder")).eval()
    vae = materialize_on_cpu(architectures.build_on_meta("tiny-sd", "vae")).eval()
    unet = materialize_on_cpu(architectures.build_on_meta("tiny-sd", "unet")).eval()

    ids = tokenizer(CAPTIONS[:2], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        encoder_hidden_states = text_encoder(ids.input_ids)[0]
        latents = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1).latent_dist.sample()
        noise_pred = unet(latents, torch.tensor([10, 500]), encoder_hidden_states).sample
        image = vae.decode(latents).sample

    assert encoder_hidden_states.shape == (2, 77, 32)
    assert latents.shape == (2, 4, 32, 32)
    assert noise_pred.shape == (2, 4, 32, 32)
    assert image.shape == (2, 3, 64, 64)
    assert torch.isfinite(noise_pred).all() and torch.isfinite(image).all()


def test_tiny_sdxl_materializes_and_runs():
    text_encoder = materialize_on_cpu(architectures.build_on_meta("tiny-sdxl", "text_encoder")).eval()
    text_encoder_2 = materialize_on_cpu(architectures.build_on_meta("tiny-sdxl", "text_encoder_2")).eval()
    unet = materialize_on_cpu(architectures.build_on_meta("tiny-sdxl", "unet")).eval()
    tokenizers = [architectures.build_tokenizer("tiny-sdxl", c) for c in ("tokenizer", "tokenizer_2")]

    with torch.no_grad():
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, (text_encoder, text_encoder_2)):
            ids = tokenizer(CAPTIONS[:2], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
            output = encoder(ids.input_ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
            pooled = getattr(output, "text_embeds", pooled)
        added_cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        encoder_hidden_states = torch.cat(hidden_states, dim=-1)
        latents = torch.randn(2, 4, 32, 32)
        noise_pred = unet(latents, torch.tensor([10, 500]), encoder_hidden_states, added_cond_kwargs=added_cond).sample

    assert encoder_hidden_states.shape == (2, 77, 64)
    assert pooled.shape == (2, 32)
    assert noise_pred.shape == (2, 4, 32, 32)
    assert torch.isfinite(noise_pred).all()


def test_tiny_llama_materializes_and_trains_one_step():
    tokenizer = architectures.build_tokenizer("tiny-llama")
    model = materialize_on_cpu(architectures.build_on_meta("tiny-llama", "model"))
    input_ids = tokenizer(CAPTIONS[0], return_tensors="pt").input_ids

    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()

    # A fresh model predicts about uniformly over the 1000 ids: the loss is near ln(1000) = 6.91.
    assert loss.item() == pytest.approx(6.91, abs=0.3)
    assert model.model.embed_tokens.weight.grad.shape == (1000, 64)


def test_cli_table(capsys):
    architectures.main()
    table = capsys.readouterr().out
    assert "| sd15 | unet | UNet2DConditionModel | 859,520,964 | 859,520,964 | 1.601 |" in table
    assert "| llama3-8b | model | LlamaForCausalLM | 8,030,261,248 | 8,030,261,248 | 14.958 |" in table
