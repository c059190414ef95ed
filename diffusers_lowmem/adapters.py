"""LyCORIS adapters (LoRA, LoHa, LoKr, LoCon) on any torch module tree: attach, save, load, merge.

One API for the four algorithms of `lycoris-lora`, for the UNet and text encoder(s) of a diffusers pipeline and for
the linear layers of a causal LM:

    config = AdapterConfig(algo="lokr", rank=8)
    network = attach_adapter(unet, config, role="unet")  # fresh adapters leave the outputs unchanged
    ...  # train network.parameters()
    save_adapter("pytorch_lora_weights.safetensors", {"unet": network}, config)
    load_adapter(pipeline, "pytorch_lora_weights.safetensors")  # also for LoHa/LoKr, which diffusers cannot load

Which layers get adapters is a per-model-family `TargetPreset` (see `PRESETS`); adding a family means adding one
entry there. Module names follow the kohya convention (`lora_unet_...`, `lora_te_text_model_...`,
`lora_te1_`/`lora_te2_` for SDXL), so the saved files load in ComfyUI, A1111 and, for lora and locon, in diffusers'
`load_lora_weights`.

The LyCORIS modules are built one per target layer from LyCORIS' own module classes; nothing relies on the
class-level presets of `LycorisNetwork`, so wrapping several models in one process cannot leak settings between them.
On bitsandbytes layers the modules run in bypass mode (`W x + delta(x)`, the frozen weight is never rebuilt), which
LyCORIS does not select by itself for `Linear4bit`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from diffusers_lowmem import estimate
from diffusers_lowmem.quantization import conv1d_to_linear_, has_quantized_layers, matches_any

logger = logging.getLogger(__name__)

ADAPTER_ALGOS = ("lora", "loha", "lokr", "locon")
# Algorithms that also adapt the convolutions of ResNet/down/up blocks (LyCORIS' convention: only `lora` is
# linear-only).
CONV_ALGOS = ("locon", "loha", "lokr")
ROLES = ("unet", "text_encoder", "text_encoder_2", "llm")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LYCORIS_WEIGHT_NAME = "lycoris_weights.safetensors"
# Name of the child module that holds an attached network inside its base model, so that `.to()`, DDP, autocast
# and accelerate's hooks reach the adapter through the model it belongs to.
ADAPTER_MODULE_NAME = "lycoris_adapter"
# Key prefixes of the community (kohya/LyCORIS) format.
ROLE_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2", "llm": "lycoris"}
SDXL_ROLE_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
METADATA_PREFIX = "diffusers_lowmem."


@dataclass(frozen=True)
class AdapterConfig:
    """What to train: the algorithm and its sizes.

    Args:
        algo: One of `ADAPTER_ALGOS`.
        rank: Rank (LyCORIS "dim") of linear layers.
        alpha: Scale numerator: the update is multiplied by `alpha / rank`. `None` means `rank` (scale 1).
        conv_rank: Rank for convolutions (locon, loha, lokr). `None` means `rank`.
        conv_alpha: Alpha for convolutions. `None` means `conv_rank`.
        dropout: Dropout on the adapter path.
        lokr_factor: LoKr Kronecker factor; -1 picks the most balanced factorisation.
        target_modules: Module-name patterns (see `quantization.matches_any`) that narrow the preset's targets;
            a pattern with a role prefix (`"unet:to_q"`, `"text_encoder:q_proj"`) applies to that model only, one
            without to every model (see `target_patterns_for`).
    """

    algo: str = "lora"
    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    lokr_factor: int = -1
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.algo not in ADAPTER_ALGOS:
            raise ValueError(f"Unknown adapter {self.algo!r}; choose one of {', '.join(ADAPTER_ALGOS)}.")
        if self.rank < 1 or (self.conv_rank is not None and self.conv_rank < 1):
            raise ValueError(f"Adapter ranks must be >= 1, got rank={self.rank}, conv_rank={self.conv_rank}.")
        for pattern in self.target_modules or ():
            split_target_pattern(pattern)

    @property
    def linear_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def conv_dim(self) -> int:
        return self.rank if self.conv_rank is None else self.conv_rank

    @property
    def conv_scale_alpha(self) -> float:
        return float(self.conv_dim if self.conv_alpha is None else self.conv_alpha)

    @property
    def adapts_convolutions(self) -> bool:
        return self.algo in CONV_ALGOS

    def to_metadata(self) -> dict[str, str]:
        """The config as safetensors metadata (strings only)."""
        return {METADATA_PREFIX + key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> AdapterConfig | None:
        """The config stored by `to_metadata`, or None when the file was not written by us."""
        values = {}
        for field in fields(cls):
            key = METADATA_PREFIX + field.name
            if key in metadata:
                values[field.name] = json.loads(metadata[key])
        if "algo" not in values:
            return None
        if values.get("target_modules") is not None:
            values["target_modules"] = tuple(values["target_modules"])
        return cls(**values)


@dataclass(frozen=True)
class TargetPreset:
    """Which layers of a model family get adapters.

    Args:
        linear_parents: Class names of blocks whose `nn.Linear` (and 1x1 convolution) descendants get adapters.
            Empty: every linear layer of the model, except `exclude` and the output embedding.
        conv_parents: Class names of blocks whose linear and convolution descendants get adapters with the
            algorithms in `CONV_ALGOS`.
        exclude: Module-name patterns never adapted.
    """

    linear_parents: tuple[str, ...] = ()
    conv_parents: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


PRESETS = {
    # Attention and feed-forward layers of the transformer blocks (kohya's LoRA targets); LoCon adds the ResNet
    # blocks and resamplers.
    "unet": TargetPreset(
        linear_parents=("Transformer2DModel",), conv_parents=("ResnetBlock2D", "Downsample2D", "Upsample2D")
    ),
    "text_encoder": TargetPreset(linear_parents=("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")),
    # Causal LMs: all attention and MLP linear layers (Llama, Mistral, Qwen2, Gemma, OPT, GPT-2 after
    # `quantization.conv1d_to_linear_`); never the embeddings or the LM head.
    "llm": TargetPreset(exclude=("lm_head", "embed_out", "score", "*embed_tokens*", "*wte*", "*wpe*")),
}
PRESETS["text_encoder_2"] = PRESETS["text_encoder"]


# --------------------------------------------------------------------------------------------------------------------
# Attach
# --------------------------------------------------------------------------------------------------------------------


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d))


def _is_pointwise_conv(module: nn.Module) -> bool:
    return _is_conv(module) and all(size == 1 for size in module.kernel_size)


def _descendants_of(model: nn.Module, class_names: Iterable[str]) -> set[str]:
    class_names = set(class_names)
    names = set()
    for parent_name, parent in model.named_modules():
        if type(parent).__name__ in class_names:
            for child_name, _ in parent.named_modules():
                if child_name:
                    names.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


ROLE_PATTERN_SEPARATOR = ":"
# A typical layer name per role, for examples in error messages.
_EXAMPLE_LEAF = {"unet": "to_q", "text_encoder": "q_proj", "text_encoder_2": "q_proj", "llm": "q_proj"}


def split_target_pattern(pattern: str) -> tuple[str | None, str]:
    """Splits a `--target_modules` pattern into its role prefix and the module-name pattern.

    Module names never hold a colon, so `ROLE:PATTERN` is unambiguous: `"unet:to_q"` -> `("unet", "to_q")`,
    `"to_q"` -> `(None, "to_q")` (applies to every model).

    Args:
        pattern: One pattern as given on the command line.

    Returns:
        `(role or None, module-name pattern)`.

    Raises:
        ValueError: If the prefix is not one of `ROLES` or nothing follows it.
    """
    role, separator, module_pattern = pattern.partition(ROLE_PATTERN_SEPARATOR)
    if not separator:
        return None, pattern
    if role not in ROLES:
        raise ValueError(
            f"{pattern!r} has the unknown role prefix {role!r}: use one of {', '.join(ROLES)} (e.g. unet:to_q,"
            f" text_encoder:q_proj), or no prefix to match in every model."
        )
    if not module_pattern:
        raise ValueError(
            f"{pattern!r} has the role prefix {role!r} but no module-name pattern after it (e.g. {role}:"
            f"{_EXAMPLE_LEAF[role]})."
        )
    return role, module_pattern


def target_patterns_for(patterns: Iterable[str] | None, role: str) -> tuple[str, ...] | None:
    """The module-name patterns that apply to the model in `role`: those without a role prefix and those with its.

    Args:
        patterns: `AdapterConfig.target_modules` (patterns, some maybe `ROLE:PATTERN`), or None.
        role: One of `ROLES`.

    Returns:
        The patterns without their prefixes, or None when none applies (the model keeps its preset's targets).
    """
    applying = []
    for pattern in patterns or ():
        pattern_role, module_pattern = split_target_pattern(pattern)
        if pattern_role in (None, role):
            applying.append(module_pattern)
    return tuple(applying) or None


def find_target_modules(model: nn.Module, role: str, config: AdapterConfig) -> dict[str, nn.Module]:
    """The layers of `model` that get adapters, by module name, in model order.

    Args:
        model: The model (UNet, text encoder or causal LM).
        role: One of `ROLES`; selects the `TargetPreset` and the `ROLE:` patterns of `config.target_modules`.
        config: The adapter config; `lora` adapts linear layers only, the others convolutions too, and
            `target_modules` narrows the selection (patterns without a role prefix in every model, `ROLE:PATTERN`
            only in the model of that role; a model no pattern applies to keeps its preset's targets).

    Returns:
        `{module name: module}`.

    Raises:
        ValueError: If nothing matches (for instance a `target_modules` pattern that names no layer of this model),
            naming the model, its role prefix and the layer names it has.
    """
    preset = PRESETS[role]
    output_embedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_names = _descendants_of(model, preset.linear_parents) if preset.linear_parents else None
    conv_names = _descendants_of(model, preset.conv_parents) if config.adapts_convolutions else set()
    candidates = {}
    for name, module in model.named_modules():
        if not (_is_linear(module) or _is_conv(module)) or module is output_embedding:
            continue
        if matches_any(name, preset.exclude) or name.startswith(ADAPTER_MODULE_NAME):
            continue
        linear_like = _is_linear(module) or _is_pointwise_conv(module)
        in_linear_scope = linear_names is None or name in linear_names
        if (linear_like and in_linear_scope) or name in conv_names:
            candidates[name] = module
    patterns = target_patterns_for(config.target_modules, role)
    targets = candidates
    if patterns:
        targets = {name: module for name, module in candidates.items() if matches_any(name, patterns)}
    if not targets:
        raise ValueError(_no_target_message(model, role, config, candidates))
    return targets


def _no_target_message(model: nn.Module, role: str, config: AdapterConfig, candidates: Mapping) -> str:
    model_name = f"the {role} ({type(model).__name__})"
    if not config.target_modules:
        return f"No layer of {model_name} can get a {config.algo} adapter: the model has no adaptable layers."
    leaves = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    shown = ", ".join(leaves[:12]) + (", ..." if len(leaves) > 12 else "")
    leaf = _EXAMPLE_LEAF[role] if _EXAMPLE_LEAF[role] in leaves or not leaves else leaves[0]
    # The user's patterns kept for the models they were meant for (prefixed where they had no prefix), plus one
    # for this model.
    others = [pattern for pattern in config.target_modules if split_target_pattern(pattern)[0] != role]
    other_role = "unet" if role != "unet" else "text_encoder"
    kept = [pattern if split_target_pattern(pattern)[0] else f"{other_role}:{pattern}" for pattern in others]
    if role == "llm":  # one model: the patterns just name no layer of it
        return (
            f"No layer of {model_name} matches --target_modules {' '.join(config.target_modules)}: pass patterns"
            f" that name its layers, e.g. --target_modules {leaf}. Its adaptable layers end in: {shown}."
        )
    example = " ".join([*kept, f"{role}{ROLE_PATTERN_SEPARATOR}{leaf}"])
    return (
        f"No layer of {model_name} matches --target_modules {' '.join(config.target_modules)}. Patterns without a"
        f" role prefix apply to every model; give this model its own patterns with the prefix"
        f" '{role}{ROLE_PATTERN_SEPARATOR}', e.g. --target_modules {example}. Its adaptable layers end in: {shown}."
    )


def role_prefix(model: nn.Module, role: str, sdxl: bool = False) -> str:
    """The kohya key prefix of `role`, with the `text_model` level that community files expect.

    transformers 5's `CLIPTextModel` has no `text_model` level (its layers are `encoder.layers...`), while
    ComfyUI, A1111 and kohya read `lora_te_text_model_encoder_layers_...`; the level is added to the prefix here.
    """
    prefix = (SDXL_ROLE_PREFIXES if sdxl else ROLE_PREFIXES)[role]
    if role.startswith("text_encoder") and not hasattr(model, "text_model"):
        prefix += "_text_model"
    return prefix


def lora_name(prefix: str, module_name: str) -> str:
    """kohya's module key: the prefix and the module's dotted name, joined with underscores."""
    return f"{prefix}_{module_name}".replace(".", "_")


def _create_module(lycoris_name: str, module: nn.Module, config: AdapterConfig, bypass_mode: bool | None):
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    module_class = {"lora": LoConModule, "locon": LoConModule, "loha": LohaModule, "lokr": LokrModule}[config.algo]
    is_spatial_conv = _is_conv(module) and not _is_pointwise_conv(module)
    rank, alpha = (config.conv_dim, config.conv_scale_alpha) if is_spatial_conv else (config.rank, config.linear_alpha)
    extra = {"factor": config.lokr_factor} if config.algo == "lokr" else {}
    return module_class(
        lycoris_name,
        module,
        multiplier=1.0,
        lora_dim=rank,
        alpha=alpha,
        dropout=config.dropout,
        bypass_mode=True if bypass_mode is None else bypass_mode,
        **extra,
    )


def _new_network(model: nn.Module, lycoris_modules: list) -> nn.Module:
    from lycoris import LycorisNetwork

    network = LycorisNetwork(model, init_only=True)
    network.loras = list(lycoris_modules)
    for module in network.loras:
        network.algo_table[type(module).__name__] = network.algo_table.get(type(module).__name__, 0) + 1
    return network


def _register(model: nn.Module, network: nn.Module) -> None:
    if hasattr(model, ADAPTER_MODULE_NAME):
        raise ValueError(
            f"{type(model).__name__} already has an adapter attached; detach it first with `detach_adapter`."
        )
    network.apply_to()
    model.add_module(ADAPTER_MODULE_NAME, network)


def attach_adapter(
    model: nn.Module, config: AdapterConfig, role: str, bypass_mode: bool | None = None, sdxl: bool = False
) -> nn.Module:
    """Wraps the target layers of `model` with fresh LyCORIS modules and returns the network holding them.

    The network becomes the child `ADAPTER_MODULE_NAME` of `model`; its parameters are the only trainable ones
    (`model` itself is frozen here). Fresh adapters leave the model's outputs unchanged.

    Args:
        model: UNet, text encoder or causal LM, possibly quantized by `quantization.quantize_model`.
        config: Algorithm and sizes.
        role: One of `ROLES` (key prefix and target preset).
        bypass_mode: Compute `W x + delta(x)` (the default, `None`) instead of rebuilding `W + delta` on every
            forward. Bypass never materialises a full-size weight for LoRA, works on quantized layers (where LyCORIS
            cannot rebuild), and is the only mode in which LyCORIS applies dropout to LoHa/LoKr/LoCon.
        sdxl: Use SDXL's `lora_te1_` prefix for the first text encoder.

    Returns:
        The LyCORIS network (an `nn.Module`), already applied.
    """
    if role not in ROLES:
        raise ValueError(f"Unknown adapter role {role!r}; one of {', '.join(ROLES)}.")
    if config.algo == "locon" and not any(_is_conv(m) and not _is_pointwise_conv(m) for m in model.modules()):
        logger.info(f"locon on {type(model).__name__}, which has no convolutions, is lora.")
    model.requires_grad_(False)
    prefix = role_prefix(model, role, sdxl)
    targets = find_target_modules(model, role, config)
    # A memory estimate's fake model: LyCORIS reads values as it builds (kernel sizes through tensors), so its
    # modules are built on real tensors and their parameters then replaced by fake ones of the same shapes.
    fake_base = estimate.is_fake_module(model)
    with estimate.real_tensors() if fake_base else contextlib.nullcontext():
        lycoris_modules = [
            _create_module(lora_name(prefix, name), module, config, bypass_mode) for name, module in targets.items()
        ]
    network = _new_network(model, lycoris_modules)
    _register(model, network)  # the LyCORIS modules become the network's submodules here
    if fake_base:
        estimate.fake_copies_(network)
    device = next(iter(targets.values())).weight.device
    estimate.module_to_(network, device=device if device.type != "meta" else "cpu", dtype=torch.float32)
    network.requires_grad_(True)
    logger.info(f"Attached {config.algo} to {len(lycoris_modules)} layers of the {role} ({_count(network):,} params).")
    return network


def detach_adapter(model: nn.Module) -> nn.Module | None:
    """Restores the original forwards of `model` and removes its adapter network (returned)."""
    network = getattr(model, ADAPTER_MODULE_NAME, None)
    if network is None:
        return None
    network.restore()
    delattr(model, ADAPTER_MODULE_NAME)
    return network


def _count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------------------------


def adapter_state_dict(networks: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """All networks' weights under their kohya/LyCORIS keys, as contiguous CPU tensors."""
    state = {}
    for network in networks.values():
        for key, value in network.state_dict().items():
            if key in state:
                raise ValueError(f"Duplicate adapter key {key}: two networks share a prefix.")
            state[key] = value.detach().to("cpu").contiguous()
    return state


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("diffusers_lowmem", "lycoris-lora", "torch", "diffusers", "transformers", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def adapter_metadata(networks: Mapping[str, nn.Module], config: AdapterConfig, extra: Mapping | None = None):
    """safetensors metadata: our config, roles, package versions, and kohya's `ss_*` keys that UIs display."""
    network_args = {"algo": config.algo, "conv_dim": config.conv_dim, "conv_alpha": config.conv_scale_alpha}
    if config.algo == "lokr":
        network_args["factor"] = config.lokr_factor
    metadata = {
        **config.to_metadata(),
        METADATA_PREFIX + "roles": json.dumps(sorted(networks)),
        METADATA_PREFIX + "versions": json.dumps(_package_versions()),
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.linear_alpha),
        "ss_network_args": json.dumps(network_args),
    }
    for key, value in (extra or {}).items():
        metadata[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def save_adapter(
    path: str | os.PathLike,
    networks: Mapping[str, nn.Module],
    config: AdapterConfig,
    metadata: Mapping | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes the networks' weights to one `.safetensors` file with kohya/LyCORIS keys and metadata.

    Args:
        path: The file to write; a directory gets `DIFFUSERS_WEIGHT_NAME` in it.
        networks: `{role: network}` as returned by `attach_adapter`.
        config: The config the networks were built with (stored as metadata).
        metadata: Extra metadata (e.g. `base_model`), stored under `diffusers_lowmem.`.
        dtype: Cast the weights (e.g. `torch.float16` for smaller files); default: as trained.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / DIFFUSERS_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(networks)
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(state, str(temporary), metadata=adapter_metadata(networks, config, metadata))
    os.replace(temporary, path)  # a reader never sees a half-written file
    return path


# --------------------------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------------------------


def resolve_weight_file(path: str | os.PathLike) -> Path:
    """The adapter file at `path`, or in the directory `path` (diffusers' name first, then LyCORIS')."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (DIFFUSERS_WEIGHT_NAME, LYCORIS_WEIGHT_NAME):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"No adapter weights at {path} (expected {DIFFUSERS_WEIGHT_NAME} or {LYCORIS_WEIGHT_NAME})."
    )


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights and metadata of a saved adapter file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = resolve_weight_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def _models_by_role(target) -> dict[str, nn.Module]:
    """The adaptable models of a pipeline, or a bare model under its role."""
    if isinstance(target, nn.Module):
        class_name = type(target).__name__
        if "UNet" in class_name or "Transformer2D" in class_name:
            return {"unet": target}
        if class_name.startswith("CLIPText"):
            return {"text_encoder": target}
        return {"llm": target}
    models = {}
    for role in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(target, role, None)
        if model is not None:
            models[role] = model
    if not models:
        raise TypeError(f"Cannot load an adapter into {type(target).__name__}: not a pipeline or a torch model.")
    return models


def _candidate_prefixes(model: nn.Module, role: str) -> list[str]:
    prefixes = [role_prefix(model, role), role_prefix(model, role, sdxl=True)] if role != "llm" else []
    if role == "llm":
        prefixes.append(ROLE_PREFIXES["llm"])
    return list(dict.fromkeys(prefixes))


def _layer_shape(layer: nn.Module) -> tuple[int, ...]:
    """`(out, in, *kernel)` of a linear or convolution layer, from its attributes (a packed 4-bit weight, or one on
    the meta device, need not have it); `in` per group, as the weight holds it."""
    if _is_linear(layer):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size


def _stored(weights: Mapping[str, torch.Tensor], key_name: str, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {name: weights[f"{key_name}.{name}"] for name in names if f"{key_name}.{name}" in weights}


def _lokr_factor_shapes(tensors: Mapping[str, torch.Tensor], kernel: tuple[int, ...]):
    """The Kronecker factors' shapes `((a, c), (b, d))` and the rank a LoKr module's stored tensors hold.

    `w1` is `(a, c)` or `w1_a (a, r) @ w1_b (r, c)`; `w2` is `(b, d, *kernel)`, `w2_a (b, r) @ w2_b (r, d * prod(kernel))`
    or, with Tucker, `t2 (r, r, *kernel)` contracted with `w2_a (r, b)` and `w2_b (r, d)`. The rank is None when
    both factors are full matrices (LyCORIS and ComfyUI then scale by 1).
    """
    kernel_size = int(torch.tensor(kernel).prod()) if kernel else 1
    rank = None
    if "lokr_w1" in tensors:
        w1_shape = tuple(tensors["lokr_w1"].shape)
    else:
        w1_shape = (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
        rank = tensors["lokr_w1_b"].shape[0]
    if "lokr_w2" in tensors:
        w2_shape = tuple(tensors["lokr_w2"].shape[:2])
    elif "lokr_t2" in tensors:
        w2_shape = (tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1])
        rank = tensors["lokr_w2_b"].shape[0]
    else:
        w2_shape = (tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1] // kernel_size)
        rank = tensors["lokr_w2_b"].shape[0]
    return (w1_shape, w2_shape), rank


def _lokr_from_weights(key_name: str, layer: nn.Module, weights: Mapping[str, torch.Tensor], full_rank: int):
    """A `LokrModule` holding exactly the stored Kronecker factors, whatever factorisation produced them.

    LyCORIS' `make_module_from_state_dict` guesses the factor again from the stored shapes and gets it wrong for
    some layers (a 640 -> 1920 3x3 convolution with a low-rank `w2` is rebuilt as (16, 40) where the file holds
    (20, 32)); other trainers may factor the two dimensions by other rules. Here LyCORIS builds the module with the
    file's structure (which halves are full, Tucker, DoRA) and then takes the stored tensors as its factors: the
    module's update and bypass forward follow the factors' shapes, not the factor it was built with.
    """
    from lycoris.modules import LokrModule

    factor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    tensors = _stored(weights, key_name, factor_names)
    shape = _layer_shape(layer)
    out_dim, in_dim, kernel = shape[0], shape[1], shape[2:]
    try:
        ((a, c), (b, d)), rank = _lokr_factor_shapes(tensors, kernel)
    except KeyError as missing:
        raise ValueError(
            f"The LoKr adapter {key_name} lacks the tensor {missing} (it holds {sorted(tensors)})."
        ) from None
    full_w2 = tensors.get("lokr_w2")
    if a * b != out_dim or c * d != in_dim or (full_w2 is not None and tuple(full_w2.shape[2:]) != kernel):
        stored = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        raise ValueError(
            f"The LoKr adapter {key_name} does not fit its layer: the stored factors {stored} give ({a}x{b}, {c}x{d})"
            f" = ({a * b}, {c * d}) where the layer is {shape}. Was it trained on a different model?"
        )
    alpha_tensor = weights.get(f"{key_name}.alpha")
    rank = full_rank if rank is None else rank
    alpha = float(rank if alpha_tensor is None else alpha_tensor)  # kohya: no alpha means alpha = rank
    module = LokrModule(
        key_name,
        layer,
        multiplier=1.0,
        lora_dim=rank,
        alpha=alpha,
        use_tucker="lokr_t2" in tensors,
        decompose_both="lokr_w1_a" in tensors,
        full_matrix="lokr_w1" in tensors and "lokr_w2" in tensors,
        weight_decompose=f"{key_name}.dora_scale" in weights,
        factor=-1,  # any: the factors' shapes come from the file just below
    )
    for name in factor_names:
        if name in module._parameters:
            delattr(module, name)
    for name, tensor in tensors.items():
        module.register_parameter(name, nn.Parameter(tensor.detach().to(torch.float32).clone()))
    module.use_w1, module.use_w2 = "lokr_w1" in tensors, "lokr_w2" in tensors
    module.tucker = "lokr_t2" in tensors
    # LyCORIS' own rule (and ComfyUI's): alpha / rank, but 1 when both factors are full matrices.
    module.scale = 1.0 if module.use_w1 and module.use_w2 else alpha / rank
    module.alpha = torch.tensor(alpha) if alpha_tensor is None else alpha_tensor.detach().to(torch.float32).clone()
    if module.wd:
        module.dora_scale = nn.Parameter(weights[f"{key_name}.dora_scale"].detach().to(torch.float32).clone())
    return module


def _with_alpha(weights: Mapping[str, torch.Tensor], key_name: str, rank: int) -> Mapping[str, torch.Tensor]:
    """kohya's convention for files without `alpha` (some trainers leave it out): alpha = rank, a scale of 1."""
    if f"{key_name}.alpha" in weights:
        return weights
    own = {f"{key_name}.{name}": tensor for name, tensor in _stored(weights, key_name, _MODULE_TENSOR_NAMES).items()}
    return {**own, f"{key_name}.alpha": torch.tensor(float(rank))}


# Every tensor name LyCORIS' LoCon/LoHa modules store, for copying one module's tensors.
_MODULE_TENSOR_NAMES = (
    "lora_up.weight",
    "lora_down.weight",
    "lora_mid.weight",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "dora_scale",
)


def module_from_weights(
    key_name: str, layer: nn.Module, weights: Mapping[str, torch.Tensor], config: AdapterConfig | None = None
):
    """Rebuilds the LyCORIS module stored under `key_name` for `layer`, with the file's shapes, ranks and alpha.

    Ranks come from the tensors' shapes (LoRA/LoCon: `lora_down`; LoHa: `hada_w1_b`; LoKr: its low-rank halves
    and, for LoKr, the Kronecker factors from its factors' shapes, see `_lokr_from_weights`). A missing `alpha`
    means alpha = rank (a scale of 1), as kohya reads it. Only what the tensors cannot say comes from `config`
    (the file's metadata): the rank of a LoKr module whose two factors are full matrices, which does not change
    its update (its scale is 1) but is reported by `lora_dim` and the peft export.

    Args:
        key_name: The module's key prefix in the file (`lora_unet_..._to_q`).
        layer: The `nn.Linear` / `nn.Conv*d` (or bitsandbytes) layer it adapts.
        weights: The file's tensors.
        config: The config stored in the file's metadata, or None (files from other trainers).

    Returns:
        The LyCORIS module, in bypass mode, not yet applied.

    Raises:
        ValueError: If LyCORIS knows no module for the stored tensors, or they do not fit the layer.
    """
    from lycoris.modules import LoConModule, LohaModule, LokrModule, get_module, make_module

    module_class, _ = get_module(weights, key_name)
    if module_class is None:
        stored = sorted(key.split(".", 1)[1] for key in weights if key.startswith(key_name + "."))
        raise ValueError(f"LyCORIS knows no adapter made of the tensors {stored} of {key_name}.")
    spatial = _is_conv(layer) and not _is_pointwise_conv(layer)
    if module_class is LokrModule:
        full_rank = (config.conv_dim if spatial else config.rank) if config else 1
        module = _lokr_from_weights(key_name, layer, weights, full_rank)
    else:
        if module_class is LoConModule:
            weights = _with_alpha(weights, key_name, weights[f"{key_name}.lora_down.weight"].shape[0])
        elif module_class is LohaModule:
            weights = _with_alpha(weights, key_name, weights[f"{key_name}.hada_w1_b"].shape[0])
        _, params = get_module(weights, key_name)
        try:
            module = make_module(module_class, params, key_name, layer)
        except RuntimeError as error:  # a tensor of another shape than the layer needs
            raise ValueError(
                f"The {module_class.__name__} adapter {key_name} does not fit its layer {_layer_shape(layer)}: {error}"
            ) from error
        if module is None:
            raise ValueError(
                f"LyCORIS cannot rebuild the adapter {key_name} ({module_class.__name__}) from its weights."
            )
    module.bypass_mode = True  # as trained: outputs reproduce bit for bit
    return module


def _adapter_device(model: nn.Module) -> torch.device:
    """Where a model's adapters live: with its parameters; on the CPU for a model built on the meta device."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def networks_from_weights(
    target, weights: Mapping[str, torch.Tensor], config: AdapterConfig | None = None
) -> dict[str, nn.Module]:
    """Builds LyCORIS modules for every layer of `target` that `weights` has keys for (any of the four algorithms,
    ranks and Kronecker factors read from the tensors, see `module_from_weights`) and loads the weights into them.
    Not yet applied.

    Args:
        target: A pipeline or a model (see `load_adapter`).
        weights: The file's tensors, under kohya/LyCORIS keys.
        config: The config in the file's metadata (`AdapterConfig.from_metadata`), None for other trainers' files.

    Returns:
        `{role: network}` for the roles that have adapters in `weights`.

    Raises:
        ValueError: If keys in `weights` match no layer of `target`, or a module's tensors do not fit its layer.
    """
    stored_names = {key.split(".", 1)[0] for key in weights}
    matched, networks = set(), {}
    for role, model in _models_by_role(target).items():
        if role == "llm":
            conv1d_to_linear_(model)  # GPT-2's Conv1D layers were adapted as the nn.Linear they equal
        lycoris_modules = []
        for prefix in _candidate_prefixes(model, role):
            for name, module in model.named_modules():
                key_name = lora_name(prefix, name)
                if key_name not in stored_names or key_name in matched or not (_is_linear(module) or _is_conv(module)):
                    continue
                lycoris_modules.append(module_from_weights(key_name, module, weights, config))
                matched.add(key_name)
        if lycoris_modules:
            networks[role] = _new_network(model, lycoris_modules).to(_adapter_device(model))
    unmatched = stored_names - matched
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} adapter modules match no layer of {type(target).__name__}, e.g. {sorted(unmatched)[:3]}."
            " Was the adapter trained on a different model?"
        )
    return networks


def load_adapter(target, path: str | os.PathLike, merge: bool = False, multiplier: float = 1.0) -> dict:
    """Loads a saved adapter (any of the four algorithms) into a diffusers pipeline or a model.

    diffusers' `load_lora_weights` reads kohya LoRA and LoCon but not LoHa or LoKr; this reads all four, and also
    files trained elsewhere in the kohya/LyCORIS format.

    Args:
        target: A pipeline (its `unet`, `text_encoder`, `text_encoder_2` get their adapters) or a model (UNet,
            CLIP text encoder, or causal LM).
        path: The `.safetensors` file, or a directory holding `pytorch_lora_weights.safetensors` or
            `lycoris_weights.safetensors`.
        merge: Add the update into the base weights (no adapter cost at inference; not possible on quantized
            layers). Otherwise the adapters stay attached as child modules.
        multiplier: Strength of the adapter.

    Returns:
        `{role: network}`; after a merge the networks are detached and only describe what was merged.
    """
    weights, metadata = read_adapter(path)
    networks = networks_from_weights(target, weights, AdapterConfig.from_metadata(metadata))
    models = _models_by_role(target)
    for role, network in networks.items():
        network.set_multiplier(multiplier)
        model = models[role]
        if merge:
            if has_quantized_layers(model):
                raise ValueError(f"Cannot merge an adapter into the quantized {role}; load it with merge=False.")
            _merge_modules(network, multiplier)
        else:
            _register(model, network)
    logger.info(f"Loaded adapter {resolve_weight_file(path)} into {', '.join(networks)}" + (" (merged)" * merge))
    return networks


def load_adapter_weights(networks: Mapping[str, nn.Module], path: str | os.PathLike) -> None:
    """Loads saved weights into networks already attached with the same config (used to resume training).

    Raises:
        ValueError: If the file's keys differ from the networks' (another config or model).
    """
    weights, _ = read_adapter(path)
    expected = {key for network in networks.values() for key in network.state_dict()}
    if set(weights) != expected:
        difference = sorted(set(weights) ^ expected)[:3]
        raise ValueError(f"Adapter file {path} does not match the attached adapters (e.g. {difference}).")
    for network in networks.values():
        network.load_state_dict({key: weights[key] for key in network.state_dict()}, strict=True)


def merge_adapter(model: nn.Module, multiplier: float = 1.0) -> None:
    """Merges the adapter attached to `model` into its (unquantized) weights and detaches it."""
    network = getattr(model, ADAPTER_MODULE_NAME, None)
    if network is None:
        raise ValueError(f"{type(model).__name__} has no adapter attached.")
    if has_quantized_layers(model):
        raise ValueError("Cannot merge an adapter into quantized layers.")
    detach_adapter(model)
    _merge_modules(network, multiplier)


@torch.no_grad()
def _merge_modules(network: nn.Module, multiplier: float) -> None:
    """Adds each module's update, computed in fp32, into its layer's weight.

    LoCon's `get_diff_weight` is the scaled update; LoHa's and LoKr's `get_weight` already apply the scale, which
    their `get_diff_weight` (and so LyCORIS' `merge_to`) applies a second time in lycoris-lora 4.1.3. The sum is
    formed in the update's own buffer, so one layer needs one full-size fp32 tensor on top of its weight.
    """
    from lycoris.modules import LoConModule

    for module in network.loras:
        weight = module.org_module[0].weight
        if isinstance(module, LoConModule):
            delta = module.get_diff_weight(multiplier, shape=weight.shape)[0]
        else:
            delta = module.get_weight(weight.shape)
            if multiplier != 1:
                delta = delta * multiplier
        stored = {parameter.untyped_storage().data_ptr() for parameter in module.parameters()}
        merged = delta.reshape(weight.shape).to(device=weight.device, dtype=torch.float32)
        if merged.untyped_storage().data_ptr() in stored:  # never add into the adapter's own tensors
            merged = merged.clone()
        weight.copy_(merged.add_(weight))


def trainable_parameter_count(config: AdapterConfig, module: nn.Module) -> int:
    """Trainable parameters that `config` adds to one layer, from the algorithm's formula.

    lora/locon: `r (in + out)` for linear layers, `r (in k_h k_w + out)` for convolutions; loha: twice that;
    lokr: the Kronecker factors (`w1` full, `w2` full or low rank) of LyCORIS' factorisation.
    """
    from lycoris.functional import factorization

    spatial = _is_conv(module) and not _is_pointwise_conv(module)
    rank = config.conv_dim if spatial else config.rank
    if _is_linear(module):
        in_features, out_features, kernel = module.in_features, module.out_features, 1
    else:
        in_features, out_features = module.in_channels, module.out_channels
        kernel = int(torch.tensor(module.kernel_size).prod())
    if config.algo in ("lora", "locon"):
        return rank * (in_features * kernel + out_features)
    if config.algo == "loha":
        return 2 * rank * (in_features * kernel + out_features)
    in_m, in_n = factorization(in_features, config.lokr_factor)
    out_l, out_k = factorization(out_features, config.lokr_factor)
    w1 = out_l * in_m
    if spatial:
        full_w2 = out_k * in_n * kernel
        low_rank_w2 = rank * (out_k + in_n * kernel)
        use_full = rank >= max(out_k, in_n) / 2
    else:
        full_w2 = out_k * in_n
        low_rank_w2 = rank * (out_k + in_n)
        use_full = rank >= max(out_k, in_n) / 2
    return w1 + (full_w2 if use_full else low_rank_w2)
