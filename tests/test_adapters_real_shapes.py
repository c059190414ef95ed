"""Adapter files round-trip at the shapes of the real models: SD 1.5, SD 2.1, SDXL (UNet and text encoders),
Llama-2-7B and Llama-3-8B, built on the meta device (`architectures.build_on_meta`), with all four algorithms at
default and other ranks, alphas, convolution ranks and `--lokr_factor` values.

Each case attaches adapters as the trainers do, gives them random values, saves them with `save_adapter` and
loads the file back with `load_adapter` (the loader of the trainers' final `--validation_prompt` test and of the
README's "load the result" example), in bypass mode and merged. The tiny fixtures never reach shapes like a
640 -> 1920 3x3 convolution, where LyCORIS' own rebuild guessed another Kronecker factorisation than the file holds.

Only adapter tensors are real. Each case adapts the first layer of every shape class of every model (role, layer
type, out, in, kernel, stride: the trainers' own targets, narrowed with `ROLE:NAME` patterns), and checks each
layer's update: the loaded module's bypass output (base left on the meta device), the layer's output after
`load_adapter(merge=True, multiplier=0.5)` into zero weights of that layer only and, for the causal LMs, peft's
own update after `PeftModel.from_pretrained` on the peft export, each against the update worked out here from the
stored tensors alone (kohya/ComfyUI semantics: `alpha / rank` applied once; LoKr with two full halves: 1), on
random inputs. Every module of a whole default LoKr file, and files from other trainers (no metadata, LyCORIS'
LoKr variants, foreign factorisations, no alpha), load back too.
"""

import ctypes
import dataclasses
import gc
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffusers_lowmem import adapters, architectures, peft_format
from diffusers_lowmem.adapters import AdapterConfig

