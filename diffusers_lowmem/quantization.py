"""bitsandbytes quantization of a model's frozen `nn.Linear` layers (LLM.int8 or NF4), in place, layer by layer.

`quantize_model` swaps every `nn.Linear` for a `bnb.nn.Linear8bitLt` or `bnb.nn.Linear4bit` under the same name, so
state-dict keys and LyCORIS module names are unchanged. Each layer's float weight is quantized as it moves to the
target device, one layer at a time: the full-precision model is never on the device as a whole. Models built on the
meta device (`accelerate.init_empty_weights()`, for real-scale memory profiling) are materialised with random
weights one layer at a time on the way, so host RAM stays far below the model's size.

bitsandbytes is imported on first use: importing it costs seconds (it imports `torch._dynamo`), which
`validate_quant_mode` and `matches_any` (used while parsing arguments) should not pay.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from diffusers_lowmem.memory import MIB, count_bytes
from diffusers_lowmem.quantized_conv import is_quantizable_conv, is_quantized_conv, quantize_conv

logger = logging.getLogger(__name__)

QUANT_MODES = ("8bit", "nf4")
# Causal LMs often tie `lm_head` to the input embedding, and it is the layer most sensitive to quantization.
DEFAULT_SKIP_CAUSAL_LM = ("lm_head",)
# The UNet's first and last convolutions: full precision costs 0.1 MiB in SD 1.5 and removes a sixth of the output
# error of quantizing every convolution (benchmarks/results/quantized-conv-fidelity-cpu.md).
DEFAULT_SKIP_UNET = ("conv_in", "conv_out")

# LLM.int8() outlier threshold: input columns with a value above it are multiplied in fp16 (the bitsandbytes and
# transformers default for training).
INT8_THRESHOLD = 6.0
# Standard deviation of the random weights given to meta-device layers (the usual transformer initialisation).
RANDOM_INIT_STD = 0.02
# Elements per chunk when comparing a weight with its dequantized copy: bounds the fp32 temporaries to 64 MiB.
_ERROR_CHUNK_ELEMENTS = 2**24
# Layers listed by `QuantizationReport.to_markdown`.
_WORST_LAYERS_SHOWN = 5


# bitsandbytes logs this warning on every int8 matmul whose input is not fp16 (each layer, each step, under bf16).
_INT8_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"
_INT8_CAST_LOGGER = "bitsandbytes.autograd._functions"


class _FirstOnlyFilter(logging.Filter):
    """Lets the first record whose message starts with `prefix` through and drops its repeats."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.passed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.passed:
            return False
        self.passed = True
        return True


def _log_int8_cast_warning_once() -> None:
    int8_logger = logging.getLogger(_INT8_CAST_LOGGER)
    if not any(isinstance(existing, _FirstOnlyFilter) for existing in int8_logger.filters):
        int8_logger.addFilter(_FirstOnlyFilter(_INT8_CAST_WARNING))


def _bnb():
    import bitsandbytes

    return bitsandbytes


# --------------------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LayerQuantization:
    """One converted layer.

    Attributes:
        name: Full module name in the model (unchanged by the conversion).
        shape: Shape of the original weight, `(out_features, in_features)`.
        bytes_before: Bytes of the original weight and bias as stored (a meta-device layer: at its meta dtype).
        bytes_after: Bytes of the quantized weight, its quantization state and the bias. A quantization map shared
            by several layers counts at the first of them, so the sum over layers is what the layers hold together.
        relative_error: `||W - dequant(quant(W))||_F / ||W||_F` in fp32, or `None` when not computed (or `W` is
            zero while its quantized copy is not).
    """

    name: str
    shape: tuple[int, ...]
    bytes_before: int
    bytes_after: int
    relative_error: float | None


