"""Tiny random-weight models and data sets for tests, demos and CPU profiling, written offline in a few seconds.

`python -m diffusers_lowmem.tiny OUT_DIR` writes, deterministically for a seed:

- `OUT_DIR/sd`: a Stable Diffusion pipeline (`StableDiffusionPipeline.from_pretrained` loads it),
- `OUT_DIR/sdxl`: a Stable Diffusion XL pipeline (`StableDiffusionXLPipeline.from_pretrained`),
- `OUT_DIR/llama` and `OUT_DIR/gpt2`: causal language models with their tokenizers (`AutoModelForCausalLM`,
  `AutoTokenizer`),
- `OUT_DIR/images`: an `imagefolder` data set of coloured shapes whose captions name the colour and shape,
- `OUT_DIR/text`: `train.txt` and `validation.txt`, sentences from a small template grammar.

Nothing is downloaded: the tokenizers' vocabularies and merges are learned here from the word lists below. The
`TINY_*` dicts hold the architectures so other code (the memory profiler) can build the same models; copy one before
changing it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

ARTIFACTS = ("sd", "sdxl", "llama", "gpt2", "images", "text")

# Training and inference resolution of both tiny pipelines: the VAE downsamples once (32 px -> 16x16 latents) and the
# UNet once more inside (16 -> 8), so a 32 px training step costs a few milliseconds on a CPU.
TINY_IMAGE_RESOLUTION = 32
TINY_VAE_SCALE_FACTOR = 2
TINY_LATENT_SIZE = TINY_IMAGE_RESOLUTION // TINY_VAE_SCALE_FACTOR

# --------------------------------------------------------------------------------------------------------------------
# Words shared by the captions, the text corpus and both tokenizers' merges, so every word is one token.
# --------------------------------------------------------------------------------------------------------------------

SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")

_ADJECTIVES = ("small", "big", "old", "young", "happy", "quiet")
_ANIMALS = ("cat", "dog", "bird", "fish", "horse", "mouse")
_VERBS = ("sees", "likes", "chases", "finds", "wants")
_OBJECTS = ("ball", "cup", "hat", "book", "pen", "kite")
_NAMES = ("anna", "ben", "carl", "dora", "emma", "finn")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_PLACES = ("park", "shop", "school", "garden", "market")
_FOODS = ("bread", "cake", "apples", "cheese", "milk")
_FUNCTION_WORDS = (
    "the", "a", "and", "has", "is", "drawn", "on", "black", "background", "went", "to", "bought", "some", "photo", "of",
)  # fmt: skip

# Plural forms the grammar writes ("anna has three red balls.") count as words of their own.
VOCABULARY_WORDS = tuple(
    dict.fromkeys(
        (*SHAPE_COLOURS, *SHAPES, *_ADJECTIVES, *_ANIMALS, *_VERBS, *_OBJECTS, *(f"{o}s" for o in _OBJECTS),
         *_NAMES, *_NUMBERS, *_PLACES, *_FOODS, *_FUNCTION_WORDS)
    )
)  # fmt: skip

CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
CLIP_MAX_LENGTH = 77
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
GPT2_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")
LM_MAX_LENGTH = 256

# --------------------------------------------------------------------------------------------------------------------
# Byte-pair encoding, learned here so that no tokenizer has to be downloaded.
# --------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE table of GPT-2 and CLIP: every byte maps to a printable unicode character.

    Returns:
        A dict from each of the 256 byte values to its character, printable ASCII and Latin-1 bytes first.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values = list(printable)
    code_points = list(printable)
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(256 + len(code_points) - len(printable))
    return dict(zip(byte_values, map(chr, code_points)))


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def learn_bpe_merges(word_counts: dict[tuple[str, ...], int]) -> list[tuple[str, str]]:
    """Learns byte-pair merges until every word is a single symbol.

    Args:
        word_counts: Each word as its initial symbols (byte characters), with how often it occurs.

    Returns:
        The merges in the order learned, which is their rank. Ties go to the lexicographically smallest pair, so the
        result depends on nothing but `word_counts`.
    """
    words = dict(word_counts)
    merges = []
    while True:
        pair_counts = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            return merges
        best_pair = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best_pair)
        words = {_merge_pair(symbols, best_pair): count for symbols, count in words.items()}


def _byte_symbols(text: str) -> tuple[str, ...]:
    byte_to_char = bytes_to_unicode()
    return tuple(byte_to_char[byte] for byte in text.encode("utf-8"))


@lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    # CLIP marks the last symbol of a word with `</w>` instead of marking spaces.
    word_counts = {}
    for word in VOCABULARY_WORDS:
        symbols = _byte_symbols(word)
        word_counts[(*symbols[:-1], symbols[-1] + "</w>")] = 1
    return tuple(learn_bpe_merges(word_counts))


@lru_cache(maxsize=1)
def _byte_level_merges() -> tuple[tuple[str, str], ...]:
    # GPT-2 style pre-tokenization keeps the space in front of a word ("Ġcat"); a line's first word has none. The
    # spaced form counts twice so that shared pieces merge before word-specific ones.
    word_counts = {}
    for word in VOCABULARY_WORDS:
        word_counts[_byte_symbols(" " + word)] = 2
        word_counts[_byte_symbols(word)] = 1
    return tuple(learn_bpe_merges(word_counts))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of the tiny CLIP tokenizer, laid out as in OpenAI's CLIP files.

    Returns:
        `(vocab, merges)`: the 256 byte characters, the same with `</w>`, one token per merge, then
        `<|startoftext|>` and `<|endoftext|>`; and the merges as `(left, right)` pairs, in rank order.
    """
    byte_chars = list(bytes_to_unicode().values())
    merges = _clip_merges()
    tokens = [*byte_chars, *(char + "</w>" for char in byte_chars), *("".join(pair) for pair in merges)]
    tokens.extend(CLIP_SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}, list(merges)