# Architecture -> {role: component}; the SD families are loaded like a pipeline, the causal LMs as one model.
MODELS = {
    "sd15": {"unet": "unet", "text_encoder": "text_encoder"},
    "sd21": {"unet": "unet", "text_encoder": "text_encoder"},
    "sdxl": {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"},
    "llama2-7b": {"llm": "model"},
    "llama3-8b": {"llm": "model"},
}

# The trainers' defaults per algorithm, then other ranks and alphas (alpha != rank, so a scale applied twice
# shows), convolution ranks and alphas, and for LoKr a factor of 16 with rank 64: the SD UNets' and text encoders'
# linear layers then get two full Kronecker halves (LyCORIS' scale 1), Llama's a low-rank second half, the
# convolutions (conv_rank 8) a low-rank second half over the 3x3 kernel.
CONFIGS = [
    AdapterConfig(algo="lora"),
    AdapterConfig(algo="lora", rank=8, alpha=16),
    AdapterConfig(algo="locon"),
    AdapterConfig(algo="locon", rank=8, alpha=2, conv_rank=4, conv_alpha=8),
    AdapterConfig(algo="loha"),
    AdapterConfig(algo="loha", rank=2, alpha=4, conv_rank=8, conv_alpha=2),
    AdapterConfig(algo="lokr"),
    AdapterConfig(algo="lokr", rank=64, alpha=16, conv_rank=8, conv_alpha=2, lokr_factor=16),
]


# glibc's mallopt parameters and their defaults (man 3 mallopt).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, DEFAULT_THRESHOLD = -1, -3, 128 * 1024


def glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


@pytest.fixture(autouse=True)
def reuse_freed_memory():
    """Within a case, reuses freed memory instead of faulting fresh pages in; after it, frees everything.

    A case builds and frees full-size updates of real layers (up to 235 MB each), one layer after the other. glibc
    returns blocks above its mmap threshold to the kernel on free, so each layer faulted every page in again: that
    page faulting, not the arithmetic, was 40 % of the module's CPU time (54 s of system time in 127 s). An attached
    LyCORIS module and its layer refer to each other (`org_module`, the patched `forward`), so the case's tensors
    are freed by the cycle collector, run here; then the heap is handed back, keeping the process's memory at one
    case's peak.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    yield
    gc.collect()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def config_id(config):
    return f"{config.algo}-r{config.rank}-a{config.alpha}-cr{config.conv_rank}-ca{config.conv_alpha}-f{config.lokr_factor}"


def build(architecture):
    """`{role: model}` with the architecture's real shapes on the meta device."""
    return {
        role: architectures.build_on_meta(architecture, component) for role, component in MODELS[architecture].items()
    }


def as_target(models):
    """What `load_adapter` takes: the model of a causal LM, or a pipeline-like object holding the SD models."""
    return models["llm"] if "llm" in models else types.SimpleNamespace(**models)


def randomize_(network, seed):
    """Fresh adapters are zero updates; random values in every tensor make each factor's layout count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)


def layer_shape(layer):
    if isinstance(layer, torch.nn.Linear):
        return layer.out_features, layer.in_features
    return layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size


def shape_class(role, layer):
    """Layers of one class behave alike: same role (key prefix, rank), weight shape and convolution geometry."""
    geometry = () if isinstance(layer, torch.nn.Linear) else (layer.stride, layer.padding, layer.groups)
    return role, type(layer).__name__, layer_shape(layer), geometry


def sampled_config(models, config):
    """`config` narrowed, with `ROLE:NAME` patterns, to the first target layer of every shape class of each model.

    The targets are the trainers' own (`find_target_modules` with `config`); one layer per shape class keeps the
    file small, and a layer's adapter depends only on its class (its shapes and whether rank or conv_rank applies).
    """
    patterns = []
    for role, model in models.items():
        seen = set()
        for path, layer in adapters.find_target_modules(model, role, config).items():
            if shape_class(role, layer) not in seen:
                seen.add(shape_class(role, layer))
                patterns.append(f"{role}:{path}")
    return dataclasses.replace(config, target_modules=tuple(patterns))


def adapted_paths(models, networks):
    """`{key name: (role, module path)}` of every adapted layer."""
    return {
        lycoris_module.lora_name: (role, path)
        for role, network in networks.items()
        for path, lycoris_module, _ in peft_format.adapted_layers(network, models[role])
    }


def materialize_zero_(models, sampled):
    """Gives the sampled layers real zero weights and biases on the CPU; everything else stays on meta."""
    layers = {}
    for key_name, (role, path) in sampled.items():
        layer = models[role].get_submodule(path)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in layer.parameters(recurse=False):
                parameter.zero_()
        layers[key_name] = layer
    return layers


def apply_weight(layer, weight, inputs):
    """`inputs` through a weight of `layer`'s kind and geometry (no bias)."""
    if isinstance(layer, torch.nn.Linear):
        return F.linear(inputs, weight)
    return F.conv2d(inputs, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def pointwise(weight, hidden):
    """A `(out, mid)` matrix applied along the feature (linear) or channel (convolution) dimension."""
    if hidden.dim() == 2:
        return F.linear(hidden, weight)
    return F.conv2d(hidden, weight[:, :, None, None])


def expected_update(tensors, key_name, layer, inputs):
    """`delta W` applied to `inputs`, worked out from the file's tensors alone, as ComfyUI reads them, without
    building the full-size `delta W`:

    - lora/locon: `up @ down`, so `up (down x)`;
    - loha: `(w1_a @ w1_b) * (w2_a @ w2_b)`, which is `C @ D` with `C[o, (i, j)] = w1_a[o, i] w2_a[o, j]` and
      `D[(i, j), n] = w1_b[i, n] w2_b[j, n]`;
    - lokr: `kron(w1, w2)` (each half full, `a @ b` or a Tucker core with its two factors), applied as `w1 X w2^T` on the input split into `(c, d)`
      blocks (for a convolution, `w2` convolves each of the `c` channel groups);

    times `alpha / rank` once; a LoKr module with two full halves has no rank and a scale of 1.
    """

    def tensor(name):
        return tensors.get(f"{key_name}.{name}")

    out_dim, in_dim, *kernel = layer_shape(layer)
    alpha = float(tensor("alpha"))
    if tensor("lora_down.weight") is not None:
        down, up = tensor("lora_down.weight"), tensor("lora_up.weight")
        rank = down.shape[0]
        update = pointwise(up.flatten(1), apply_weight(layer, down.reshape(rank, in_dim, *kernel), inputs))
    elif tensor("hada_w1_a") is not None:
        w1_a, w1_b, w2_a, w2_b = (tensor(f"hada_{name}") for name in ("w1_a", "w1_b", "w2_a", "w2_b"))
        rank = w1_b.shape[0]
        left = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(out_dim, -1)
        right = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, in_dim, *kernel)
        update = pointwise(left, apply_weight(layer, right, inputs))
    else:
        rank = None
        w1 = tensor("lokr_w1")
        if w1 is None:
            w1, rank = tensor("lokr_w1_a") @ tensor("lokr_w1_b"), tensor("lokr_w1_b").shape[0]
        w2 = tensor("lokr_w2")
        if w2 is None:
            w2_a, w2_b, rank = tensor("lokr_w2_a"), tensor("lokr_w2_b"), tensor("lokr_w2_b").shape[0]
            if tensor("lokr_t2") is None:
                w2 = w2_a @ w2_b
            else:  # Tucker: a core over the kernel, contracted with the two modes' factors
                w2 = torch.einsum("ij...,ip,jq->pq...", tensor("lokr_t2"), w2_a, w2_b)
        (a, c), b = w1.shape, w2.shape[0]
        w2 = w2.reshape(b, in_dim // c, *kernel)
        batch = inputs.shape[0]
        if isinstance(layer, torch.nn.Linear):
            blocks = inputs.reshape(batch, c, -1)
            update = torch.einsum("ip,npq,jq->nij", w1, blocks, w2).reshape(batch, a * b)
        else:
            groups = inputs.reshape(batch * c, -1, *inputs.shape[2:])
            convolved = apply_weight(layer, w2, groups)
            convolved = convolved.reshape(batch, c, b, *convolved.shape[2:])
            update = torch.einsum("ip,npb...->nib...", w1, convolved).reshape(batch, a * b, *convolved.shape[3:])
    scale = 1.0 if rank is None else alpha / rank
    return update * scale


def layer_inputs(layer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(1, layer.in_channels, 6, 6, generator=generator)


def assert_relative_close(actual, expected, tolerance=1e-5):
    """Outputs on random inputs agree, so the updates do (a difference would have to vanish on all inputs)."""
    assert expected.abs().max() > 0  # a missing update cannot pass as zero = zero
    error = (actual - expected).norm() / expected.norm()
    assert error < tolerance, f"relative error {error:.2e}"


def expected_alpha(config, layer, lycoris_module):
    """The alpha the file must hold: the config's (ComfyUI reads it as is); LyCORIS stores the rank for a LoKr
    module whose two halves are full (its scale is 1 whatever alpha was asked for)."""
    spatial = not isinstance(layer, torch.nn.Linear) and layer.kernel_size != (1, 1)
    if getattr(lycoris_module, "use_w1", False) and getattr(lycoris_module, "use_w2", False):
        return float(lycoris_module.lora_dim)
    return config.conv_scale_alpha if spatial else config.linear_alpha


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("architecture", list(MODELS))
def test_adapter_file_round_trips_at_real_shapes(architecture, config, tmp_path):
    sdxl = architecture == "sdxl"
    models = build(architecture)
    config = sampled_config(models, config)
    networks = {role: adapters.attach_adapter(model, config, role=role, sdxl=sdxl) for role, model in models.items()}
    for seed, network in enumerate(networks.values()):
        randomize_(network, seed=seed + 1)
    attached = {module.lora_name: module for network in networks.values() for module in network.loras}
    sampled = adapted_paths(models, networks)
    assert len(sampled) == len(config.target_modules)  # one module per shape class
    for key_name, (role, path) in sampled.items():
        layer = models[role].get_submodule(path)
        assert float(attached[key_name].alpha) == expected_alpha(config, layer, attached[key_name])
    path = adapters.save_adapter(tmp_path / "adapter", networks, config)
    saved = load_file(path)
    if "llm" in models:
        assert_peft_export_matches(config, models["llm"], networks["llm"], saved, sampled, architecture, tmp_path)
    for model in models.values():
        adapters.detach_adapter(model)

    # Bypass (the base stays on meta): every module comes back with exactly the stored tensors and the trained
    # scale, and adds the update the file describes.
    loaded = adapters.load_adapter(as_target(models), path)
    assert set(loaded) == set(models)
    loaded_modules = {module.lora_name: module for network in loaded.values() for module in network.loras}
    assert set(loaded_modules) == set(attached)
    assert all(type(loaded_modules[name]) is type(module) for name, module in attached.items())
    assert {name: module.scale for name, module in loaded_modules.items()} == pytest.approx(
        {name: module.scale for name, module in attached.items()}
    )
    loaded_state = {key: value for network in loaded.values() for key, value in network.state_dict().items()}
    assert loaded_state.keys() == saved.keys()
    assert all(torch.equal(loaded_state[key], saved[key]) for key in saved)
    for key_name, module in loaded_modules.items():
        layer = module.org_module[0]
        inputs = layer_inputs(layer)
        assert module.bypass_mode
        with torch.no_grad():
            assert_relative_close(module.bypass_forward_diff(inputs), expected_update(saved, key_name, layer, inputs))
    for model in models.values():
        adapters.detach_adapter(model)

    # Merged into zero weights at half strength: each layer then computes exactly half the update, the scale
    # applied once (LyCORIS' own `get_diff_weight` applies it twice for loha and lokr; the configs with an alpha
    # have scales other than 1).
    layers = materialize_zero_(models, sampled)
    adapters.load_adapter(as_target(models), path, merge=True, multiplier=0.5)
    for key_name, layer in layers.items():
        inputs = layer_inputs(layer)
        with torch.no_grad():
            assert_relative_close(layer(inputs), 0.5 * expected_update(saved, key_name, layer, inputs))


@pytest.mark.parametrize("architecture", list(MODELS))
def test_whole_default_lokr_file_loads_back(architecture, tmp_path):
    """The failure as users met it: every layer the trainers adapt, with `--adapter lokr` and nothing else."""
    config = AdapterConfig(algo="lokr")
    models = build(architecture)
    networks = {
        role: adapters.attach_adapter(model, config, role=role, sdxl=architecture == "sdxl")
        for role, model in models.items()
    }
    for seed, network in enumerate(networks.values()):
        randomize_(network, seed=seed + 1)
    path = adapters.save_adapter(tmp_path, networks, config)
    saved = load_file(path)
    for model in models.values():
        adapters.detach_adapter(model)
    loaded = adapters.load_adapter(as_target(models), path)
    loaded_state = {key: value for network in loaded.values() for key, value in network.state_dict().items()}
    assert loaded_state.keys() == saved.keys()
    assert all(torch.equal(loaded_state[key], saved[key]) for key in saved)


def assert_peft_export_matches(config, model, network, saved, sampled, architecture, tmp_path):
    """The peft export, loaded with `PeftModel.from_pretrained`, holds the stored update for every adapted layer
    (peft's own `get_delta_weight`, what its forward and `merge_and_unload` use)."""
    from peft import PeftModel

    peft_dir = tmp_path / "peft"
    # peft factors LoKr dimensions by its own copy of LyCORIS' rule: on Llama's linear layers every config here
    # is representable.
    assert peft_format.save_peft_adapter(peft_dir, network, config, model) == peft_dir
    base = build(architecture)["llm"]
    for _, path in sampled.values():
        # peft places an adapter on its base layer's device; the values stay unread (never touched, never paged in).
        base.get_submodule(path).to_empty(device="cpu")
    peft_model = PeftModel.from_pretrained(base, peft_dir, low_cpu_mem_usage=True)
    for key_name, (_, path) in sampled.items():
        peft_layer = peft_model.base_model.model.get_submodule(path)
        layer = peft_layer.get_base_layer()
        inputs = layer_inputs(layer)
        with torch.no_grad():
            delta = peft_layer.get_delta_weight("default")
            assert_relative_close(apply_weight(layer, delta, inputs), expected_update(saved, key_name, layer, inputs))


# --------------------------------------------------------------------------------------------------------------------
# Files from other trainers: no metadata, any factorisation LyCORIS can write, or none it would choose
# --------------------------------------------------------------------------------------------------------------------

# SD 1.5's 1920 -> 640 3x3 convolution of the issue, and a 1280 -> 320 linear layer.
OTHER_TRAINER_LAYERS = ("up_blocks.2.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")


def lycoris_lokr_tensors(layer, seed, **options):
    """The tensors LyCORIS' own LoKr module writes for `layer` with `options` (random values)."""
    from lycoris.modules import LokrModule

    module = LokrModule("x", layer.to_empty(device="cpu"), **options)
    randomize_(module, seed)
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


@pytest.mark.parametrize(
    "options",
    [
        dict(lora_dim=8, alpha=2, factor=-1),
        dict(lora_dim=8, alpha=2, factor=4, decompose_both=True),
        dict(lora_dim=4, alpha=1, factor=8, use_tucker=True),
        dict(lora_dim=4, alpha=16, factor=-1, unbalanced_factorization=True),
        dict(lora_dim=16, alpha=4, factor=32, decompose_both=True),
    ],
    ids=lambda options: "-".join(f"{key}={value}" for key, value in options.items()),
)
def test_lycoris_lokr_files_without_metadata_load_back(options, tmp_path):
    template = architectures.build_on_meta("sd15", "unet")
    weights = {}
    for seed, path in enumerate(OTHER_TRAINER_LAYERS):
        tensors = lycoris_lokr_tensors(template.get_submodule(path), seed, **options)
        weights.update({f"{adapters.lora_name('lora_unet', path)}.{key}": value for key, value in tensors.items()})
    assert_file_loads_as_stored(weights, tmp_path)


def test_lokr_factors_lycoris_would_never_choose_and_missing_alpha_load(tmp_path):
    """Factors by another rule (1920 = 10 x 192 in, 640 = 40 x 16 out), and kohya-style files without `alpha`."""
    generator = torch.Generator().manual_seed(0)
    conv, linear = (adapters.lora_name("lora_unet", path) for path in OTHER_TRAINER_LAYERS)
    weights = {
        f"{conv}.lokr_w1": torch.randn(40, 10, generator=generator),
        f"{conv}.lokr_w2_a": torch.randn(16, 4, generator=generator),
        f"{conv}.lokr_w2_b": torch.randn(4, 192 * 9, generator=generator) / 40,
        f"{conv}.alpha": torch.tensor(2.0),
        f"{linear}.lora_down.weight": torch.randn(6, 1280, generator=generator) / 36,
        f"{linear}.lora_up.weight": torch.randn(320, 6, generator=generator),
    }
    loaded = assert_file_loads_as_stored(weights, tmp_path)
    assert {module.lora_name: module.scale for module in loaded.loras} == {conv: 0.5, linear: 1.0}


def assert_file_loads_as_stored(weights, tmp_path):
    """`weights` saved without metadata load into SD 1.5's UNet: same tensors, and the update the tensors say, in
    bypass and merged."""
    path = tmp_path / "other.safetensors"
    save_file(weights, str(path))
    unet = architectures.build_on_meta("sd15", "unet")
    network = adapters.load_adapter(unet, path)["unet"]
    state = network.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items() if key in state)
    assert {key for key in weights if not key.endswith(".alpha")} <= set(state)
    modules = {module.lora_name: module for module in network.loras}
    for key_name, module in modules.items():
        layer = module.org_module[0]
        inputs = layer_inputs(layer)
        with torch.no_grad():
            assert_relative_close(module.bypass_forward_diff(inputs), file_update(weights, key_name, layer, inputs))
    adapters.detach_adapter(unet)
    layers = {key_name: module.org_module[0] for key_name, module in modules.items()}
    for layer in layers.values():
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for parameter in layer.parameters(recurse=False):
                parameter.zero_()
    adapters.load_adapter(unet, path, merge=True)
    for key_name, layer in layers.items():
        inputs = layer_inputs(layer)
        with torch.no_grad():
            assert_relative_close(layer(inputs), file_update(weights, key_name, layer, inputs))
    return network


def file_update(weights, key_name, layer, inputs):
    """`expected_update`, reading a missing alpha as kohya does: alpha = rank (a scale of 1)."""
    if f"{key_name}.alpha" not in weights:
        rank = weights[f"{key_name}.lora_down.weight"].shape[0]
        weights = {**weights, f"{key_name}.alpha": torch.tensor(float(rank))}
    return expected_update(weights, key_name, layer, inputs)