@dataclass
class QuantizationReport:
    """What `quantize_model` converted and what it saved.

    Attributes:
        mode: `"8bit"` or `"nf4"`.
        compute_dtype: The dtype the quantized layers compute in, e.g. `"bfloat16"`.
        layers: The converted layers, in module order.
        skipped: Names of the `nn.Linear` layers left in full precision (skip patterns, tied weights,
            `nn.MultiheadAttention` projections).
    """

    mode: str
    compute_dtype: str
    layers: list[LayerQuantization] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        """Bytes the converted layers held before quantization."""
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        """Bytes the converted layers hold quantized, quantization state included."""
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def num_layers(self) -> int:
        """Number of converted layers."""
        return len(self.layers)

    @property
    def mean_relative_error(self) -> float | None:
        """Mean relative weight error over the layers where it was computed; None where none was."""
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        return sum(errors) / len(errors) if errors else None

    def worst_layers(self, count: int = _WORST_LAYERS_SHOWN) -> list[LayerQuantization]:
        """The `count` layers with the largest relative error (layers without one are left out)."""
        measured = [layer for layer in self.layers if layer.relative_error is not None]
        return sorted(measured, key=lambda layer: layer.relative_error, reverse=True)[:count]

    def to_dict(self) -> dict:
        """The report as JSON-ready values: totals, skipped names and one entry per layer (shapes as lists)."""
        return {
            "mode": self.mode,
            "compute_dtype": self.compute_dtype,
            "num_layers": self.num_layers,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "skipped": list(self.skipped),
            "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers],
        }

    def to_markdown(self) -> str:
        """A short markdown summary: one row of totals, then the layers with the largest error."""
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines = [
            "| quant | compute dtype | layers | skipped | before (MiB) | after (MiB) | after / before |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            f"| {self.mode} | {self.compute_dtype} | {self.num_layers} | {len(self.skipped)} | "
            f"{self.bytes_before / MIB:.2f} | {self.bytes_after / MIB:.2f} | {ratio:.3f} |",
        ]
        worst = self.worst_layers()
        if worst:
            lines += ["", "| layer (largest error first) | shape | relative error |", "| --- | --- | ---: |"]
            lines += [
                f"| {layer.name} | {'x'.join(map(str, layer.shape))} | {layer.relative_error:.4f} |" for layer in worst
            ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Small public helpers.
# --------------------------------------------------------------------------------------------------------------------


def validate_quant_mode(mode: str | None) -> str | None:
    """Checks a `--quant` value.

    Args:
        mode: `"8bit"`, `"nf4"` (any case), or `None` / `""` / `"none"` for no quantization.

    Returns:
        The mode in lower case, or `None` for no quantization.

    Raises:
        ValueError: For any other value, naming the valid choices.
    """
    if mode is None or str(mode).strip().lower() in ("", "none"):
        return None
    normalized = str(mode).strip().lower()
    if normalized not in QUANT_MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}: choose one of {', '.join(QUANT_MODES)} (or none).")
    return normalized


def matches_any(name: str, patterns: Iterable[str] | str | None) -> bool:
    """Whether a module name matches one of the skip patterns.

    A pattern matches when it equals the full name, equals a dotted suffix of it (`"lm_head"` matches
    `"model.lm_head"`, not `"model.my_lm_head"`), or matches it as an `fnmatch` glob (`"down_blocks.0.*"`).

    Args:
        name: Full module name, as in `model.named_modules()`.
        patterns: Patterns, one pattern as a string, or `None` for none.

    Returns:
        True when one pattern matches.
    """
    if not patterns:
        return False
    if isinstance(patterns, str):
        patterns = (patterns,)
    return any(name == pattern or name.endswith("." + pattern) or fnmatch(name, pattern) for pattern in patterns)


def _is_quantized_parameter(parameter) -> bool:
    if "bitsandbytes" not in sys.modules:
        # Nothing can hold a bitsandbytes parameter before bitsandbytes is imported.
        return False
    bnb = _bnb()
    if isinstance(parameter, bnb.nn.Params4bit):
        return bool(parameter.bnb_quantized)
    if isinstance(parameter, bnb.nn.Int8Params):
        return parameter.dtype == torch.int8
    # The memory estimate's stand-ins (fake tensors): a plain parameter holding the packed weight and its state.
    return is_fake(parameter) and (
        getattr(parameter, "quant_state", None) is not None or parameter.dtype == torch.int8
    )