def byte_level_vocab_and_merges(special_tokens: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of the tiny byte-level BPE tokenizers of the causal language models.

    Args:
        special_tokens: Tokens that take the first ids, in order.

    Returns:
        `(vocab, merges)`: the special tokens, the 256 byte characters and one token per merge; and the merges as
        `(left, right)` pairs, in rank order.
    """
    merges = _byte_level_merges()
    tokens = [*special_tokens, *bytes_to_unicode().values(), *("".join(pair) for pair in merges)]
    return {token: index for index, token in enumerate(tokens)}, list(merges)


def write_clip_tokenizer_files(tokenizer_dir: str | Path) -> Path:
    """Writes `vocab.json` and `merges.txt` of the tiny CLIP tokenizer, the files `CLIPTokenizer` reads.

    Args:
        tokenizer_dir: Folder to write into; created if missing.

    Returns:
        The folder.
    """
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (tokenizer_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    return tokenizer_dir


def build_clip_tokenizer():
    """Builds the tiny `CLIPTokenizer` (77 tokens long, padded with `<|endoftext|>` as in Stable Diffusion 1.x).

    Returns:
        A `transformers.CLIPTokenizer`.
    """
    from transformers import CLIPTokenizer

    # Loading from the written files works with every `transformers` version, whichever class backs `CLIPTokenizer`.
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        return CLIPTokenizer.from_pretrained(
            write_clip_tokenizer_files(tokenizer_dir), model_max_length=CLIP_MAX_LENGTH
        )


def build_byte_level_tokenizer(family: str):
    """Builds the tiny byte-level BPE tokenizer of a causal language model family.

    Both follow their family: Llama's prepends `<s>` and has `<unk>`, `<s>`, `</s>` and `<pad>`; GPT-2's adds
    nothing and uses `<|endoftext|>` as its begin, end and unknown token, plus `<pad>`.

    Args:
        family: `"llama"` or `"gpt2"`.

    Returns:
        A `transformers.PreTrainedTokenizerFast` that `AutoTokenizer` loads back once saved.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        special_tokens = LLAMA_SPECIAL_TOKENS
        unk_token, bos_token, eos_token, pad_token = LLAMA_SPECIAL_TOKENS
    elif family == "gpt2":
        special_tokens = GPT2_SPECIAL_TOKENS
        unk_token = bos_token = eos_token = GPT2_SPECIAL_TOKENS[0]
        pad_token = GPT2_SPECIAL_TOKENS[1]
    else:
        raise ValueError(f"Unknown tokenizer family {family!r}; expected 'llama' or 'gpt2'.")

    vocab, merges = byte_level_vocab_and_merges(special_tokens)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    if family == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, vocab[bos_token])],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        unk_token=unk_token,
        pad_token=pad_token,
        model_max_length=LM_MAX_LENGTH,
    )


