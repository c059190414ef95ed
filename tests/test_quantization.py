"""Tests of `diffusers_lowmem.quantization`: real bitsandbytes layers on the CPU, tiny models built here."""

import copy
import json
import logging

import bitsandbytes as bnb
import pytest
import torch
from accelerate import init_empty_weights
from torch import nn

from diffusers_lowmem.memory import count_bytes, stored_bytes
from diffusers_lowmem.quantization import (
    DEFAULT_SKIP_CAUSAL_LM,
    QUANT_MODES,
    QuantizationReport,
    conv1d_to_linear_,
    has_quantized_layers,
    is_quantized_module,
    matches_any,
    materialize_meta_,
    quantize_model,
    validate_quant_mode,
)

FLOAT32 = 4
WIDTH = 256
BNB_LAYER = {"8bit": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
# Bytes of the quantized 256x256 layers over their fp32 bytes (weight + bias): the asked-for bounds.
MAX_SIZE_RATIO = {"8bit": 0.3, "nf4": 0.16}
# Measured relative weight errors of normal(0, 0.02) weights: 8bit 0.0070, nf4 0.092 (the Llama's at most 0.0065 and
# 0.093, the UNet's 0.0040 and 0.096).
MAX_WEIGHT_ERROR = {"8bit": 0.01, "nf4": 0.12}
# Measured relative errors of `mlp()` against its fp32 copy (the LayerNorm amplifies), train / eval mode: outputs
# 8bit 0.010 / 0.017, nf4 0.136; input gradients 8bit 0.015 / 0.023, nf4 0.19.
MAX_MLP_OUTPUT_ERROR = {"8bit": 0.04, "nf4": 0.2}
MAX_MLP_INPUT_GRAD_ERROR = {"8bit": 0.05, "nf4": 0.3}


def mlp(seed: int = 0) -> nn.Sequential:
    """Two 256x256 linears around a LayerNorm, weights normal(0, 0.02) like a transformer's."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH))
    for layer in (model[0], model[3]):
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(layer.bias, std=0.02)
    return model


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    return ((approximation.float() - reference.float()).norm() / reference.float().norm()).item()


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def no_meta_tensors(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return all(tensor.device.type != "meta" for tensor in tensors)


# --------------------------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"), [("8bit", "8bit"), ("NF4", "nf4"), (None, None), ("none", None), ("", None)]
)
def test_validate_quant_mode_normalises_valid_values(mode, expected):
    assert validate_quant_mode(mode) == expected


def test_validate_quant_mode_names_the_choices():
    with pytest.raises(ValueError, match="8bit, nf4"):
        validate_quant_mode("int4")


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("lm_head", DEFAULT_SKIP_CAUSAL_LM, True),
        ("model.lm_head", ("lm_head",), True),
        ("model.my_lm_head", ("lm_head",), False),
        ("conv_in", "conv_in", True),
        ("down_blocks.0.attentions.0.proj_in", ("down_blocks.0.*",), True),
        ("up_blocks.0.attentions.0.proj_in", ("down_blocks.*",), False),
        ("to_q", None, False),
    ],
)
def test_matches_any_uses_full_names_dotted_suffixes_and_globs(name, patterns, expected):
    assert matches_any(name, patterns) is expected


# --------------------------------------------------------------------------------------------------------------------
# A small MLP: bytes, errors, gradients.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_converted_layers_shrink_and_report_agrees_with_stored_bytes(mode):
    model = mlp()
    layer_norm_bytes = stored_bytes(model[2])
    fp32_linear_bytes = 2 * (WIDTH * WIDTH + WIDTH) * FLOAT32

    report = quantize_model(model, mode)

    assert [layer.name for layer in report.layers] == ["0", "3"]
    assert [layer.shape for layer in report.layers] == [(WIDTH, WIDTH)] * 2
    assert report.bytes_before == fp32_linear_bytes
    assert report.bytes_after == count_bytes(list(model[0].parameters()) + list(model[3].parameters()))
    assert stored_bytes(model) == report.bytes_after + layer_norm_bytes
    assert report.bytes_after <= MAX_SIZE_RATIO[mode] * fp32_linear_bytes
    assert all(type(model[index]) is BNB_LAYER[mode] for index in (0, 3))
    assert is_quantized_module(model[0]) and not is_quantized_module(model[2])
    assert has_quantized_layers(model)


def test_int8_layer_bytes_are_weight_row_scales_and_bias():
    model = mlp()
    report = quantize_model(model, "8bit")
    # int8 weight, one float32 scale per output row (SCB), float32 bias.
    assert report.layers[0].bytes_after == WIDTH * WIDTH + WIDTH * FLOAT32 + WIDTH * FLOAT32
    assert model[0].weight.dtype == torch.int8 and model[0].weight.SCB.dtype == torch.float32


def test_nf4_double_quantization_stores_less_than_plain_block_scales():
    plain = quantize_model(mlp(), "nf4", double_quant=False)
    double = quantize_model(mlp(), "nf4", double_quant=True)
    packed_weight = WIDTH * WIDTH // 2
    # Plain: one float32 absmax per 64-weight block on top of the packed weight and the bias.
    assert plain.layers[0].bytes_after >= packed_weight + (WIDTH * WIDTH // 64) * FLOAT32 + WIDTH * FLOAT32
    assert double.layers[0].bytes_after < plain.layers[0].bytes_after


def test_nf4_storage_dtype_for_fsdp_changes_neither_bytes_nor_outputs():
    """FSDP flattens one dtype per unit: packed in bfloat16, the NF4 weights keep their bytes and their values."""
    inputs = torch.randn(4, WIDTH, dtype=torch.bfloat16)
    packed_uint8, packed_bf16 = mlp(), mlp()
    uint8_report = quantize_model(packed_uint8, "nf4", compute_dtype=torch.bfloat16)
    bf16_report = quantize_model(packed_bf16, "nf4", compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    assert packed_uint8[0].weight.dtype == torch.uint8 and packed_bf16[0].weight.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in packed_bf16.parameters()} == {torch.bfloat16}
    assert bf16_report.bytes_after == uint8_report.bytes_after
    assert stored_bytes(packed_bf16) == stored_bytes(packed_uint8)
    torch.testing.assert_close(packed_bf16(inputs), packed_uint8(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", QUANT_MODES)
def test_outputs_and_input_gradients_stay_close_and_weights_get_none(mode, training):
    # On the CPU a training-mode Linear8bitLt dequantizes and multiplies in float; in eval mode it runs the int8 matmul.
    model = mlp().train(training)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    inputs = torch.randn(8, WIDTH)
    reference_inputs = inputs.clone().requires_grad_()
    reference(reference_inputs).square().sum().backward()

    report = quantize_model(model, mode)
    quantized_inputs = inputs.clone().requires_grad_()
    output = model(quantized_inputs)
    output.square().sum().backward()

    assert all(0 < layer.relative_error < MAX_WEIGHT_ERROR[mode] for layer in report.layers)
    assert output.shape == (8, WIDTH) and output.dtype == torch.float32
    assert relative_error(output.detach(), reference(inputs)) < MAX_MLP_OUTPUT_ERROR[mode]
    assert quantized_inputs.grad.abs().sum() > 0
    assert relative_error(quantized_inputs.grad, reference_inputs.grad) < MAX_MLP_INPUT_GRAD_ERROR[mode]
    for index in (0, 3):
        assert model[index].training is training
        assert not model[index].weight.requires_grad and model[index].weight.grad is None
        assert not model[index].bias.requires_grad and model[index].bias.grad is None


def test_int8_cast_warning_is_logged_at_most_once(caplog):
    # Eval mode: on the CPU a training-mode Linear8bitLt dequantizes and multiplies in float (no int8 matmul, no warning).
    model = mlp().eval()
    quantize_model(model, "8bit")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            model(torch.randn(2, WIDTH))
    # bitsandbytes warns on every int8 matmul with a non-fp16 input: 6 records here without the filter.
    assert sum("MatMul8bitLt" in record.getMessage() for record in caplog.records) <= 1


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_bfloat16_compute_casts_biases_and_the_rest(mode):
    model = mlp()
    quantize_model(model, mode, compute_dtype=torch.bfloat16)

    output = model(torch.randn(4, WIDTH, dtype=torch.bfloat16))

    assert model[0].bias.dtype == torch.bfloat16 and model[2].weight.dtype == torch.bfloat16
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()


def test_cast_rest_false_keeps_the_rest_in_its_dtype():
    model = mlp()
    quantize_model(model, "nf4", compute_dtype=torch.bfloat16, cast_rest=False)
    assert model[2].weight.dtype == torch.float32 and model[0].bias.dtype == torch.bfloat16


def test_compute_errors_false_leaves_errors_unmeasured():
    report = quantize_model(mlp(), "nf4", compute_errors=False)
    assert [layer.relative_error for layer in report.layers] == [None, None]
    assert report.worst_layers() == []


# --------------------------------------------------------------------------------------------------------------------
# Skipping, names, errors.
# --------------------------------------------------------------------------------------------------------------------


def test_skip_patterns_keep_layers_in_full_precision():
    model = mlp()
    report = quantize_model(model, "8bit", skip=("3",))
    assert report.skipped == ["3"] and [layer.name for layer in report.layers] == ["0"]
    assert type(model[3]) is nn.Linear and model[3].weight.dtype == torch.float32


def test_model_without_linear_layers_raises_an_actionable_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="--quant nf4 found no nn.Linear layers to quantize in Sequential"):
        quantize_model(model, "nf4")


def test_all_linears_skipped_or_already_quantized_raises():
    with pytest.raises(ValueError, match=r"2 were skipped \(0, 3\)"):
        quantize_model(mlp(), "8bit", skip=("0", "3"))
    model = mlp()
    quantize_model(model, "8bit")
    with pytest.raises(ValueError, match="2 layers are already quantized"):
        quantize_model(model, "nf4")


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="8bit, nf4"):
        quantize_model(mlp(), "fp8")


def test_tied_weights_and_shared_modules():
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    model = nn.ModuleDict({"embed": nn.Embedding(32, 64), "head": nn.Linear(64, 32, bias=False)})
    model["head"].weight = model["embed"].weight
    model["first"], model["second"] = shared, shared

    report = quantize_model(model, "nf4")

    assert report.skipped == ["head"] and type(model["head"]) is nn.Linear
    assert model["head"].weight is model["embed"].weight
    # One shared layer is quantized once and stays shared under both names.
    assert [layer.name for layer in report.layers] == ["first"]
    assert model["first"] is model["second"] and is_quantized_module(model["second"])


def test_report_serialises_to_json_and_markdown_shows_totals():
    report = quantize_model(mlp(), "nf4", skip=("3",))
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["mode"] == "nf4" and as_dict["compute_dtype"] == "float32"
    assert as_dict["num_layers"] == 1 and as_dict["skipped"] == ["3"]
    assert as_dict["bytes_before"] == report.bytes_before == (WIDTH * WIDTH + WIDTH) * FLOAT32
    assert as_dict["layers"][0]["shape"] == [WIDTH, WIDTH]

    markdown = report.to_markdown()
    assert (
        f"| nf4 | float32 | 1 | 1 | {report.bytes_before / 2**20:.2f} | {report.bytes_after / 2**20:.2f} |" in markdown
    )
    assert f"| 0 | {WIDTH}x{WIDTH} | {report.layers[0].relative_error:.4f} |" in markdown


def test_empty_report_totals_are_zero():
    report = QuantizationReport(mode="8bit", compute_dtype="float32")
    assert (report.bytes_before, report.bytes_after, report.num_layers) == (0, 0, 0)
    assert "| 8bit | float32 | 0 | 0 |" in report.to_markdown()


# --------------------------------------------------------------------------------------------------------------------
# Real architectures.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_unet_linears_are_quantized_under_the_same_names(mode):
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    module_names = [name for name, _ in unet.named_modules()]
    linear_names = [name for name, module in unet.named_modules() if isinstance(module, nn.Linear)]
    torch.manual_seed(1)
    sample, timestep, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 32)

    report = quantize_model(unet, mode)
    with torch.no_grad():
        output = unet(sample, timestep, context).sample
        expected = reference(sample, timestep, context).sample

    assert [name for name, _ in unet.named_modules()] == module_names
    assert [layer.name for layer in report.layers] == linear_names and report.skipped == []
    assert all(type(unet.get_submodule(name)) is BNB_LAYER[mode] for name in linear_names)
    assert type(unet.conv_in) is nn.Conv2d
    assert output.shape == (1, 4, 8, 8) and torch.isfinite(output).all()
    # Measured: 8bit 0.0021, nf4 0.052.
    assert relative_error(output, expected) < {"8bit": 0.02, "nf4": 0.15}[mode]


def test_llama_keeps_lm_head_in_full_precision_with_the_default_skip():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    input_ids = torch.arange(16).unsqueeze(0)

    report = quantize_model(model, "nf4", skip=DEFAULT_SKIP_CAUSAL_LM)
    with torch.no_grad():
        logits = model(input_ids).logits
        expected = reference(input_ids).logits

    assert report.skipped == ["lm_head"] and type(model.lm_head) is nn.Linear
    # 7 linears a decoder layer: q, k, v, o, gate, up, down.
    assert report.num_layers == 14
    assert type(model.model.layers[0].self_attn.q_proj) is bnb.nn.Linear4bit
    assert logits.shape == (1, 16, 128)
    # Measured: 0.090.
    assert relative_error(logits, expected) < 0.15


# --------------------------------------------------------------------------------------------------------------------
# Meta-device models.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_meta_llama_is_materialised_and_quantized(mode):
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(tiny_llama_config())
    meta_linear_bytes = sum(stored_bytes(module) for module in model.modules() if isinstance(module, nn.Linear))

    torch.manual_seed(0)
    report = quantize_model(model, mode, compute_dtype=torch.bfloat16, skip=DEFAULT_SKIP_CAUSAL_LM)
    with torch.no_grad():
        logits = model(torch.arange(16).unsqueeze(0)).logits

    assert no_meta_tensors(model)
    assert report.num_layers == 14 and report.skipped == ["lm_head"]
    lm_head_bytes = 64 * 128 * FLOAT32
    assert report.bytes_before == meta_linear_bytes - lm_head_bytes
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.lm_head.weight.std().item() == pytest.approx(
        0.02, rel=0.1
    )
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert all(layer.relative_error < MAX_WEIGHT_ERROR[mode] for layer in report.layers)
    assert logits.shape == (1, 16, 128) and torch.isfinite(logits).all()


def test_materialize_meta_for_unquantized_profiling_keeps_ties_and_init_rules():
    with init_empty_weights():
        model = nn.ModuleDict(
            {
                "embed": nn.Embedding(32, 64),
                "norm": nn.LayerNorm(64),
                "head": nn.Linear(64, 32),
                "real": nn.Linear(4, 4),
            }
        )
    model["real"].to_empty(device="cpu")
    model["head"].weight = model["embed"].weight

    count = materialize_meta_(model, "cpu", torch.bfloat16)

    # embed/head weight (tied, once), norm weight and bias, head bias: real layer untouched.
    assert count == 4 and no_meta_tensors(model)
    assert model["head"].weight is model["embed"].weight and model["embed"].weight.dtype == torch.bfloat16
    assert torch.equal(model["norm"].weight, torch.ones(64, dtype=torch.bfloat16))
    assert torch.equal(model["norm"].bias, torch.zeros(64, dtype=torch.bfloat16))
    assert torch.equal(model["head"].bias, torch.zeros(32, dtype=torch.bfloat16))
    assert model["real"].weight.dtype == torch.float32
    assert materialize_meta_(model, "cpu", torch.bfloat16) == 0


def test_conv1d_to_linear_keeps_gpt2_outputs_and_makes_it_quantizable():
    from diffusers_lowmem import tiny

    model, _ = tiny.build_tiny_gpt2(seed=0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids).logits
    replaced = conv1d_to_linear_(model)
    assert len(replaced) == 4 * model.config.n_layer and "transformer.h.0.attn.c_attn" in replaced
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, before, atol=1e-5, rtol=1e-5)
    report = quantize_model(model, "nf4", skip=DEFAULT_SKIP_CAUSAL_LM)
    assert len(report.layers) == len(replaced)


def test_an_eval_forward_leaves_nf4_layers_in_the_layout_training_needs():
    """bitsandbytes repacks a Linear4bit's weight for its CPU inference kernel at the first no-grad eval forward on
    AVX512-BF16 CPUs, after which no gradient goes through the layer (and layers narrower than a block crash):
    quantize_model's layers keep the standard layout, so training after an evaluation gets the same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    quantize_model(model, "nf4", compute_errors=False)
    packed = model[0].weight.data.clone()

    def input_gradient():
        inputs = torch.randn(4, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        model(inputs).sum().backward()
        return inputs.grad

    expected = input_gradient()
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 32))
    model.train()
    assert torch.equal(model[0].weight.data, packed)
    torch.testing.assert_close(input_gradient(), expected)
