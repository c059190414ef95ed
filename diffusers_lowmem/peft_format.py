"""Export a trained LyCORIS network as a peft adapter directory, so `PeftModel.from_pretrained(base, path)` loads it.

LyCORIS and peft compute the same updates for the three algorithms peft shares with LyCORIS, with the same factor
shapes on linear layers:

| algorithm    | LyCORIS update                                       | peft update                          |
| ------------ | ---------------------------------------------------- | ------------------------------------ |
| lora, locon  | `lora_up @ lora_down * alpha / r`                    | `lora_B @ lora_A * lora_alpha / r`   |
| loha         | `(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r`          | the same, with peft's `alpha / r`    |
| lokr         | `kron(w1, w2) * alpha / r`, 1 if both factors full   | `kron(w1, w2) * alpha / r`           |

(times the network's multiplier, which the export folds into alpha; a LyCORIS trainable scalar is folded into the
first factor, as LyCORIS' own state dict does)

so the export renames tensors (`<prefix>_<path>.lora_down.weight` -> `base_model.model.<path>.lora_A.weight`) and
writes peft's own config class with `r`, `alpha` and the exact module names adapted; where a layer's scale differs
from the common one (LoKr's full-matrix layers), `alpha_pattern` carries it. Before anything is written, peft itself
builds the adapter on a shape-only copy of the adapted layers (meta device, no memory) and the converted tensors must
have exactly its keys and shapes (LoKr's factorisation of each dimension, full or low-rank halves); otherwise nothing
is written. For example a `--lokr_factor` above the square root of a dimension (16 for 64) gives LyCORIS factors
`(4, 16)` and peft `(16, 4)`: not exported.

Not representable in peft (then `save_peft_adapter` logs why and returns `None`): LoHa and LoKr on bitsandbytes
layers (peft's LoHa/LoKr layers rebuild `delta W` in the stored weight's shape, which a packed 4-bit weight does not
have, and peft has no bitsandbytes LoHa/LoKr layers) or on transformers `Conv1D` layers (peft's LoHa/LoKr support
`nn.Linear` and convolutions only), convolution layers (the causal-LM export covers linear layers), Tucker
decomposition and DoRA (weight decomposition).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusers_lowmem.adapters import ADAPTER_MODULE_NAME, AdapterConfig
from diffusers_lowmem.quantization import is_quantized_module

logger = logging.getLogger(__name__)

PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
# `PeftModel.save_pretrained` writes keys relative to the PeftModel, whose base model sits at `base_model.model`;
# the adapter name ("default") is left out of the keys.
PEFT_KEY_PREFIX = "base_model.model."

# LyCORIS parameter name -> peft parameter name, per algorithm (LoHa and LoKr use LyCORIS' names in peft too).
_LORA_KEYS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
_LOHA_KEYS = {name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
_LOKR_KEYS = {name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
# The factor that LyCORIS' own `custom_state_dict` multiplies a trainable scalar into.
_SCALED_FACTORS = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")


class NotRepresentable(ValueError):
    """The network has a feature that peft's config and layers cannot express exactly."""


@dataclass
class _ExportedLayer:
    """One adapted layer in peft terms: its module path, rank, alpha and tensors under peft's parameter names."""

    path: str
    rank: int
    alpha: float
    tensors: dict[str, torch.Tensor]
    in_features: int
    out_features: int


