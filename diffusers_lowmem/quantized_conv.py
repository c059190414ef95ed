"""Frozen convolutions stored in bitsandbytes' blockwise formats (NF4 or 8-bit), dequantized per forward.

bitsandbytes quantizes `nn.Linear` only, but most of a Stable Diffusion UNet's weights are convolutions (68.5 % of
SD 1.5's). `QuantizedConv1d` / `QuantizedConv2d` store a frozen convolution's weight with bitsandbytes' own
functional API (`quantize_4bit` with NF4 and double quantization, or `quantize_blockwise`) and dequantize it in the
compute dtype at each forward. Backward recomputes the dequantized weight instead of saving it, as bitsandbytes does
for `Linear4bit`, so training memory holds only the packed weight per layer; nor is the input saved: the weight is
frozen, so only the input gradient is computed.

They subclass `nn.Conv1d` / `nn.Conv2d`, so LyCORIS adapts them like any convolution (in bypass mode, as on
bitsandbytes linear layers).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

QUANTIZED_CONV_MODES = ("8bit", "nf4")
NF4_BLOCKSIZE = 64
INT8_BLOCKSIZE = 256  # bitsandbytes' blocksize for 8-bit optimizer states; 4096 (its default) loses small filters
_CONV_OPS = {
    1: (F.conv1d, torch.nn.grad.conv1d_input),
    2: (F.conv2d, torch.nn.grad.conv2d_input),
}


def _bnb_functional():
    import bitsandbytes.functional as bnb_functional

    return bnb_functional


class _FrozenQuantizedConv(torch.autograd.Function):
    """`conv(input, dequantize(packed weight))` whose backward dequantizes again and returns only the input gradient."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, module: _QuantizedConvMixin, padding) -> torch.Tensor:
        ctx.module, ctx.padding, ctx.input_shape = module, padding, inputs.shape
        conv, _ = _CONV_OPS[module.spatial_dims]
        weight = module.dequantized_weight(inputs.dtype)
        return conv(inputs, weight, None, module.stride, padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        module = ctx.module
        _, conv_input_grad = _CONV_OPS[module.spatial_dims]
        weight = module.dequantized_weight(grad_output.dtype)
        grad_input = conv_input_grad(
            ctx.input_shape, weight, grad_output, module.stride, ctx.padding, module.dilation, module.groups
        )
        return grad_input, None, None


class _QuantizedConvMixin:
    """Storage, dequantization and forward shared by the 1-d and 2-d quantized convolutions.

    The packed weight is a frozen `nn.Parameter` named `weight` (uint8, as bitsandbytes packs it); the quantization
    state (block scales, quantization map and, for NF4, the double-quantized scales) is kept in buffers, so `.to()`,
    `state_dict()` and the memory breakdown see it.
    """

    spatial_dims: int
    # None until `_store`: LyCORIS builds its adapter convolutions as `type(org_module)(...)`, i.e. as this class
    # with an ordinary float weight; those must behave as plain convolutions.
    quant_mode: str | None = None

    def _store(self, weight: torch.Tensor, mode: str, compute_dtype: torch.dtype) -> None:
        bnb_functional = _bnb_functional()
        self.quant_mode, self.compute_dtype, self.weight_shape = mode, compute_dtype, tuple(weight.shape)
        flat = weight.detach().reshape(-1).to(compute_dtype)
        if mode == "nf4":
            packed, state = bnb_functional.quantize_4bit(
                flat, blocksize=NF4_BLOCKSIZE, compress_statistics=True, quant_type="nf4"
            )
            self.blocksize, self.nested_blocksize = state.blocksize, state.state2.blocksize
            buffers = {
                "absmax": state.absmax,
                "quant_map": state.code,
                "offset": state.offset,
                "nested_absmax": state.state2.absmax,
                "nested_quant_map": state.state2.code,
            }
        else:
            packed, state = bnb_functional.quantize_blockwise(flat.float(), blocksize=INT8_BLOCKSIZE)
            self.blocksize, self.nested_blocksize = state.blocksize, None
            buffers = {"absmax": state.absmax, "quant_map": state.code}
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight.logical_shape = torch.Size(self.weight_shape)  # parameter counts count weights, not bytes
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def _quant_state(self):
        bnb_functional = _bnb_functional()
        if self.quant_mode == "8bit":
            return bnb_functional.QuantState(
                absmax=self.absmax, code=self.quant_map, blocksize=self.blocksize, dtype=torch.float32
            )
        nested = bnb_functional.QuantState(
            absmax=self.nested_absmax, code=self.nested_quant_map, blocksize=self.nested_blocksize, dtype=torch.float32
        )
        return bnb_functional.QuantState(
            absmax=self.absmax,
            shape=torch.Size([self.weight_numel]),
            code=self.quant_map,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.compute_dtype,
            offset=self.offset,
            state2=nested,
        )

    @property
    def weight_numel(self) -> int:
        return int(torch.Size(self.weight_shape).numel())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, in `dtype` (default: the compute dtype), of the convolution's shape."""
        bnb_functional = _bnb_functional()
        if self.quant_mode == "nf4":
            flat = bnb_functional.dequantize_4bit(self.weight, self._quant_state())
        else:
            flat = bnb_functional.dequantize_blockwise(self.weight, self._quant_state())
        return flat[: self.weight_numel].reshape(self.weight_shape).to(dtype or self.compute_dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.quant_mode is None:
            return super().forward(inputs)
        input_dtype = inputs.dtype
        inputs = inputs.to(self.compute_dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            inputs = F.pad(inputs, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        output = _FrozenQuantizedConv.apply(inputs, self, padding)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype).view(1, -1, *([1] * self.spatial_dims))
        return output.to(input_dtype)

    def extra_repr(self) -> str:
        if self.quant_mode is None:
            return super().extra_repr()
        return f"{super().extra_repr()}, quant_mode={self.quant_mode}, compute_dtype={self.compute_dtype}"


class QuantizedConv1d(_QuantizedConvMixin, nn.Conv1d):
    """A frozen `nn.Conv1d` whose weight is stored quantized; build it with `quantize_conv`."""

    spatial_dims = 1


class QuantizedConv2d(_QuantizedConvMixin, nn.Conv2d):
    """A frozen `nn.Conv2d` whose weight is stored quantized; build it with `quantize_conv`."""

    spatial_dims = 2


_QUANTIZED_CLASSES = {nn.Conv1d: QuantizedConv1d, nn.Conv2d: QuantizedConv2d}


def is_quantized_conv(module: nn.Module) -> bool:
    """A convolution whose weight `quantize_conv` stored quantized."""
    return isinstance(module, _QuantizedConvMixin) and module.quant_mode is not None


def is_quantizable_conv(module: nn.Module) -> bool:
    """A plain `nn.Conv1d` / `nn.Conv2d` (not already quantized, not a subclass with its own forward)."""
    return type(module) in _QUANTIZED_CLASSES


def quantize_conv(
    conv: nn.Conv1d | nn.Conv2d,
    mode: str,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> QuantizedConv1d | QuantizedConv2d:
    """The frozen, quantized replacement of `conv` (which is left unchanged).

    Args:
        conv: A plain `nn.Conv1d` or `nn.Conv2d` with a real (not meta) weight.
        mode: `"nf4"` (4-bit NormalFloat, blocks of 64, double-quantized scales) or `"8bit"` (blockwise dynamic
            8-bit, blocks of 256).
        compute_dtype: Dtype the weight is dequantized to and the convolution computes in; the bias is stored in it.
        device: Where the quantized layer is built (the weight is quantized there); default: `conv`'s device.

    Returns:
        A `QuantizedConv1d` / `QuantizedConv2d` with the same hyper-parameters, in eval/train mode as `conv`.

    Raises:
        ValueError: For another module type or mode.
    """
    if not is_quantizable_conv(conv):
        raise ValueError(f"quantize_conv takes a plain nn.Conv1d or nn.Conv2d, got {type(conv).__name__}.")
    if mode not in QUANTIZED_CONV_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}: use one of {', '.join(QUANTIZED_CONV_MODES)}.")
    target = torch.device(device) if device is not None else conv.weight.device
    quantized = _QUANTIZED_CLASSES[type(conv)](
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    )
    quantized._store(conv.weight.detach().to(target), mode, compute_dtype)
    if conv.bias is not None:
        quantized.bias = nn.Parameter(conv.bias.detach().to(target, compute_dtype), requires_grad=False)
    quantized.train(conv.training)
    return quantized
