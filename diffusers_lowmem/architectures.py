"""Real architectures with random weights, built from the published configs shipped in `configs/` (no download).

Memory does not depend on weight values, so a profiler gets real-scale numbers from the real module graph: every
component is built under `accelerate.init_empty_weights()`, which puts parameters on the meta device (no storage)
and keeps buffers real. The configs are the `config.json` files of each component as published on the Hub; the
`tiny-*` architectures are small CPU-sized shapes for tests and demos.

    python -m diffusers_lowmem.architectures

prints every architecture with its parameter counts and bf16 size.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"

TASK_TEXT_TO_IMAGE = "text-to-image"
TASK_CAUSAL_LM = "causal-lm"


@dataclass(frozen=True)
class ArchitectureSpec:
    """One buildable architecture.

    Attributes:
        name: Key in `ARCHITECTURES`, e.g. `"sd15"`.
        task: `"text-to-image"` or `"causal-lm"`.
        family: `"sd"`, `"sdxl"` or `"llama"`; tells a trainer which components and conditioning to expect.
        components: Component name (`"unet"`, `"text_encoder_2"`, `"model"`, `"tokenizer"`, ...) -> file in `configs/`.
        description: One line for tables and `--help`.
        source: The Hub repository the configs were published in (empty for the tiny architectures).
        published_params: Parameter count per component as published (model cards, papers, loaded checkpoints).
    """

    name: str
    task: str
    family: str
    components: dict[str, str]
    description: str
    source: str = ""
    published_params: dict[str, int] = field(default_factory=dict)

    @property
    def model_components(self) -> list[str]:
        """Components with parameters (everything but tokenizers and the scheduler)."""
        return [c for c in self.components if not c.startswith("tokenizer") and c != "scheduler"]


def _files(name: str, components: list[str]) -> dict[str, str]:
    return {component: f"{name}.{component}.json" for component in components}


_SD_COMPONENTS = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
_SDXL_COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
_LLAMA_COMPONENTS = ["model", "tokenizer"]

# Published counts. The VAE and CLIP ViT-L text encoder are shared by SD 1.5, SD 2.1 and SDXL.
_SD_VAE_PARAMS = 83_653_863
_CLIP_L_TEXT_PARAMS = 123_060_480

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in [
        ArchitectureSpec(
            name="sd15",
            task=TASK_TEXT_TO_IMAGE,
            family="sd",
            components=_files("sd15", _SD_COMPONENTS),
            description="Stable Diffusion 1.5: UNet 860M, CLIP ViT-L/14 text encoder, 512px",
            source="stable-diffusion-v1-5/stable-diffusion-v1-5",
            published_params={"unet": 859_520_964, "vae": _SD_VAE_PARAMS, "text_encoder": _CLIP_L_TEXT_PARAMS},
        ),
        ArchitectureSpec(
            name="sd21",
            task=TASK_TEXT_TO_IMAGE,
            family="sd",
            components=_files("sd21", _SD_COMPONENTS),
            description="Stable Diffusion 2.1: UNet 866M, OpenCLIP ViT-H text encoder, v-prediction, 768px",
            source="stabilityai/stable-diffusion-2-1",
            published_params={"unet": 865_910_724, "vae": _SD_VAE_PARAMS, "text_encoder": 340_387_840},
        ),
        ArchitectureSpec(
            name="sdxl",
            task=TASK_TEXT_TO_IMAGE,
            family="sdxl",
            components=_files("sdxl", _SDXL_COMPONENTS),
            description="Stable Diffusion XL base 1.0: UNet 2.6B, CLIP ViT-L + OpenCLIP ViT-bigG, 1024px",
            source="stabilityai/stable-diffusion-xl-base-1.0",
            published_params={
                "unet": 2_567_463_684,
                "vae": _SD_VAE_PARAMS,
                "text_encoder": _CLIP_L_TEXT_PARAMS,
                "text_encoder_2": 694_659_840,
            },
        ),
        ArchitectureSpec(
            name="llama2-7b",
            task=TASK_CAUSAL_LM,
            family="llama",
            components=_files("llama2-7b", _LLAMA_COMPONENTS),
            description="Llama 2 7B: 32 layers, hidden 4096, MHA, vocab 32000",
            source="meta-llama/Llama-2-7b-hf",
            published_params={"model": 6_738_415_616},
        ),
        ArchitectureSpec(
            name="llama3-8b",
            task=TASK_CAUSAL_LM,
            family="llama",
            components=_files("llama3-8b", _LLAMA_COMPONENTS),
            description="Llama 3 8B: 32 layers, hidden 4096, GQA (8 KV heads), vocab 128256",
            source="meta-llama/Meta-Llama-3-8B",
            published_params={"model": 8_030_261_248},
        ),
        ArchitectureSpec(
            name="tiny-sd",
            task=TASK_TEXT_TO_IMAGE,
            family="sd",
            components=_files("tiny-sd", _SD_COMPONENTS),
            description="Tiny SD-shaped pipeline for CPU runs (UNet channels 32/64, CLIP hidden 32)",
        ),
        ArchitectureSpec(
            name="tiny-sdxl",
            task=TASK_TEXT_TO_IMAGE,
            family="sdxl",
            components=_files("tiny-sdxl", _SDXL_COMPONENTS),
            description="Tiny SDXL-shaped pipeline for CPU runs (two text encoders, text_time conditioning)",
        ),
        ArchitectureSpec(
            name="tiny-llama",
            task=TASK_CAUSAL_LM,
            family="llama",
            components=_files("tiny-llama", _LLAMA_COMPONENTS),
            description="Tiny Llama for CPU runs (hidden 64, 2 layers, GQA, vocab 1000)",
        ),
    ]
}


def list_architectures() -> list[str]:
    """Names of every architecture, in table order."""
    return list(ARCHITECTURES)


def get_spec(name: str) -> ArchitectureSpec:
    """The spec of architecture `name`; raises `KeyError` naming the choices when it is unknown."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}") from None


