"""Quantized convolutions: stored bytes, outputs and input gradients close to the float layer, nothing saved for
backward, and LyCORIS adapters training on a tiny UNet whose convolutions are quantized."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from diffusers_lowmem import adapters, memory
from diffusers_lowmem.memory import stored_bytes
from diffusers_lowmem.quantization import is_quantized_module, quantize_model
from diffusers_lowmem.quantized_conv import QuantizedConv1d, QuantizedConv2d, is_quantized_conv, quantize_conv

MAX_BYTES_RATIO = {"nf4": 0.16, "8bit": 0.30}  # of the fp32 weight and bias
MAX_OUTPUT_ERROR = {"nf4": 0.12, "8bit": 0.02}


def relative_error(approximation, reference):
    return ((approximation - reference).norm() / reference.norm()).item()


# Sizes of a UNet's layers: the per-layer quantization maps (about 1 KiB) are negligible beside their weights.
CONVS = {
    "conv2d 3x3": lambda: nn.Conv2d(128, 128, 3, padding=1),
    "conv2d strided, grouped": lambda: nn.Conv2d(256, 256, 3, stride=2, padding=1, groups=2),
    "conv2d 1x1 no bias": lambda: nn.Conv2d(256, 512, 1, bias=False),
    "conv1d reflect padding": lambda: nn.Conv1d(128, 256, 5, padding=2, padding_mode="reflect"),
}


@pytest.mark.parametrize("mode", ["nf4", "8bit"])
@pytest.mark.parametrize("kind", CONVS)
def test_quantized_conv_is_small_close_and_frozen(kind, mode):
    torch.manual_seed(0)
    conv = CONVS[kind]().requires_grad_(False)
    quantized = quantize_conv(conv, mode)
    assert isinstance(quantized, QuantizedConv2d if conv.weight.dim() == 4 else QuantizedConv1d)
    assert is_quantized_module(quantized) and is_quantized_conv(quantized) and not is_quantized_module(conv)
    assert stored_bytes(quantized) <= MAX_BYTES_RATIO[mode] * stored_bytes(conv)
    assert memory._logical_numel(quantized.weight) == conv.weight.numel()  # counted as weights, not bytes

    spatial = (16,) * (conv.weight.dim() - 2)
    inputs = torch.randn(2, conv.in_channels, *spatial, requires_grad=True)
    reference_inputs = inputs.detach().clone().requires_grad_()
    output, reference = quantized(inputs), conv(reference_inputs)
    assert output.shape == reference.shape and output.dtype == torch.float32
    assert relative_error(output, reference) < MAX_OUTPUT_ERROR[mode]
    output.square().sum().backward()
    reference.square().sum().backward()
    assert relative_error(inputs.grad, reference_inputs.grad) < MAX_OUTPUT_ERROR[mode]
    assert all(parameter.grad is None for parameter in quantized.parameters())
    torch.testing.assert_close(quantized.dequantized_weight(), quantized.dequantized_weight())  # deterministic


def test_backward_keeps_no_activation_or_dequantized_weight():
    """A float conv saves its input and weight for backward; the frozen quantized one saves neither."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    conv = nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)
    inputs = torch.randn(2, 64, 32, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        conv(inputs).sum().backward()
    assert sum(saved) > 0
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        quantize_conv(conv, "nf4")(inputs).sum().backward()
    assert sum(saved) == 0


def test_bfloat16_compute_returns_the_input_dtype():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    quantized = quantize_conv(conv, "nf4", compute_dtype=torch.bfloat16)
    assert quantized.bias.dtype == torch.bfloat16 and quantized.dequantized_weight().dtype == torch.bfloat16
    inputs = torch.randn(1, 16, 8, 8)
    assert quantized(inputs).dtype == torch.float32
    assert quantized(inputs.bfloat16()).dtype == torch.bfloat16


def test_only_plain_convolutions_are_taken():
    with pytest.raises(ValueError, match="plain nn.Conv1d or nn.Conv2d"):
        quantize_conv(nn.Linear(4, 4), "nf4")
    with pytest.raises(ValueError, match="Unknown quantization mode"):
        quantize_conv(nn.Conv2d(4, 4, 1), "int4")


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd_path):
    return UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").requires_grad_(False)