# Vocabulary sizes of the tokenizers above; learning the merges takes milliseconds, so they are computed, never stale.
CLIP_VOCAB_SIZE = len(clip_vocab_and_merges()[0])
LLAMA_VOCAB_SIZE = len(byte_level_vocab_and_merges(LLAMA_SPECIAL_TOKENS)[0])
GPT2_VOCAB_SIZE = len(byte_level_vocab_and_merges(GPT2_SPECIAL_TOKENS)[0])

# --------------------------------------------------------------------------------------------------------------------
# Architectures.
# --------------------------------------------------------------------------------------------------------------------

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": TINY_IMAGE_RESOLUTION,
    # `write_tiny_sd` / `write_tiny_sdxl` replace this by 1 / std of the latents of the shape images.
    "scaling_factor": 0.18215,
}

TINY_UNET_CONFIG = {
    "sample_size": TINY_LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

TINY_CLIP_TEXT_CONFIG = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    # As in CLIP, the special tokens are the last two ids and the padding token is the end token.
    "bos_token_id": CLIP_VOCAB_SIZE - 2,
    "eos_token_id": CLIP_VOCAB_SIZE - 1,
    "pad_token_id": CLIP_VOCAB_SIZE - 1,
}

# Stable Diffusion XL's second text encoder: its pooled, projected output conditions the UNet too.
TINY_CLIP_TEXT_PROJECTION_CONFIG = {**TINY_CLIP_TEXT_CONFIG, "projection_dim": 32}

_SDXL_TIME_EMBED_DIM = 8

TINY_SDXL_UNET_CONFIG = {
    "sample_size": TINY_LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    # Like SDXL, the highest resolution block has no attention.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 8,
    # The penultimate hidden states of both text encoders, concatenated.
    "cross_attention_dim": TINY_CLIP_TEXT_CONFIG["hidden_size"] + TINY_CLIP_TEXT_PROJECTION_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
    # Six time ids (original size, crop corner, target size) plus the pooled text embedding.
    "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM
    + TINY_CLIP_TEXT_PROJECTION_CONFIG["projection_dim"],
}

TINY_SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

TINY_SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
}

TINY_LLAMA_CONFIG = {
    "vocab_size": LLAMA_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": LM_MAX_LENGTH,
    "tie_word_embeddings": False,
    "unk_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}

TINY_GPT2_CONFIG = {
    "vocab_size": GPT2_VOCAB_SIZE,
    "n_positions": LM_MAX_LENGTH,
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}

# --------------------------------------------------------------------------------------------------------------------
# Data: coloured shapes with captions, and a text corpus.
# --------------------------------------------------------------------------------------------------------------------


def shape_caption(index: int) -> tuple[str, str]:
    """The colour and shape of image `index`: colours and shapes cycle so that 8 images hold every colour twice.

    Args:
        index: Position of the image in the folder.

    Returns:
        `(colour, shape)`, keys of `SHAPE_COLOURS` and members of `SHAPES`.
    """
    colours = list(SHAPE_COLOURS)
    return colours[index % len(colours)], SHAPES[index % len(SHAPES)]


def draw_shape(colour: str, shape: str, size: int, rng):
    """Draws a filled shape of a caption's colour on a near-black background, with small random jitter.

    Position, size, colour and background each vary a little, so the caption, not one fixed image, determines
    what is drawn.

    Args:
        colour: A key of `SHAPE_COLOURS`.
        shape: One of `SHAPES`.
        size: Width and height in pixels.
        rng: A `numpy.random.Generator`.

    Returns:
        An RGB `PIL.Image.Image`.
    """
    from PIL import Image, ImageDraw

    background = int(rng.integers(0, 25))
    image = Image.new("RGB", (size, size), (background,) * 3)
    fill = tuple(int(channel) for channel in (rng.integers(-12, 13, size=3) + SHAPE_COLOURS[colour]).clip(0, 255))
    half_extent = size * rng.uniform(0.25, 0.34)
    centre_x, centre_y = size / 2 + rng.uniform(-size / 10, size / 10, size=2)
    box = (centre_x - half_extent, centre_y - half_extent, centre_x + half_extent, centre_y + half_extent)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (centre_x, box[1])], fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    return image