def adapted_layers(network: nn.Module, model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """The layers of `model` that `network` adapts, in model order.

    Args:
        network: A LyCORIS network (its `loras` list of modules, each holding its layer in `org_module[0]`).
        model: The model the network is attached to.

    Returns:
        `(module path, LyCORIS module, adapted layer)` triples.

    Raises:
        ValueError: If a LyCORIS module's layer is not a submodule of `model`.
    """
    paths = {}
    for name, module in model.named_modules():
        if name and not name.startswith(ADAPTER_MODULE_NAME):
            paths.setdefault(id(module), name)
    triples = []
    for lycoris_module in network.loras:
        layer = lycoris_module.org_module[0]
        if id(layer) not in paths:
            raise ValueError(f"The adapted layer of {lycoris_module.lora_name} is not a submodule of the model.")
        triples.append((paths[id(layer)], lycoris_module, layer))
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(triples, key=lambda triple: order[triple[0]])


def _effective_scale(lycoris_module) -> float:
    """The factor LyCORIS multiplies the update by: alpha / rank (LoKr: 1 with two full factors) times the multiplier."""
    return float(lycoris_module.scale) * float(lycoris_module.multiplier)


def _scalar(lycoris_module) -> torch.Tensor | None:
    scalar = getattr(lycoris_module, "scalar", None)
    if scalar is None or (not isinstance(scalar, nn.Parameter) and bool(torch.all(scalar == 1))):
        return None
    return scalar.detach()


def _check_plain(lycoris_module, path: str) -> None:
    """Rejects the LyCORIS features peft has no counterpart for."""
    if getattr(lycoris_module, "wd", False):
        raise NotRepresentable(f"{path} uses weight decomposition (DoRA-style), which peft's LyCORIS layers lack.")
    if getattr(lycoris_module, "tucker", False):
        raise NotRepresentable(f"{path} uses a Tucker decomposition, which peft's LyCORIS layers lack.")
    if getattr(lycoris_module, "module_type", "linear") != "linear":
        raise NotRepresentable(
            f"{path} is a {lycoris_module.module_type} layer; the peft export covers linear layers."
        )


def _export_layer(path: str, lycoris_module, layer: nn.Module, algo: str) -> _ExportedLayer:
    _check_plain(lycoris_module, path)
    names = {"lora": _LORA_KEYS, "locon": _LORA_KEYS, "loha": _LOHA_KEYS, "lokr": _LOKR_KEYS}[algo]
    own = dict(lycoris_module.named_parameters())
    scalar = _scalar(lycoris_module)
    tensors = {}
    for lycoris_name, peft_name in names.items():
        if lycoris_name not in own:
            continue
        tensor = own[lycoris_name].detach()
        if scalar is not None and lycoris_name in _SCALED_FACTORS:
            tensor = tensor * scalar.to(tensor)
        tensors[peft_name] = tensor.to("cpu", torch.float32).contiguous()
    if not tensors:
        raise NotRepresentable(f"{path}: {type(lycoris_module).__name__} is not a {algo} module.")
    rank = int(lycoris_module.lora_dim)
    # From the layer, not its weight: a packed 4-bit weight does not have the layer's shape.
    alpha = _effective_scale(lycoris_module) * rank
    return _ExportedLayer(path, rank, alpha, tensors, layer.in_features, layer.out_features)


def _peft_config(config: AdapterConfig, layers: list[_ExportedLayer], fan_in_fan_out: bool, base_model):
    """peft's config class for `algo`, with the common rank/alpha and per-layer patterns where layers differ."""
    import peft

    rank, alpha = Counter((layer.rank, layer.alpha) for layer in layers).most_common(1)[0][0]
    rank_pattern = {layer.path: layer.rank for layer in layers if layer.rank != rank}
    alpha_pattern = {layer.path: layer.alpha for layer in layers if layer.alpha != alpha}
    common = {
        "r": rank,
        "target_modules": [layer.path for layer in layers],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    if config.algo in ("lora", "locon"):
        return peft.LoraConfig(lora_alpha=alpha, lora_dropout=config.dropout, fan_in_fan_out=fan_in_fan_out, **common)
    if config.algo == "loha":
        return peft.LoHaConfig(alpha=alpha, **common)
    decompose_both = any("lokr_w1_a" in layer.tensors for layer in layers)
    return peft.LoKrConfig(alpha=alpha, decompose_both=decompose_both, decompose_factor=config.lokr_factor, **common)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(leaf, module)


def _shape_only_model(layers: list[_ExportedLayer], conv1d_paths: set[str]) -> nn.Module:
    """A module tree with the adapted layers' paths and shapes on the meta device (no storage, no other layers)."""
    from transformers.pytorch_utils import Conv1D

    root = nn.Module()
    with torch.device("meta"):
        for layer in layers:
            if layer.path in conv1d_paths:
                module = Conv1D(layer.out_features, layer.in_features)
            else:
                module = nn.Linear(layer.in_features, layer.out_features)
            _set_submodule(root, layer.path, module)
    return root


def _expected_shapes(peft_config, layers: list[_ExportedLayer], conv1d_paths: set[str]) -> dict[str, tuple]:
    """The keys and shapes peft itself saves for `peft_config` on the adapted layers (built on the meta device)."""
    import copy
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "the model has no `config`": irrelevant for a shape-only model
        # A copy: peft writes into the config it is given (e.g. the shape-only model's empty name or path).
        peft_model = peft.get_peft_model(_shape_only_model(layers, conv1d_paths), copy.deepcopy(peft_config))
        state = peft.get_peft_model_state_dict(peft_model)
    return {key: tuple(value.shape) for key, value in state.items()}


def peft_state_dict(
    network: nn.Module,
    config: AdapterConfig,
    model: nn.Module,
    base_model_name_or_path: str | None = None,
    conv1d_modules=(),
):
    """The peft config and state dict equivalent to `network`, checked against what peft itself builds.

    Args:
        network: The trained LyCORIS network attached to `model`.
        config: The adapter config the network was built with (its algorithm and dropout).
        model: The model the network is attached to (possibly quantized).
        base_model_name_or_path: Stored in the config for `PeftModel.from_pretrained` users.
        conv1d_modules: Module paths that were transformers `Conv1D` layers in the original model (GPT-2's,
            replaced by `quantization.conv1d_to_linear_` for training); peft's LoRA adapts them with
            `fan_in_fan_out=True` and the same tensors.

    Returns:
        `(peft config, {key: tensor})`, keys as `PeftModel.save_pretrained` writes them.

    Raises:
        NotRepresentable: With the reason, when peft cannot express the network exactly.
    """
    layers_and_modules = adapted_layers(network, model)
    if not layers_and_modules:
        raise NotRepresentable("the network adapts no layer.")
    conv1d_paths = set(conv1d_modules)
    if config.algo in ("loha", "lokr"):
        quantized = [path for path, _, layer in layers_and_modules if is_quantized_module(layer)]
        if quantized:
            raise NotRepresentable(
                f"{config.algo} on bitsandbytes layers ({quantized[0]}, ...): peft's LoHa/LoKr layers rebuild the "
                "update in the stored weight's shape and have no bitsandbytes variant."
            )
        converted = [path for path, _, _ in layers_and_modules if path in conv1d_paths]
        if converted:
            raise NotRepresentable(
                f"{config.algo} on transformers Conv1D layers ({converted[0]}, ...): peft's LoHa/LoKr adapt "
                "nn.Linear and convolutions only."
            )
    layers = [_export_layer(path, module, layer, config.algo) for path, module, layer in layers_and_modules]
    fan_in_fan_out = bool(conv1d_paths) and all(layer.path in conv1d_paths for layer in layers)
    if conv1d_paths and not fan_in_fan_out and any(layer.path in conv1d_paths for layer in layers):
        raise NotRepresentable("the adapted layers mix transformers Conv1D and nn.Linear layers (fan_in_fan_out).")
    peft_config = _peft_config(config, layers, fan_in_fan_out, base_model_name_or_path)
    state = {
        f"{PEFT_KEY_PREFIX}{layer.path}.{name}": tensor for layer in layers for name, tensor in layer.tensors.items()
    }
    try:
        expected = _expected_shapes(peft_config, layers, conv1d_paths)
    except (TypeError, ValueError, RuntimeError) as error:
        raise NotRepresentable(f"peft cannot build this adapter: {error}") from error
    actual = {key: tuple(tensor.shape) for key, tensor in state.items()}
    if actual != expected:
        key = next(key for key in sorted(set(actual) | set(expected)) if actual.get(key) != expected.get(key))
        raise NotRepresentable(
            f"peft lays the factors out differently: {key} is {actual.get(key)} here and {expected.get(key)} in peft."
        )
    return peft_config, state


def save_peft_adapter(
    output_dir: str | os.PathLike,
    network: nn.Module,
    config: AdapterConfig,
    model: nn.Module,
    base_model_name_or_path: str | None = None,
    conv1d_modules=(),
    task_type: str | None = "CAUSAL_LM",
) -> Path | None:
    """Writes `network` as a peft adapter (`adapter_config.json` + `adapter_model.safetensors`) into `output_dir`.

    `peft.PeftModel.from_pretrained(base_model, output_dir)` then computes the same outputs as `model` with the
    network attached (on the same base: a quantized base needs the same quantization).

    Args:
        output_dir: The folder to write into (created if missing).
        network: The trained LyCORIS network attached to `model`.
        config: The adapter config the network was built with.
        model: The model the network is attached to.
        base_model_name_or_path: Stored as the config's `base_model_name_or_path`.
        conv1d_modules: Module paths that were transformers `Conv1D` layers (see `peft_state_dict`).
        task_type: peft task type stored in the config (`"CAUSAL_LM"` makes `PeftModelForCausalLM`), or None.

    Returns:
        `output_dir`, or None (with an info log saying why) when peft cannot represent the network exactly; then
        nothing is written.
    """
    from safetensors.torch import save_file

    try:
        peft_config, state = peft_state_dict(network, config, model, base_model_name_or_path, conv1d_modules)
    except NotRepresentable as reason:
        logger.info(f"No peft export of this {config.algo} adapter: {reason}")
        return None
    peft_config.task_type = task_type
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights_path = output_dir / PEFT_WEIGHT_NAME
    temporary = weights_path.with_name(weights_path.name + ".tmp")
    save_file(state, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, weights_path)
    peft_config.save_pretrained(str(output_dir))
    logger.info(f"Saved the adapter in peft format ({type(peft_config).__name__}) to {output_dir}")
    return output_dir