def is_quantized_module(module: nn.Module) -> bool:
    """Whether `module` holds its own weight quantized by bitsandbytes (4-bit `Params4bit` or int8 `Int8Params`).

    A bitsandbytes layer whose weight has not been quantized yet (it quantizes on `.to(device)`) is not. Quantized
    convolutions (`quantized_conv`, stored with bitsandbytes' functional API) are.
    """
    if is_quantized_conv(module):
        return True
    return _is_quantized_parameter(module._parameters.get("weight"))


def has_quantized_layers(model: nn.Module) -> bool:
    """Whether any submodule of `model` (itself included) is quantized by bitsandbytes."""
    return any(is_quantized_module(module) for module in model.modules())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------------------------
# Meta-device materialisation (shared by `quantize_model` and unquantized profiling).
# --------------------------------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    # Model-specific norms (LlamaRMSNorm, diffusers' RMSNorm, AdaLayerNorm...) subclass nn.Module directly.
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, norm_types) or type(module).__name__.lower().endswith("norm")


def _random_tensor(module: nn.Module, name: str, like: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """A real tensor for the meta tensor `like` held by `module` under `name`.

    Floating tensors get `dtype`: zeros for biases, ones for norm weights, normal(0, RANDOM_INIT_STD) otherwise.
    Other tensors (integer buffers) keep their dtype and are zeros.
    """
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype, device=device)
    if name.endswith("bias"):
        return torch.zeros(like.shape, dtype=dtype, device=device)
    if name == "weight" and _is_norm(module):
        return torch.ones(like.shape, dtype=dtype, device=device)
    return torch.empty(like.shape, dtype=dtype, device=device).normal_(0.0, RANDOM_INIT_STD)


def _tensor_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """Yields `(module, name, tensor, is_parameter)` for every parameter and buffer slot of `model`.

    A tensor tied into several modules appears once per slot, so a replacement can be set in all of them.
    """
    for module in model.modules():
        yield from _own_tensor_slots(module)