def shape_images(num_images: int, size: int = TINY_IMAGE_RESOLUTION, seed: int = 0) -> list[tuple[object, str]]:
    """Draws the shape images of the tiny image folder in memory.

    Args:
        num_images: How many images.
        size: Width and height in pixels.
        seed: Seed of the jitter.

    Returns:
        `(image, caption)` pairs; captions read like "a red circle".
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(num_images):
        colour, shape = shape_caption(index)
        pairs.append((draw_shape(colour, shape, size, rng), f"a {colour} {shape}"))
    return pairs


def write_image_caption_folder(out_dir: str | Path, num_images: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Writes an `imagefolder` data set: PNG images of coloured shapes and a `metadata.jsonl` of their captions.

    `datasets.load_dataset("imagefolder", data_dir=out_dir)` loads it with the columns `image` and `text`. PNGs and
    the metadata left over from an earlier call are removed first, so the folder holds exactly `num_images` rows.

    Args:
        out_dir: Folder to write into; created if missing.
        num_images: How many images.
        size: Width and height of each image in pixels.
        seed: Seed of the jitter of position, size and colour.

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.png"), out_dir / "metadata.jsonl"]:
        stale.unlink(missing_ok=True)
    rows = []
    for index, (image, caption) in enumerate(shape_images(num_images, size=size, seed=seed)):
        file_name = f"{index:04d}.png"
        image.save(out_dir / file_name)
        rows.append(json.dumps({"file_name": file_name, "text": caption}))
    (out_dir / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out_dir


def _counting_sentence(rng: random.Random) -> str:
    start = rng.randrange(len(_NUMBERS) - 3)
    return " ".join(_NUMBERS[start : start + 4]) + "."


_SENTENCE_TEMPLATES = (
    lambda rng: (
        f"the {rng.choice(_ADJECTIVES)} {rng.choice(_ANIMALS)} {rng.choice(_VERBS)} the "
        f"{rng.choice(list(SHAPE_COLOURS))} {rng.choice(_OBJECTS)}."
    ),
    lambda rng: (
        f"{rng.choice(_NAMES)} has {rng.choice(_NUMBERS[1:])} {rng.choice(list(SHAPE_COLOURS))} "
        f"{rng.choice(_OBJECTS)}s."
    ),
    _counting_sentence,
    lambda rng: f"a {rng.choice(list(SHAPE_COLOURS))} {rng.choice(SHAPES)} is drawn on a black background.",
    lambda rng: f"{rng.choice(_NAMES)} went to the {rng.choice(_PLACES)} and bought some {rng.choice(_FOODS)}.",
)


def generate_sentences(num_sentences: int, rng: random.Random) -> list[str]:
    """Generates sentences of the tiny template grammar: fixed frames with a few words to choose per slot.

    Args:
        num_sentences: How many sentences.
        rng: Source of the choices.

    Returns:
        Lower-case sentences ending in a full stop.
    """
    return [rng.choice(_SENTENCE_TEMPLATES)(rng) for _ in range(num_sentences)]


def write_text_corpus(
    out_dir: str | Path, seed: int = 0, num_train_lines: int = 600, num_validation_lines: int = 100
) -> Path:
    """Writes `train.txt` and `validation.txt`, one sentence of the template grammar per line.

    The grammar is small and repetitive, so a tiny language model lowers its validation perplexity within a few dozen
    steps.

    Args:
        out_dir: Folder to write into; created if missing.
        seed: Seed of the sentence choices.
        num_train_lines: Sentences in `train.txt`.
        num_validation_lines: Sentences in `validation.txt`.

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for file_name, num_lines in (("train.txt", num_train_lines), ("validation.txt", num_validation_lines)):
        (out_dir / file_name).write_text("\n".join(generate_sentences(num_lines, rng)) + "\n", encoding="utf-8")
    return out_dir