def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    encoder = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 500]), encoder


@pytest.mark.parametrize("mode", ["nf4", "8bit"])
def test_quantize_model_with_convolutions_shrinks_the_unet_further(tiny_unet, mode):
    linear_only, everything = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    quantize_model(linear_only, mode)
    report = quantize_model(everything, mode, convolutions=True, skip=["conv_in"])
    convolutions = [name for name, module in everything.named_modules() if isinstance(module, nn.Conv2d)]
    quantized_convolutions = [name for name in convolutions if is_quantized_module(everything.get_submodule(name))]
    assert "conv_in" in report.skipped and "conv_in" not in quantized_convolutions
    assert set(quantized_convolutions) == set(convolutions) - {"conv_in"}
    assert {layer.name for layer in report.layers} >= set(quantized_convolutions)
    assert all(layer.relative_error < MAX_OUTPUT_ERROR[mode] * 2 for layer in report.layers)
    assert stored_bytes(everything) < 0.6 * stored_bytes(linear_only)
    with torch.no_grad():
        reference = tiny_unet(*unet_inputs(tiny_unet)).sample
        output = everything(*unet_inputs(everything)).sample
    assert output.shape == reference.shape and torch.isfinite(output).all()


@pytest.mark.parametrize("algo", adapters.ADAPTER_ALGOS)
def test_adapters_train_save_and_load_on_quantized_convolutions(algo, tiny_unet, tmp_path):
    unet = copy.deepcopy(tiny_unet)
    quantize_model(unet, "nf4", convolutions=True)
    config = adapters.AdapterConfig(algo=algo, rank=4)
    network = adapters.attach_adapter(unet, config, role="unet")
    adapted = {module.lora_name for module in network.modules() if hasattr(module, "org_module")}
    # ResNet convolutions (all quantized here) are adapted by the conv algorithms only.
    assert any("resnets" in name and name.endswith("conv1") for name in adapted) == (algo in adapters.CONV_ALGOS)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    for _ in range(2):
        unet(*unet_inputs(unet)).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    frozen = [parameter for name, parameter in unet.named_parameters() if adapters.ADAPTER_MODULE_NAME not in name]
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in frozen)
    with torch.no_grad():
        trained_output = unet(*unet_inputs(unet)).sample
    adapters.save_adapter(tmp_path, {"unet": network}, config)

    fresh = copy.deepcopy(tiny_unet)
    quantize_model(fresh, "nf4", convolutions=True)
    with torch.no_grad():
        untrained_output = fresh(*unet_inputs(fresh)).sample
        adapters.load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh(*unet_inputs(fresh)).sample, trained_output, rtol=0, atol=1e-6)
    assert relative_error(trained_output, untrained_output) > 1e-4


@pytest.mark.parametrize("quant_skip", [None, ["*resnets*"], []])
def test_the_trainer_quantizes_unet_convolutions_but_conv_in_and_conv_out(tiny_unet, quant_skip):
    import argparse

    from diffusers_lowmem.train_text_to_image import place_frozen_model

    unet = copy.deepcopy(tiny_unet)
    args = argparse.Namespace(quant="nf4", quant_skip=quant_skip, validation_loss_steps=None)
    place_frozen_model(unet, args, torch.float32, torch.device("cpu"), role="unet")
    convolutions = {name: module for name, module in unet.named_modules() if isinstance(module, nn.Conv2d)}
    quantized = {name for name, module in convolutions.items() if is_quantized_conv(module)}
    if quant_skip is None:
        assert quantized == set(convolutions) - {"conv_in", "conv_out"}
    elif not quant_skip:  # `--quant_skip` with no pattern: every convolution
        assert quantized == set(convolutions)
    else:
        assert quantized == {name for name in convolutions if "resnets" not in name}