def _config_file(name: str, component: str) -> Path:
    spec = get_spec(name)
    if component not in spec.components:
        raise KeyError(f"{name} has no component {component!r}; it has {', '.join(spec.components)}")
    return CONFIG_DIR / spec.components[component]


def load_config(name: str, component: str) -> dict:
    """The published config of one component, as a fresh dict (callers may change it).

    Args:
        name: Architecture name, e.g. `"sdxl"`.
        component: Component name, e.g. `"text_encoder_2"`.

    Returns:
        The JSON config: `_class_name` keys for diffusers classes, `architectures` for transformers ones.
    """
    return json.loads(_config_file(name, component).read_text())


# --- building -------------------------------------------------------------------------------------------------------


def _build_diffusers_model(config: dict) -> nn.Module:
    import diffusers

    diffusers_classes = {
        "UNet2DConditionModel": diffusers.UNet2DConditionModel,
        "AutoencoderKL": diffusers.AutoencoderKL,
    }
    return diffusers_classes[config["_class_name"]].from_config(config)


def _build_transformers_model(config: dict) -> nn.Module:
    import transformers

    # Config class and model class per published `architectures` entry.
    transformers_classes = {
        "CLIPTextModel": (transformers.CLIPTextConfig, transformers.CLIPTextModel),
        "CLIPTextModelWithProjection": (transformers.CLIPTextConfig, transformers.CLIPTextModelWithProjection),
        "LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }
    config_class, model_class = transformers_classes[config["architectures"][0]]
    # The published dtype only says how the checkpoint was saved; build in the default dtype like `from_config`.
    config = {key: value for key, value in config.items() if key != "torch_dtype"}
    return tie_weights_(model_class(config_class.from_dict(config)))


def tie_weights_(model: nn.Module) -> nn.Module:
    """Ties what the model's config ties (a causal LM's `lm_head` to its input embedding with
    `tie_word_embeddings`), in place, and returns the model.

    transformers 5 ties them when loading weights (`from_pretrained`), not when a model is built from its config
    (`from_config`, the class itself), so a model built on the meta device would otherwise hold two embedding
    matrices where the real run holds one: SmolLM2-135M's is 108 MiB in fp32, 14 % of its QLoRA run's peak.
    Models without `tie_weights` (diffusers') are returned unchanged.
    """
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _build_model(config: dict) -> nn.Module:
    if "_class_name" in config:
        return _build_diffusers_model(config)
    return _build_transformers_model(config)


def build_scheduler(name: str):
    """The training noise scheduler: a `DDPMScheduler` over the published scheduler config.

    The published class is the inference sampler (PNDM, DDIM, Euler); training uses DDPM with the same betas and
    prediction type, as the diffusers training scripts do with `DDPMScheduler.from_pretrained(..., "scheduler")`.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(load_config(name, "scheduler"))


def build_on_meta(name: str, component: str):
    """Builds one component with its real architecture and no weight storage.

    Parameters are on the meta device (so the caller decides dtype and device when it materializes them) and
    buffers are real, e.g. CLIP's `position_ids` and Llama's rotary `inv_freq`.

    Args:
        name: Architecture name, e.g. `"sd15"`.
        component: `"unet"`, `"vae"`, `"text_encoder"`, `"text_encoder_2"`, `"model"`; `"scheduler"` and
            `"tokenizer*"` have no parameters and are built for real (see `build_scheduler`, `build_tokenizer`).

    Returns:
        The module (or scheduler / tokenizer).
    """
    from accelerate import init_empty_weights

    if component == "scheduler":
        return build_scheduler(name)
    if component.startswith("tokenizer"):
        return build_tokenizer(name, component)
    config = load_config(name, component)
    with init_empty_weights():
        module = _build_model(config)
    logger.debug("Built %s/%s on meta: %s parameters", name, component, f"{parameter_count(module):,}")
    return module


# --- tokenizers -----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """The 256 printable characters that byte-level BPE uses for the bytes 0..255, in GPT-2 / CLIP vocabulary order.

    Printable bytes keep their own character; the others are shifted to 256 and up (GPT-2's `bytes_to_unicode`).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [byte for byte in range(256) if byte not in printable]
    shifted = [256 + index for index in range(len(unprintable))]
    return tuple(chr(code_point) for code_point in printable + shifted)


def _synthetic_merges(count: int, suffix: str = "") -> list[tuple[str, str]]:
    """`count` BPE merges that each add one byte character to a token: pairs first, then triples, and so on.

    With `suffix` (CLIP's `</w>`), every merge also has an end-of-word twin. No two merges produce the same string,
    so `count` merges add exactly `count` tokens to the vocabulary.
    """
    alphabet = _byte_alphabet()
    merges = []
    prefixes = alphabet
    while True:
        extended = []
        for prefix in prefixes:
            for character in alphabet:
                merges.append((prefix, character))
                extended.append(prefix + character)
                if suffix:
                    merges.append((prefix, character + suffix))
                if len(merges) >= count:
                    return merges[:count]
        prefixes = extended


def _clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout vocabulary: 256 bytes, 256 bytes + `</w>`, synthetic merges, then the two specials last.

    The specials land on the same ids as in the published CLIP vocabulary (49406, 49407 for size 49408), and `!`,
    SD 2.x's pad token, on id 0.
    """
    alphabet = _byte_alphabet()
    tokens = list(alphabet) + [character + "</w>" for character in alphabet]
    merges = _synthetic_merges(vocab_size - len(tokens) - 2, suffix="</w>")
    tokens += [first + second for first, second in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _clip_tokenizer(config: dict, vocab_size: int):
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab(vocab_size)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        pad_token=config["pad_token"],
        unk_token=config["unk_token"],
        model_max_length=config["model_max_length"],
    )


def _llama_special_tokens(config: dict, vocab_size: int) -> dict[str, int]:
    """Special tokens on their published ids: Llama 2 puts them first, Llama 3 after its 128000 regular tokens."""
    # SentencePiece vocabularies (Llama 2) have an unk token and start with it; tiktoken ones (Llama 3) have none.
    if config.get("unk_token"):
        return {config["unk_token"]: 0, config["bos_token"]: 1, config["eos_token"]: 2}
    num_regular = vocab_size - 256
    specials = {config["bos_token"]: num_regular, config["eos_token"]: num_regular + 1}
    for index in range(num_regular + 2, vocab_size):
        specials[f"<|reserved_special_token_{index - num_regular - 2}|>"] = index
    return specials


def _llama_tokenizer(config: dict, vocab_size: int):
    """Byte-level BPE with synthetic merges up to `vocab_size`; bos prepended as the published tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = _llama_special_tokens(config, vocab_size)
    special_ids = set(specials.values())
    regular_ids = [index for index in range(vocab_size) if index not in special_ids]
    merges = _synthetic_merges(len(regular_ids) - 256)
    regular_tokens = list(_byte_alphabet()) + [first + second for first, second in merges]
    vocab = dict(zip(regular_tokens, regular_ids)) | specials

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=config.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos = config["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=config["eos_token"],
        unk_token=config.get("unk_token"),
        pad_token=config.get("pad_token"),
        model_max_length=config["model_max_length"],
    )


def _encoder_of(spec: ArchitectureSpec, tokenizer_component: str) -> str:
    """The component whose embedding the tokenizer's ids index: `tokenizer_2` -> `text_encoder_2`, Llama `model`."""
    text_encoder = tokenizer_component.replace("tokenizer", "text_encoder")
    return text_encoder if text_encoder in spec.components else "model"


def build_tokenizer(name: str, component: str = "tokenizer"):
    """A tokenizer usable offline whose ids are valid for the architecture's embedding.

    The vocabulary is synthetic (byte-level BPE, see `_synthetic_merges`) but has exactly the encoder's `vocab_size`,
    the published special tokens on their published ids, and the published `model_max_length` (77 for CLIP). Only
    ids, padding and lengths matter for memory. It is built in memory: nothing is written or downloaded.

    Args:
        name: Architecture name.
        component: `"tokenizer"` or, for SDXL, `"tokenizer_2"`.

    Returns:
        A `CLIPTokenizer` for the text-to-image architectures, a `PreTrainedTokenizerFast` for Llama.
    """
    spec = get_spec(name)
    config = load_config(name, component)
    vocab_size = load_config(name, _encoder_of(spec, component))["vocab_size"]
    if config["tokenizer_class"] == "CLIPTokenizer":
        return _clip_tokenizer(config, vocab_size)
    return _llama_tokenizer(config, vocab_size)


# --- counting -------------------------------------------------------------------------------------------------------


def parameter_count(module: nn.Module) -> int:
    """Number of parameters, each shared (tied) parameter once; works on meta modules."""
    return sum(parameter.numel() for parameter in module.parameters())


def parameters_by_layer_type(module: nn.Module) -> dict[str, int]:
    """Parameter counts split into `"linear"` (`nn.Linear`), `"conv"` (`nn.Conv*`) and `"other"` (norms, embeddings).

    This is the split that decides what LoRA (linear only) and LoCon / LoKr on convolutions can adapt, and what
    bitsandbytes (linear only) can quantize.
    """
    split = {"linear": 0, "conv": 0, "other": 0}
    for submodule in module.modules():
        own = sum(parameter.numel() for parameter in submodule.parameters(recurse=False))
        if isinstance(submodule, nn.Linear):
            split["linear"] += own
        elif isinstance(submodule, nn.modules.conv._ConvNd):
            split["conv"] += own
        else:
            split["other"] += own
    return split


@functools.cache
def _component_parameter_count(name: str, component: str) -> int:
    return parameter_count(build_on_meta(name, component))


def component_bytes(name: str, component: str, dtype: torch.dtype) -> int:
    """Bytes of one component's parameters stored in `dtype` (buffers, a few KB of ids and frequencies, excluded).

    Args:
        name: Architecture name.
        component: A component with parameters (see `ArchitectureSpec.model_components`).
        dtype: Storage dtype, e.g. `torch.bfloat16`.
    """
    return _component_parameter_count(name, component) * dtype.itemsize


# --- table ----------------------------------------------------------------------------------------------------------


def architecture_table() -> str:
    """A Markdown table: every architecture, component, class and parameter count, with bf16 sizes."""
    rows = ["| architecture | component | class | parameters | published | bf16 GiB |", "|---|---|---|---:|---:|---:|"]
    for spec in ARCHITECTURES.values():
        total = 0
        for component in spec.model_components:
            config = load_config(spec.name, component)
            class_name = config.get("_class_name") or config["architectures"][0]
            count = _component_parameter_count(spec.name, component)
            total += count
            published = spec.published_params.get(component)
            published_cell = f"{published:,}" if published else "-"
            gib = component_bytes(spec.name, component, torch.bfloat16) / 1024**3
            rows.append(f"| {spec.name} | {component} | {class_name} | {count:,} | {published_cell} | {gib:.3f} |")
        total_gib = total * torch.bfloat16.itemsize / 1024**3
        rows.append(f"| {spec.name} | **total** | | {total:,} | | {total_gib:.3f} |")
    return "\n".join(rows)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    print(architecture_table())


if __name__ == "__main__":
    main()