# --------------------------------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def build_tiny_vae(seed: int = 0):
    """Builds the tiny `AutoencoderKL`, made near-deterministic and its latents centred and scaled like a trained one.

    A random encoder predicts a log-variance near 0, so its latent samples would be mostly noise, and an arbitrary
    mean; a trained VAE's variance is tiny and its latents roughly centred. So the log-variance half of `quant_conv`
    is set to a constant -20 (standard deviation 5e-5), its mean half is shifted so that each latent channel of the
    shape images averages 0, and `scaling_factor` becomes 1 / their standard deviation, which is how Stable
    Diffusion's 0.18215 was chosen.

    Args:
        seed: Seed of the random weights.

    Returns:
        An `AutoencoderKL` in eval mode.
    """
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    _seed_everything(seed)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    latent_channels = TINY_VAE_CONFIG["latent_channels"]
    every_caption = len(SHAPE_COLOURS) * len(SHAPES)
    images = [np.asarray(image, dtype=np.float32) for image, _ in shape_images(every_caption, seed=seed)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:] = 0.0
        vae.quant_conv.bias[latent_channels:] = -20.0
        latent_means = vae.encode(pixels).latent_dist.mean
        # Rounded, so that the float noise of another thread count or CPU cannot change the bytes written.
        channel_means = latent_means.mean(dim=(0, 2, 3)).round(decimals=3)
        vae.quant_conv.bias[:latent_channels] -= channel_means
        latent_std = (latent_means - channel_means[None, :, None, None]).std().item()
    vae.register_to_config(scaling_factor=float(f"{1.0 / latent_std:.4g}"))
    return vae.eval()


def build_tiny_sd_pipeline(seed: int = 0):
    """Builds the tiny Stable Diffusion pipeline in memory (random weights, no safety checker).

    Args:
        seed: Seed of the random weights.

    Returns:
        A `StableDiffusionPipeline` for `TINY_IMAGE_RESOLUTION` px images.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = build_tiny_vae(seed)
    _seed_everything(seed + 1)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    _seed_everything(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=build_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDPMScheduler(**TINY_SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0):
    """Builds the tiny Stable Diffusion XL pipeline in memory (random weights, two text encoders, no watermarker).

    Args:
        seed: Seed of the random weights.

    Returns:
        A `StableDiffusionXLPipeline` for `TINY_IMAGE_RESOLUTION` px images.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vae = build_tiny_vae(seed)
    _seed_everything(seed + 1)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    _seed_everything(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG))
    _seed_everything(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_TEXT_PROJECTION_CONFIG))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**TINY_SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def _save_pipeline(pipeline, out_dir: str | Path, tokenizer_subfolders: Iterable[str]) -> Path:
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    # `save_pretrained` writes only `tokenizer.json`; the classic CLIP files let older loaders read it too.
    for subfolder in tokenizer_subfolders:
        write_clip_tokenizer_files(out_dir / subfolder)
    return out_dir


def write_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the tiny Stable Diffusion pipeline so that `StableDiffusionPipeline.from_pretrained(out_dir)` loads it.

    Args:
        out_dir: Folder of the pipeline (`model_index.json`, `unet/`, `vae/`, ...); created if missing.
        seed: Seed of the random weights; the same seed writes the same bytes.

    Returns:
        The folder.
    """
    return _save_pipeline(build_tiny_sd_pipeline(seed), out_dir, ["tokenizer"])


def write_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the tiny Stable Diffusion XL pipeline so that `StableDiffusionXLPipeline.from_pretrained` loads it.

    Args:
        out_dir: Folder of the pipeline; created if missing.
        seed: Seed of the random weights; the same seed writes the same bytes.

    Returns:
        The folder.
    """
    return _save_pipeline(build_tiny_sdxl_pipeline(seed), out_dir, ["tokenizer", "tokenizer_2"])