def _own_tensor_slots(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """Yields `(module, name, tensor, is_parameter)` for the parameters and buffers `module` holds itself."""
    for name, parameter in list(module._parameters.items()):
        if parameter is not None:
            yield module, name, parameter, True
    for name, buffer in list(module._buffers.items()):
        if buffer is not None:
            yield module, name, buffer, False


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    if is_parameter and not isinstance(tensor, nn.Parameter):
        raise TypeError(f"expected an nn.Parameter for {name}")
    # nn.Module.__setattr__ registers a Parameter as a parameter and a tensor under a buffer's name as that buffer.
    setattr(module, name, tensor)


def _materialize_slots_(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Replaces every meta parameter and buffer of `model` by a random one on `device`; returns how many."""
    replaced: dict[int, torch.Tensor] = {}
    for module, name, tensor, is_parameter in _tensor_slots(model):
        if tensor.device.type != "meta":
            continue
        if type(tensor) not in (nn.Parameter, torch.Tensor) and not is_fake(tensor):
            # A bitsandbytes parameter on the meta device has no float weight to give random values to. (A fake
            # tensor on meta, e.g. a layer converted under the memory estimate's fake mode, is materialised.)
            logger.warning(f"Leaving {type(module).__name__}.{name} on the meta device: {type(tensor).__name__}")
            continue
        if id(tensor) not in replaced:
            real = _random_tensor(module, name, tensor, device, dtype)
            if is_parameter:
                real = nn.Parameter(real, requires_grad=tensor.requires_grad and real.is_floating_point())
            replaced[id(tensor)] = real
        _set_tensor(module, name, replaced[id(tensor)], is_parameter)
    return len(replaced)


def materialize_meta_(
    model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> int:
    """Gives every meta-device parameter and buffer of `model` random values on `device`, in place.

    For memory profiling at real scale without the checkpoint: build the model under `accelerate.init_empty_weights()`
    and materialise it straight on the GPU, so host RAM never holds it. Floating tensors get `dtype`: zeros for
    biases, ones for norm weights, normal(0, 0.02) for the rest; integer buffers are zeros. Tied tensors stay tied.
    Tensors that are not on the meta device are left as they are (a model without meta tensors is unchanged), so
    call `model.to(device, dtype)` afterwards for those.

    Args:
        model: The model, changed in place.
        device: Where the new tensors live; `None` for the CPU.
        dtype: Dtype of the new floating tensors.

    Returns:
        How many tensors were materialised.
    """
    device = torch.device("cpu" if device is None else device)
    count = _materialize_slots_(model, device, dtype)
    if count:
        logger.info(f"Materialised {count} meta tensors of {type(model).__name__} on {device} with random {dtype}")
    return count


# --------------------------------------------------------------------------------------------------------------------
# Finding the layers to convert.
# --------------------------------------------------------------------------------------------------------------------


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of parameters held in more than one slot (e.g. an `lm_head` tied to the input embedding)."""
    slots = defaultdict(int)
    for _, _, tensor, is_parameter in _tensor_slots(model):
        if is_parameter:
            slots[id(tensor)] += 1
    return {tensor_id for tensor_id, count in slots.items() if count > 1}


def _multihead_projection_ids(model: nn.Module) -> set[int]:
    # nn.MultiheadAttention reads `out_proj.weight` itself instead of calling `out_proj`: a bnb layer there breaks it.
    return {id(module.out_proj) for module in model.modules() if isinstance(module, nn.MultiheadAttention)}


def _select_linears(model: nn.Module, skip) -> tuple[list[str], list[str]]:
    """Names of the `nn.Linear` layers to convert, and of those left in full precision.

    Names, not modules: holding the float layers in a list would keep each alive after its replacement.
    """
    tied = _tied_parameter_ids(model)
    multihead = _multihead_projection_ids(model)
    selected, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized_module(module) or not name:
            continue
        if matches_any(name, skip):
            skipped.append(name)
        elif id(module.weight) in tied:
            logger.warning(f"Not quantizing {name}: its weight is tied to another module's")
            skipped.append(name)
        elif id(module) in multihead:
            logger.warning(f"Not quantizing {name}: nn.MultiheadAttention uses its weight directly")
            skipped.append(name)
        else:
            selected.append(name)
    return selected, skipped


def _select_convolutions(model: nn.Module, skip) -> tuple[list[str], list[str]]:
    """Names of the plain `nn.Conv1d` / `nn.Conv2d` layers to quantize, and of those `skip` keeps."""
    tied = _tied_parameter_ids(model)
    selected, skipped = [], []
    for name, module in model.named_modules():
        if not name or not is_quantizable_conv(module):
            continue
        if matches_any(name, skip) or id(module.weight) in tied:
            skipped.append(name)
        else:
            selected.append(name)
    return selected, skipped


def conv1d_to_linear_(model: nn.Module) -> list[str]:
    """Replaces transformers' `Conv1D` layers (GPT-2's projections, weight stored `(in, out)`) with equivalent
    `nn.Linear` layers, in place, so that bitsandbytes quantizes them and LyCORIS adapts them like any linear layer.

    The outputs are unchanged (`Conv1D(x) = x W + b = Linear(x)` with `Linear.weight = W.T`).

    Args:
        model: The model, changed in place.

    Returns:
        The names of the replaced layers.
    """
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D" or not hasattr(child, "nf"):
                continue
            in_features, out_features = child.weight.shape
            linear = nn.Linear(in_features, out_features, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(
                child.weight.detach().t().contiguous(), requires_grad=child.weight.requires_grad
            )
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=child.bias.requires_grad)
            setattr(parent, child_name, linear)
            replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    if replaced:
        logger.info(f"Replaced {len(replaced)} transformers Conv1D layers with nn.Linear")
    return replaced


def _warn_unused_patterns(model: nn.Module, skip) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for pattern in (skip,) if isinstance(skip, str) else skip or ():
        if not any(matches_any(name, (pattern,)) for name in names):
            logger.warning(f"Skip pattern {pattern!r} matches no module of {type(model).__name__}")


def _no_linear_error(model: nn.Module, mode: str, skipped: list[str]) -> ValueError:
    already = sum(is_quantized_module(module) for module in model.modules())
    details = []
    if already:
        details.append(f"{already} layers are already quantized")
    if skipped:
        details.append(f"{len(skipped)} were skipped ({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})")
    reason = f" ({'; '.join(details)})" if details else ""
    return ValueError(
        f"--quant {mode} found no nn.Linear layers to quantize in {type(model).__name__}{reason}. bitsandbytes "
        "quantizes nn.Linear layers only: drop --quant for this model, or narrow the skip patterns (--quant_skip)."
    )


def _parent_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For each submodule id, every `(parent, attribute)` that holds it (a module may be shared)."""
    slots = defaultdict(list)
    for parent in model.modules():
        # `_modules`, not `named_children()`, which lists a child held under two attributes once.
        for child_name, child in parent._modules.items():
            if child is not None:
                slots[id(child)].append((parent, child_name))
    return slots


# --------------------------------------------------------------------------------------------------------------------
# Converting one layer.
# --------------------------------------------------------------------------------------------------------------------


def _float_weight(linear: nn.Linear, compute_dtype: torch.dtype, target: torch.device) -> torch.Tensor:
    """The weight to quantize, in `compute_dtype`; for a meta-device layer, random and made on `target`.

    Made on the target device rather than on the CPU: the device holds one float layer at a time either way (a CPU
    weight is copied there to be quantized), host RAM holds none, and the CPU's random generator runs on one core,
    which made a meta Llama-2-7B take about 3 minutes instead of 0.3 s (measured on an H100 host).
    """
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        return torch.empty(weight.shape, dtype=compute_dtype, device=target).normal_(0.0, RANDOM_INIT_STD)
    return weight.to(compute_dtype)


def _bias(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Parameter | None:
    if linear.bias is None:
        return None
    if linear.bias.device.type == "meta":
        bias = torch.zeros(linear.bias.shape, dtype=compute_dtype, device=device)
    else:
        bias = linear.bias.detach().to(device=device, dtype=compute_dtype)
    return nn.Parameter(bias, requires_grad=False)


def _quantized_nf4_layer(
    linear: nn.Linear,
    weight: torch.Tensor,
    device: torch.device,
    compute_dtype: torch.dtype,
    double_quant: bool,
    quant_storage: torch.dtype,
) -> nn.Module:
    bnb = _bnb()
    # Built on the meta device: a layer built on the CPU would first allocate and initialise a float weight.
    with unset_fake_temporarily():  # under FakeTensorMode too: a Params4bit cannot wrap a fake tensor
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            quant_storage=quant_storage,
            device="meta",
        )
    # On CPUs with AVX512-BF16, bitsandbytes repacks a frozen layer's weight into another layout at its first
    # forward in eval mode; that breaks on layers narrower than a quantization block (64), and a weight that
    # changes format under the trainer (memory count, merges, saving) is not what it quantized. Keep the standard
    # NF4 layout on every CPU.
    layer.support_avx512bf16_for_cpu = False
    if is_fake(weight):
        # The memory estimate: the same packed weight and quantization state, made by the same bitsandbytes op (it
        # has a fake kernel), held by a plain parameter; Linear4bit.forward reads only its data and `quant_state`.
        packed, quant_state = bnb.functional.quantize_4bit(
            weight, compress_statistics=double_quant, quant_type="nf4", quant_storage=quant_storage
        )
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.weight.quant_state = quant_state
        layer.bias = _bias(linear, device, compute_dtype)
        return layer
    parameter = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=quant_storage,
        module=layer,
    )
    # Params4bit quantizes on its first move to a real device, from wherever the float weight is.
    layer.weight = parameter.to(device)
    layer.bias = _bias(linear, device, compute_dtype)
    return layer


def _quantized_int8_layer(
    linear: nn.Linear, weight: torch.Tensor, device: torch.device, compute_dtype: torch.dtype
) -> nn.Module:
    bnb = _bnb()
    with unset_fake_temporarily():  # under FakeTensorMode too: an Int8Params cannot wrap a fake tensor
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
    if is_fake(weight):
        # The memory estimate: Int8Params._quantize's op on a fake weight, held by a plain parameter that carries
        # `CB` and `SCB` as Int8Params does (Linear8bitLt moves them into its state on the first forward).
        row_major, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        layer.weight = nn.Parameter(row_major, requires_grad=False)
        layer.weight.CB, layer.weight.SCB = row_major, row_scales
        layer.bias = _bias(linear, device, compute_dtype)
        return layer
    parameter = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if weight.device.type == "cpu":
        layer.weight = parameter.to(device)
    else:
        # Int8Params.to quantizes only a weight that is on the CPU: one already on the GPU takes the same step here.
        layer.weight = parameter._quantize(device)
    layer.bias = _bias(linear, device, compute_dtype)
    return layer


def _dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The quantized weight of a bitsandbytes layer, dequantized (NF4: in its compute dtype; int8: in fp32)."""
    bnb = _bnb()
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # Linear8bitLt moves CB and SCB from the weight into `layer.state` on its first forward.
    row_scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return weight.data.float() * (row_scales.float().unsqueeze(1) / 127.0)


def _relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float | None:
    """`||reference - approximation||_F / ||reference||_F` in fp32, on the approximation's device, in row chunks."""
    rows_per_chunk = max(1, _ERROR_CHUNK_ELEMENTS // max(1, reference.shape[-1]))
    error_squared = torch.zeros((), dtype=torch.float64, device=approximation.device)
    reference_squared = torch.zeros((), dtype=torch.float64, device=approximation.device)
    for start in range(0, reference.shape[0], rows_per_chunk):
        exact = reference[start : start + rows_per_chunk].to(approximation.device, torch.float32)
        approximate = approximation[start : start + rows_per_chunk].float()
        error_squared += (exact - approximate).pow(2).sum(dtype=torch.float64)
        reference_squared += exact.pow(2).sum(dtype=torch.float64)
    if reference_squared.item() == 0.0:
        return 0.0 if error_squared.item() == 0.0 else None
    return (error_squared / reference_squared).sqrt().item()


def _target_device(linear: nn.Linear, device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    here = linear.weight.device
    return torch.device("cpu") if here.type == "meta" else here


def _convert_linear(
    linear: nn.Linear,
    mode: str,
    compute_dtype: torch.dtype,
    device: torch.device | None,
    double_quant: bool,
    compute_errors: bool,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[nn.Module, float | None]:
    """The bitsandbytes replacement of `linear` on its target device, and its relative weight error."""
    target = _target_device(linear, device)
    weight = _float_weight(linear, compute_dtype, target)
    if mode == "nf4":
        layer = _quantized_nf4_layer(linear, weight, target, compute_dtype, double_quant, quant_storage)
    else:
        layer = _quantized_int8_layer(linear, weight, target, compute_dtype)
    layer.train(linear.training)
    relative_error = None
    if compute_errors:
        # Against the weight as it was (a meta layer's random weight stands in for it).
        reference = weight if linear.weight.device.type == "meta" else linear.weight.detach()
        relative_error = _relative_error(reference, _dequantized_weight(layer))
    return layer, relative_error


# --------------------------------------------------------------------------------------------------------------------
# Everything but the linears.
# --------------------------------------------------------------------------------------------------------------------


def _place_rest_(model: nn.Module, device: torch.device | None, dtype: torch.dtype, cast: bool) -> None:
    """Materialises meta tensors, then moves (and with `cast`, casts) every tensor outside the quantized layers.

    Parameters keep their identity (`.data` is replaced), as with `nn.Module.to`.
    """
    _materialize_slots_(model, device or torch.device("cpu"), dtype)
    done: set[int] = set()
    for module in model.modules():
        if is_quantized_module(module):
            # Layers quantized before this call: bitsandbytes moves their weight and its quantization state itself.
            if device is not None and module.weight.device != device:
                module.to(device)
            done.update(id(tensor) for tensor in module.parameters(recurse=False))
            continue
        for _, name, tensor, is_parameter in _own_tensor_slots(module):
            if id(tensor) in done:
                continue
            done.add(id(tensor))
            new_dtype = dtype if cast and tensor.is_floating_point() else None
            if is_parameter:
                tensor.data = tensor.data.to(device=device, dtype=new_dtype)
            else:
                _set_tensor(module, name, tensor.to(device=device, dtype=new_dtype), is_parameter=False)


# --------------------------------------------------------------------------------------------------------------------
# The entry point.
# --------------------------------------------------------------------------------------------------------------------


def _quantize_convolutions_(model, mode, compute_dtype, target, skip, compute_errors, report, parents) -> None:
    """Replaces the selected convolutions by quantized ones, one at a time, and adds them to `report`."""
    selected, skipped = _select_convolutions(model, skip)
    report.skipped.extend(skipped)
    seen_before, seen_after = set(), set()
    for name in selected:
        conv = model.get_submodule(name)
        device = _target_device(conv, target)
        weight = _float_weight(conv, compute_dtype, device)
        bytes_before = count_bytes(conv.parameters(), seen_before)
        source = conv
        if conv.weight.device.type == "meta":
            source = copy.copy(conv)  # a shallow copy with a real weight; the meta layer is left as it was
            source._parameters = dict(conv._parameters, weight=nn.Parameter(weight, requires_grad=False))
            if conv.bias is not None:
                source._parameters["bias"] = _bias(conv, device, compute_dtype)
        layer = quantize_conv(source, mode, compute_dtype=compute_dtype, device=device)
        for parent, attribute in parents[id(conv)]:
            setattr(parent, attribute, layer)
        relative_error = None
        if compute_errors:
            relative_error = _relative_error(
                weight.float().flatten(1), layer.dequantized_weight(torch.float32).flatten(1)
            )
        report.layers.append(
            LayerQuantization(
                name=name,
                shape=tuple(conv.weight.shape),
                bytes_before=bytes_before,
                bytes_after=count_bytes(list(layer.parameters()) + list(layer.buffers()), seen_after),
                relative_error=relative_error,
            )
        )
        del conv, layer, source, weight


def quantize_model(
    model: nn.Module,
    mode: str,
    compute_dtype: torch.dtype = torch.float32,
    skip: Iterable[str] | str = (),
    device: torch.device | str | None = None,
    double_quant: bool = True,
    compute_errors: bool = True,
    cast_rest: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    convolutions: bool = False,
) -> QuantizationReport:
    """Quantizes every `nn.Linear` of `model` with bitsandbytes, in place, one layer at a time.

    Each `nn.Linear` (not already a bitsandbytes layer, not matched by `skip`) becomes a `Linear8bitLt`
    (`mode="8bit"`: LLM.int8 with outlier threshold 6.0) or a `Linear4bit` (`mode="nf4"`, double quantization of
    the block scales with `double_quant`) under the same name, so state-dict keys and adapter names stay the same.
    Weights are frozen; biases stay in full precision in `compute_dtype`. Each float weight is quantized as it
    moves to `device`, so the full-precision model is never on the device as a whole. Then the rest of the model
    (convolutions, norms, embeddings) is cast to `compute_dtype` (with `cast_rest`) and moved to `device`.

    A layer whose weight is on the meta device (a model built under `accelerate.init_empty_weights()`) gets random
    weights, normal(0, 0.02), one layer at a time, made on the target device (the CPU when `device` is `None`) and
    quantized there; the remaining meta tensors are then materialised directly on `device` (see
    `materialize_meta_`). Host RAM thus never holds the model.

    Layers whose weight is tied to another module, and the output projections of `nn.MultiheadAttention` (which
    reads the weight itself), are left in full precision and listed in `report.skipped` with the skipped layers.
    Hooks registered on a replaced `nn.Linear` do not carry over to its replacement.

    Args:
        model: The model, changed in place.
        mode: `"8bit"` or `"nf4"`.
        compute_dtype: Dtype NF4 layers compute in, and the dtype of all biases and (with `cast_rest`) of the rest
            of the model. `Linear8bitLt` has no compute dtype: it returns its input's dtype and casts inputs to fp16
            for the int8 matmul.
        skip: Module-name patterns to keep in full precision (see `matches_any`), e.g. `DEFAULT_SKIP_CAUSAL_LM`.
        device: Where the model ends up; `None` keeps each layer on its current device (the CPU for meta layers).
        double_quant: NF4 only: also quantize the per-block scales (0.5 -> ~0.13 bits per weight).
        compute_errors: Measure each layer's relative weight error; turn off for speed at real scale.
        cast_rest: Cast the parameters and buffers outside the quantized layers to `compute_dtype`.
        quant_storage: NF4 only: the dtype the packed 4-bit weights are stored as (the bytes are the same). FSDP
            flattens parameters of one dtype only: give it the dtype of the rest of the model (`compute_dtype`).
        convolutions: Also store every plain `nn.Conv1d` / `nn.Conv2d` (not matched by `skip`) in the same format
            with bitsandbytes' functional API (`quantized_conv.quantize_conv`); they are listed in the report too.

    Returns:
        The report: converted layers with their bytes before and after and their error, and the skipped names.

    Raises:
        ValueError: For an unknown `mode`, or when `model` has no `nn.Linear` left to quantize.
    """
    checked_mode = validate_quant_mode(mode)
    if checked_mode is None:
        raise ValueError(f"quantize_model needs a quantization mode: one of {', '.join(QUANT_MODES)}, got {mode!r}.")
    target = torch.device(device) if device is not None else None
    selected, skipped = _select_linears(model, skip)
    _warn_unused_patterns(model, skip)
    if not selected:
        raise _no_linear_error(model, checked_mode, skipped)

    if checked_mode == "8bit":
        _log_int8_cast_warning_once()
    report = QuantizationReport(mode=checked_mode, compute_dtype=_dtype_name(compute_dtype), skipped=skipped)
    parents = _parent_slots(model)
    seen_before, seen_after = set(), set()
    for name in selected:
        linear = model.get_submodule(name)
        bytes_before = count_bytes(linear.parameters(), seen_before)
        layer, relative_error = _convert_linear(
            linear, checked_mode, compute_dtype, target, double_quant, compute_errors, quant_storage
        )
        for parent, attribute in parents[id(linear)]:
            setattr(parent, attribute, layer)
        report.layers.append(
            LayerQuantization(
                name=name,
                shape=tuple(linear.weight.shape),
                bytes_before=bytes_before,
                bytes_after=count_bytes(layer.parameters(), seen_after),
                relative_error=relative_error,
            )
        )
        # Frees the float layer before the next one is quantized (unless the caller holds a reference to it).
        del linear, layer
    if convolutions:
        _quantize_convolutions_(model, checked_mode, compute_dtype, target, skip, compute_errors, report, parents)
    _place_rest_(model, target, compute_dtype, cast=cast_rest)
    logger.info(
        f"Quantized {report.num_layers} nn.Linear layers of {type(model).__name__} to {checked_mode} "
        f"(compute {report.compute_dtype}, {len(skipped)} skipped): "
        f"{report.bytes_before / MIB:.1f} MiB -> {report.bytes_after / MIB:.1f} MiB"
    )
    return report