def _write_causal_lm(model, tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(seed: int = 0):
    """Builds the tiny `LlamaForCausalLM` (grouped-query attention: 4 heads share 2 key/value heads).

    Args:
        seed: Seed of the random weights.

    Returns:
        `(model, tokenizer)`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_byte_level_tokenizer("llama")
    _seed_everything(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA_CONFIG))
    return model.eval(), tokenizer


def build_tiny_gpt2(seed: int = 0):
    """Builds the tiny `GPT2LMHeadModel` (fused `Conv1D` projections, tied input and output embeddings).

    Args:
        seed: Seed of the random weights.

    Returns:
        `(model, tokenizer)`.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_byte_level_tokenizer("gpt2")
    _seed_everything(seed)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2_CONFIG))
    return model.eval(), tokenizer


def write_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the tiny Llama model and its tokenizer (`AutoModelForCausalLM` / `AutoTokenizer` load them offline).

    Args:
        out_dir: Folder to write into; created if missing.
        seed: Seed of the random weights; the same seed writes the same bytes.

    Returns:
        The folder.
    """
    return _write_causal_lm(*build_tiny_llama(seed), out_dir)


def write_tiny_gpt2(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the tiny GPT-2 model and its tokenizer (`AutoModelForCausalLM` / `AutoTokenizer` load them offline).

    Args:
        out_dir: Folder to write into; created if missing.
        seed: Seed of the random weights; the same seed writes the same bytes.

    Returns:
        The folder.
    """
    return _write_causal_lm(*build_tiny_gpt2(seed), out_dir)


# --------------------------------------------------------------------------------------------------------------------
# Everything at once.
# --------------------------------------------------------------------------------------------------------------------


def write_all(
    out_dir: str | Path, only: Iterable[str] | None = None, seed: int = 0, num_images: int = 8
) -> dict[str, Path]:
    """Writes the tiny artifacts into subfolders of `out_dir` named after them.

    Args:
        out_dir: Parent folder; created if missing.
        only: Names among `ARTIFACTS` ("sd", "sdxl", "llama", "gpt2", "images", "text") to write; all when None.
        seed: Seed of every random choice; the same seed writes the same bytes.
        num_images: Images in the image folder.

    Returns:
        A dict from each name written to its folder.
    """
    names = list(ARTIFACTS if only is None else only)
    unknown = sorted(set(names) - set(ARTIFACTS))
    if unknown:
        raise ValueError(f"Unknown tiny artifacts {unknown}; choose among {list(ARTIFACTS)}.")
    writers = {
        "sd": lambda path: write_tiny_sd(path, seed=seed),
        "sdxl": lambda path: write_tiny_sdxl(path, seed=seed),
        "llama": lambda path: write_tiny_llama(path, seed=seed),
        "gpt2": lambda path: write_tiny_gpt2(path, seed=seed),
        "images": lambda path: write_image_caption_folder(path, num_images=num_images, seed=seed),
        "text": lambda path: write_text_corpus(path, seed=seed),
    }
    out_dir = Path(out_dir)
    written = {}
    for name in ARTIFACTS:
        if name in names:
            started = time.perf_counter()
            written[name] = writers[name](out_dir / name)
            logger.info("Wrote tiny %s to %s in %.2f s.", name, written[name], time.perf_counter() - started)
    return written


def _parse_only(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ARTIFACTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown artifacts {unknown}; choose among {','.join(ARTIFACTS)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line of `python -m diffusers_lowmem.tiny`.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_lowmem.tiny",
        description="Write tiny random-weight pipelines, language models and data sets for offline tests and demos.",
    )
    parser.add_argument("out_dir", type=Path, help="Folder to write into; each artifact goes to a subfolder.")
    parser.add_argument(
        "--only",
        type=_parse_only,
        default=None,
        help=f"Comma-separated artifacts to write, among {','.join(ARTIFACTS)} (default: all).",
    )
    parser.add_argument("--num_images", type=int, default=8, help="Images in the image folder (default: 8).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights and data (default: 0).")
    return parser.parse_args(argv)


def cli(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Entry point of `python -m diffusers_lowmem.tiny` and `diffusers-lowmem-tiny`.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        A dict from each artifact written to its folder.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    written = write_all(args.out_dir, only=args.only, seed=args.seed, num_images=args.num_images)
    for name, path in written.items():
        print(f"{name}\t{path}")
    logger.info("Wrote %d tiny artifacts in %.2f s.", len(written), time.perf_counter() - started)
    return written


if __name__ == "__main__":
    cli()
