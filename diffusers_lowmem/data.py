"""Datasets of both trainers: image-caption pairs for text-to-image, grouped token blocks for causal language models.

The image side mirrors the preprocessing of diffusers' `train_text_to_image_lora.py` (and the size and crop
conditioning of `train_text_to_image_lora_sdxl.py`) with PIL and torch only: torchvision's `Resize`, `CenterCrop`,
`RandomCrop`, `RandomHorizontalFlip`, `ToTensor` and `Normalize` are re-implemented here with the same arithmetic and
the same draws from the global torch RNG, so a seed gives the crops and flips the upstream script would give.
Wherever an image is decoded (training, the held-out loss, latent caching, the up-front readability check), it goes
through `load_rgb_image` / `to_rgb`: turned upright by its EXIF orientation, transparent pixels composited on white
(`TRANSPARENT_BACKGROUND`), 16-bit and floating-point samples scaled to 8 bits, every Pillow mode made RGB.

The text side mirrors transformers' `run_clm_no_trainer.py`: load, tokenize, concatenate, cut into blocks.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from itertools import chain

import datasets
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers import default_data_collator

# A component, not a recipe: it must also work where no `Accelerator` exists (accelerate's logger raises there).
logger = logging.getLogger(__name__)

# The lower-case names of torchvision's `InterpolationMode`, as upstream's `--image_interpolation_mode` choices,
# mapped to the PIL filter torchvision itself applies to PIL images.
IMAGE_INTERPOLATION_MODES = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
}

TEXT_FILE_LOADERS = {"txt": "text", "csv": "csv", "json": "json", "jsonl": "json"}

# The one flat colour transparent pixels of every image are composited on (`to_rgb`): white, as image viewers show.
TRANSPARENT_BACKGROUND = (255, 255, 255)

# How many corrupt image names one warning lists before it only counts.
_MAX_NAMED_CORRUPT_IMAGES = 20

# --------------------------------------------------------------------------------------------------------------------
# Image-caption data.
# --------------------------------------------------------------------------------------------------------------------


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    names = ("dataset_dict.json", "state.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in names)


def _train_split(loaded, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" not in loaded:
        raise ValueError(f"{source} has no 'train' split; its splits are: {', '.join(loaded.keys())}")
    return loaded["train"]


def _check_column(flag: str, column: str, column_names: Sequence[str], hint: str = "") -> None:
    if column not in column_names:
        columns = ", ".join(column_names)
        raise ValueError(f"--{flag} '{column}' is not a column of the dataset; its columns are: {columns}.{hint}")


def load_image_caption_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
) -> datasets.Dataset:
    """Loads the train split of an image-caption dataset, as upstream's `train_text_to_image_lora.py` does.

    Args:
        dataset_name: A hub dataset name, a local dataset path `load_dataset` understands, or a folder written by
            `save_to_disk`. Takes precedence over `train_data_dir`, which is then passed to `load_dataset` as
            `data_dir`.
        dataset_config_name: The dataset's configuration, if it has several.
        train_data_dir: A folder of images with a `metadata.jsonl` (or `.csv`) of captions, loaded as `imagefolder`.
        cache_dir: Where `datasets` caches downloads and Arrow files.
        image_column: Column holding the images.
        caption_column: Column holding the captions (strings, or lists of strings to pick from).

    Returns:
        The train split.

    Raises:
        ValueError: Neither source is given, there is no train split, or a column is missing; the message lists the
            columns there are.
    """
    if dataset_name is not None:
        if _is_saved_dataset(str(dataset_name)):
            loaded = datasets.load_from_disk(str(dataset_name))
        else:
            loaded = datasets.load_dataset(
                str(dataset_name), dataset_config_name, cache_dir=cache_dir, data_dir=train_data_dir
            )
        dataset = _train_split(loaded, dataset_name)
    elif train_data_dir is not None:
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(train_data_dir), cache_dir=cache_dir)
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            # pyarrow refuses a metadata.jsonl whose captions change type ("changed from string to number in row
            # 2", counting rows from 0 and naming no file): name the file and line instead.
            mismatch = _mismatched_caption_line(str(train_data_dir), caption_column)
            if mismatch is None:
                raise ValueError(f"Cannot read the image folder {train_data_dir}: {error}") from error
            raise ValueError(
                f"Cannot read the captions of {train_data_dir}: {mismatch}. Every line of metadata.jsonl needs"
                f' "{caption_column}" as a string (or, on every line, a list of strings).'
            ) from error
        dataset = _train_split(loaded, train_data_dir)
    else:
        raise ValueError("Give a dataset: --dataset_name (hub name or local path) or --train_data_dir (image folder).")

    hint = ""
    if dataset_name is None:
        hint = (
            f" An image folder takes its captions from {train_data_dir}/metadata.jsonl, one line per image:"
            ' {"file_name": "0001.png", "text": "a caption"}.'
        )
    _check_column("image_column", image_column, dataset.column_names)
    _check_column("caption_column", caption_column, dataset.column_names, hint)
    return dataset


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object", type(None): "null"}.get(type(value), "a value")


def _mismatched_caption_line(train_data_dir: str, caption_column: str) -> str | None:
    """`"<file> line N: "text" is a number (5) where line 1 has a string"` for the first line of an image folder's
    metadata.jsonl whose caption is of another JSON type than the first line's (nulls aside), or None."""
    for root, _, files in sorted(os.walk(train_data_dir)):
        if "metadata.jsonl" not in files:
            continue
        path = os.path.join(root, "metadata.jsonl")
        first_kind = None
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    row = json.loads(line)
                except ValueError:
                    if line.strip():
                        return f"{path} line {number} is not JSON: {line.strip()[:60]!r}"
                    continue
                if not isinstance(row, dict) or row.get(caption_column) is None:
                    continue
                kind = _json_kind(row[caption_column])
                if first_kind is None:
                    first_kind, first_number = kind, number
                elif kind != first_kind:
                    value = json.dumps(row[caption_column])[:40]
                    return (
                        f'{path} line {number}: "{caption_column}" is {kind} ({value}) where line {first_number} has'
                        f" {first_kind}"
                    )
    return None


def interpolation_from_name(name: str) -> Image.Resampling:
    """The PIL resampling filter torchvision uses for an `InterpolationMode` name.

    Args:
        name: One of `IMAGE_INTERPOLATION_MODES` (case-insensitive), e.g. "lanczos".

    Returns:
        A `PIL.Image.Resampling` member.

    Raises:
        ValueError: Unknown name; the message lists the known ones.
    """
    try:
        return IMAGE_INTERPOLATION_MODES[name.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown image interpolation mode '{name}'; choose one of: {', '.join(IMAGE_INTERPOLATION_MODES)}"
        ) from None


def _resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    # torchvision's `Resize(int)`: the shorter side becomes `resolution`, the longer one is scaled and truncated.
    short_side, long_side = (width, height) if width <= height else (height, width)
    new_short, new_long = resolution, int(resolution * long_side / short_side)
    return (new_long, new_short) if width <= height else (new_short, new_long)


# Modes whose samples have more than 8 bits, as Pillow decodes 16-bit PNG/PGM/TIFF (`I;16*`, older Pillow `I`) and
# 32-bit integer or floating-point TIFF (`I`, `F`) files.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FLOAT_MODES = ("F",)
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def _has_alpha(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    """An `I;16*`/`I` or `F` image as 8-bit grayscale (`L`, or `LA` when a `transparency` key marks pixels).

    Integer samples are 16-bit: 0..65535 maps linearly to 0..255 (values outside are clipped). Float samples are in
    [0, 1], the convention of floating-point TIFF; outside is clipped, NaN is black.
    """
    samples = np.asarray(image)
    if image.mode in _FLOAT_MODES:
        scaled = np.nan_to_num(samples.astype(np.float64), nan=0.0).clip(0.0, 1.0) * 255.0
    else:
        scaled = samples.astype(np.float64).clip(0, 65535) * (255.0 / 65535.0)
    gray = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = Image.fromarray(np.where(samples == key, 0, 255).astype(np.uint8), mode="L")
        return Image.merge("LA", (gray, alpha))
    return gray


def to_rgb(image: Image.Image, background: tuple[int, int, int] = TRANSPARENT_BACKGROUND) -> Image.Image:
    """The RGB picture a person sees, from a PIL image of any mode a folder of images holds.

    - EXIF orientation is applied (the image is turned upright) and removed.
    - `1`, `L`, `P`, `RGB`, `RGBX`, `YCbCr`, `CMYK`, `HSV`, `LAB`: Pillow's conversion (CMYK without its ICC profile,
      as Pillow converts it).
    - 16-bit samples (`I;16`, `I;16B`, `I;16L`, `I;16N`, and `I`, which Pillow decodes 16-bit files to): 0..65535
      scaled to 0..255, not clipped at 255 as Pillow's `convert` does. `F` (floating point): [0, 1] scaled to
      0..255. 16-bit RGB(A) PNGs Pillow already decodes to 8-bit `RGB`/`RGBA`.
    - Transparency (`LA`, `La`, `PA`, `RGBA`, `RGBa`, `P` with a transparent palette entry or an RGBA palette, and
      `L`/`RGB`/`I;16` with a `transparency` colour key): composited on one flat `background`, white by default
      (`TRANSPARENT_BACKGROUND`): fully transparent pixels become exactly the background, whatever colour they hold.

    Args:
        image: A PIL image.
        background: RGB colour (0..255 each) transparent pixels are composited on.

    Returns:
        An 8-bit `RGB` image of the same upright size; `image` itself when it is already upright RGB.

    Raises:
        ValueError: Pillow cannot convert the mode to RGB; the message names the mode.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in _FLOAT_MODES:
        image = _high_depth_to_8bit(image)
    has_alpha = _has_alpha(image)
    if image.mode == "RGB" and not has_alpha:
        return image
    try:
        if not has_alpha:
            return image.convert("RGB")
        if image.mode == "La":  # premultiplied; Pillow converts it to RGBA only through LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
    except ValueError as error:
        raise ValueError(f"Cannot show a PIL image of mode {image.mode} as RGB: {error}") from error
    flat = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(flat, rgba).convert("RGB")


def _pil_to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    # torchvision's `ToTensor` then `Normalize([0.5], [0.5])`, in the same operations so the floats match.
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return pixels.to(dtype=torch.float32).div(255).sub_(0.5).div_(0.5)


class ImagePreprocessor:
    """Upstream's training transforms on a PIL image: resize, center or random crop, random flip, to [-1, 1].

    Random choices come from the global torch RNG only, drawn as torchvision draws them (`RandomCrop`: two
    `torch.randint` unless the image already has the target size; `RandomHorizontalFlip`: one `torch.rand`), so
    seeding torch before a call reproduces it.

    Args:
        resolution: Side of the square output in pixels.
        center_crop: Crop the middle instead of a random square.
        random_flip: Mirror left-right with probability 0.5.
        interpolation: Resampling filter of the resize, a torchvision `InterpolationMode` name in lower case
            (`IMAGE_INTERPOLATION_MODES`).
    """

    def __init__(
        self, resolution: int, center_crop: bool = False, random_flip: bool = False, interpolation: str = "lanczos"
    ):
        if resolution <= 0:
            raise ValueError(f"The resolution must be a positive number of pixels, got {resolution}.")
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.interpolation = interpolation_from_name(interpolation)

    def _crop_top_left(self, height: int, width: int) -> tuple[int, int]:
        size = self.resolution
        if self.center_crop:
            return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        if height == size and width == size:
            return 0, 0
        top = torch.randint(0, height - size + 1, size=(1,)).item()
        left = torch.randint(0, width - size + 1, size=(1,)).item()
        return top, left

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Transforms one image and reports the size and crop conditioning Stable Diffusion XL trains with.

        Args:
            image: Any PIL image; converted to RGB by `to_rgb` (upright, transparency on `TRANSPARENT_BACKGROUND`,
                16-bit and float samples scaled).

        Returns:
            `(pixel_values, original_size, crop_top_left)`: a float32 tensor of shape (3, resolution, resolution) in
            [-1, 1]; the upright input's `(height, width)`; the `(top, left)` of the crop in the resized image. When the
            image is flipped, `left` is measured in the flipped image (resized width - left - resolution), as in
            upstream's SDXL script, which flips before it crops.
        """
        image = to_rgb(image)
        original_size = (image.height, image.width)
        height, width = _resized_size(image.height, image.width, self.resolution)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), resample=self.interpolation)
        top, left = self._crop_top_left(height, width)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and torch.rand(1).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = width - left - self.resolution
        return _pil_to_normalized_tensor(image), original_size, (top, left)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Transforms one image.

        Args:
            image: Any PIL image; converted to RGB by `to_rgb`.

        Returns:
            A float32 tensor of shape (3, resolution, resolution) in [-1, 1].
        """
        return self.preprocess(image)[0]


def _describe_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({type(value).__name__})"


def caption_problem(caption) -> str | None:
    """What makes `caption` unusable as a caption, or None when it is one: a string (empty included, as upstream),
    or a non-empty list or array of strings to pick from.

    Args:
        caption: A value of the caption column.

    Returns:
        None, or words for the value, e.g. "null", "NaN", "42 (int)", "an empty list", "a list holding null".
    """
    if isinstance(caption, str):
        return None
    if isinstance(caption, (list, tuple, np.ndarray)):
        if len(caption) == 0:
            return "an empty list"
        for item in caption:
            if not isinstance(item, str):
                return f"a list holding {_describe_value(item)}"
        return None
    return _describe_value(caption)


def choose_caption(caption, is_train: bool = True, caption_column: str = "text") -> str:
    """Picks the caption to train on, as upstream: a string as is, one of several at random when training.

    Args:
        caption: A string, or a list or array of strings.
        is_train: Pick with `random.choice` (Python's global RNG); otherwise take the first.
        caption_column: Name of the column, for the error message.

    Returns:
        One caption.

    Raises:
        ValueError: The caption is not a string or a non-empty list or array of strings (`caption_problem`).
    """
    problem = caption_problem(caption)
    if problem is not None:
        raise ValueError(
            f"Caption column `{caption_column}` should contain either strings or lists of strings, got {problem}."
        )
    if isinstance(caption, str):
        return caption
    return random.choice(caption) if is_train else caption[0]


def tokenize_captions(captions: Sequence, tokenizer, is_train: bool = True, caption_column: str = "text"):
    """Tokenizes captions to the tokenizer's full length, as upstream's `tokenize_captions`.

    Args:
        captions: Strings, or lists of strings of which one is picked (`choose_caption`).
        tokenizer: A `transformers` tokenizer; its `model_max_length` is the length of every row.
        is_train: Pick among several captions at random; otherwise the first.
        caption_column: Name of the column, for the error message.

    Returns:
        A LongTensor of shape (len(captions), tokenizer.model_max_length).

    Raises:
        ValueError: A caption is neither a string nor a list or array of strings.
    """
    chosen = [choose_caption(caption, is_train, caption_column) for caption in captions]
    inputs = tokenizer(
        chosen, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    )
    return inputs.input_ids


def _open_image(value) -> Image.Image:
    """Opens an image stored as a PIL image, a `{"bytes", "path"}` dict, raw bytes or a path, fully loaded."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray)):
        value = {"bytes": bytes(value), "path": None}
    elif isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    elif not isinstance(value, dict):
        raise TypeError(f"Cannot read an image from a {type(value).__name__}.")
    # `datasets` opens as below (PIL open and load), for local paths, hub paths and bytes alike. No `mode`: Pillow's
    # plain `convert` drops alpha and clips 16-bit samples; `to_rgb` converts instead.
    return datasets.Image().decode_example(value)


def load_rgb_image(value, background: tuple[int, int, int] = TRANSPARENT_BACKGROUND) -> Image.Image:
    """Opens an image and returns the RGB picture a person sees (`to_rgb`): how every image of the data is decoded.

    Args:
        value: A PIL image, a `{"bytes", "path"}` dict (an undecoded `datasets.Image` value), raw bytes or a path.
        background: RGB colour transparent pixels are composited on.

    Returns:
        An 8-bit RGB `PIL.Image.Image`, upright.

    Raises:
        TypeError: `value` is of another type.
        OSError, ValueError, ...: The file cannot be decoded (whatever PIL raises), or its mode cannot be shown as RGB.
    """
    return to_rgb(_open_image(value), background)


def _image_name(index: int, value) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"{index} ({path})" if path else str(index)


def _readable_image_rows(dataset: datasets.Dataset, image_column: str) -> tuple[list[int], list]:
    """Decodes every image once: the indices that decode, and the names of those that do not."""
    readable, corrupt = [], []
    index = 0
    for batch in dataset.select_columns([image_column]).iter(batch_size=64):
        for value in batch[image_column]:
            try:
                load_rgb_image(value)
                readable.append(index)
            except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on bad bytes
                corrupt.append(_image_name(index, value))
            index += 1
    return readable, corrupt


def drop_unreadable_images(
    dataset: datasets.Dataset, image_column: str = "image", strict: bool = False
) -> datasets.Dataset:
    """Removes the rows whose image cannot be decoded, with one warning naming them and counting them.

    Every image is decoded once, so this costs a pass over the images: seconds for thousands of small images, which
    is what LoRA fine-tuning sets usually hold, and worth it against a crash mid-epoch.

    Args:
        dataset: The dataset; an `Image` column is read undecoded (bytes or path) and decoded here.
        image_column: Column holding the images.
        strict: Reject the dataset instead, naming the unreadable rows.

    Returns:
        The dataset without the unreadable rows (the same object when all are readable).

    Raises:
        ValueError: No image is readable, or some are not and `strict` is set.
    """
    feature = dataset.features[image_column]
    undecoded = dataset
    if isinstance(feature, datasets.Image) and feature.decode:
        undecoded = dataset.cast_column(image_column, datasets.Image(decode=False))
    readable, corrupt = _readable_image_rows(undecoded, image_column)
    named = ", ".join(corrupt[:_MAX_NAMED_CORRUPT_IMAGES])
    if len(corrupt) > _MAX_NAMED_CORRUPT_IMAGES:
        named += f", ... ({len(corrupt) - _MAX_NAMED_CORRUPT_IMAGES} more)"
    if not readable:
        raise ValueError(
            f"There are no readable images in column '{image_column}' of the dataset: all {len(dataset)} failed to "
            f"decode (rows {named}). Check the files, or --image_column."
        )
    if not corrupt:
        return dataset
    if strict:
        raise ValueError(
            f"{len(corrupt)} of {len(dataset)} images in column '{image_column}' cannot be read: rows {named}. Fix"
            " or remove them, or drop --strict_data to skip them with a warning."
        )
    logger.warning(
        "Dropping %d of %d rows whose image in column '%s' cannot be read: rows %s.",
        len(corrupt),
        len(dataset),
        image_column,
        named,
    )
    return dataset.select(readable)


# The caption files of an `imagefolder` data set, as `datasets` looks for them beside (or above) the images.
_METADATA_FILE_NAMES = ("metadata.jsonl", "metadata.csv")
# How many folders above an image a caption file may sit (imagefolder allows one per folder or one at the root).
_MAX_METADATA_DEPTH = 8


def _metadata_line(image_path: str | None) -> str | None:
    """`"<folder>/metadata.jsonl line N"` for an image of an `imagefolder` data set: the caption file and line that
    describe it, found beside the image or in a folder above; None if there is none (a hub or saved data set)."""
    if not image_path or not os.path.isfile(image_path):
        return None
    folder = os.path.dirname(os.path.abspath(image_path))
    for _ in range(_MAX_METADATA_DEPTH):
        for name in _METADATA_FILE_NAMES:
            metadata_path = os.path.join(folder, name)
            if os.path.isfile(metadata_path):
                relative = os.path.relpath(os.path.abspath(image_path), folder).replace(os.sep, "/")
                line = _line_of_file_name(metadata_path, relative)
                return metadata_path if line is None else f"{metadata_path} line {line}"
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return None


def _line_of_file_name(metadata_path: str, file_name: str) -> int | None:
    """The 1-based line of `metadata_path` whose `file_name` is `file_name`, or None."""
    try:
        with open(metadata_path, encoding="utf-8", newline="") as handle:
            if metadata_path.endswith(".csv"):
                reader = csv.DictReader(handle)
                for row in reader:
                    if row.get("file_name") == file_name:
                        return reader.line_num
                return None
            for number, line in enumerate(handle, start=1):
                try:
                    if json.loads(line).get("file_name") == file_name:
                        return number
                except (ValueError, AttributeError):
                    continue
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return None


def _bad_caption_rows(
    dataset: datasets.Dataset, caption_column: str, image_column: str | None
) -> list[tuple[int, str]]:
    """`(index, name)` of the rows whose caption is unusable; names read `"row <index> (<caption file and line, or
    image path>): <why>"`."""
    columns = [caption_column] + ([image_column] if image_column is not None else [])
    bad, index = [], 0
    for batch in dataset.select_columns(columns).iter(batch_size=256):
        for position, caption in enumerate(batch[caption_column]):
            problem = caption_problem(caption)
            if problem is not None:
                image = batch[image_column][position] if image_column is not None else None
                path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
                where = _metadata_line(path) or path
                bad.append((index, f"row {index} ({where}): {problem}" if where else f"row {index}: {problem}"))
            index += 1
    return bad


def drop_bad_captions(
    dataset: datasets.Dataset, caption_column: str = "text", image_column: str | None = "image", strict: bool = False
) -> datasets.Dataset:
    """Removes the rows whose caption is unusable (`caption_problem`: null, NaN, a number, an empty list, a list
    holding a non-string, ...), with one warning naming them as `drop_unreadable_images` does for images.

    Rows of an `imagefolder` data set are named by their caption file and line (`metadata.jsonl line 3`), others by
    their row index and image path.

    Args:
        dataset: The dataset; the image column is best undecoded (`Image(decode=False)`), so that no image is opened
            here and each row's image path is at hand.
        caption_column: Column holding the captions.
        image_column: Column holding the images, to name the rows by their file; None to name them by index only.
        strict: Reject the dataset instead, naming the bad rows.

    Returns:
        The dataset without those rows (the same object when every caption is usable).

    Raises:
        ValueError: No caption is usable, or some are not and `strict` is set.
    """
    bad = _bad_caption_rows(dataset, caption_column, image_column)
    if not bad:
        return dataset
    named = "; ".join(name for _, name in bad[:_MAX_NAMED_CORRUPT_IMAGES])
    if len(bad) > _MAX_NAMED_CORRUPT_IMAGES:
        named += f"; ... ({len(bad) - _MAX_NAMED_CORRUPT_IMAGES} more)"
    fix = "a caption is a string, or a non-empty list of strings to pick from"
    if len(bad) == len(dataset):
        raise ValueError(
            f"No row of the dataset has a usable caption in column '{caption_column}' ({fix}): {named}. Check the "
            "captions, or --caption_column."
        )
    if strict:
        raise ValueError(
            f"{len(bad)} of {len(dataset)} captions in column '{caption_column}' are not usable ({fix}): {named}. "
            "Fix or remove those rows, or drop --strict_data to skip them with a warning."
        )
    logger.warning(
        "Dropping %d of %d rows whose caption in column '%s' is not usable (%s): %s.",
        len(bad),
        len(dataset),
        caption_column,
        fix,
        named,
    )
    bad_rows = {index for index, _ in bad}
    return dataset.select([index for index in range(len(dataset)) if index not in bad_rows])


class TextToImageDataset(torch.utils.data.Dataset):
    """Image-caption rows preprocessed on every fetch, so crops, flips and caption choices change each epoch.

    Use `make_text_to_image_dataset` to build one. Items are dicts with `pixel_values` (3, R, R) float32,
    `input_ids` (and `input_ids_2`, ... for further tokenizers) of shape (model_max_length,), `original_size` and
    `crop_top_left` (tuples of 2 ints).

    Args:
        dataset: Rows with the image column undecoded (or images of any form `load_rgb_image` reads) and captions.
        tokenizers: One tokenizer per text encoder; all tokenize the same chosen caption.
        preprocessor: The image transforms.
        image_column: Column holding the images.
        caption_column: Column holding the captions.
    """

    def __init__(self, dataset, tokenizers, preprocessor, image_column, caption_column):
        self.dataset = dataset
        self.tokenizers = list(tokenizers)
        self.preprocessor = preprocessor
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        image = load_rgb_image(row[self.image_column])
        pixel_values, original_size, crop_top_left = self.preprocessor.preprocess(image)
        caption = choose_caption(row[self.caption_column], is_train=True, caption_column=self.caption_column)
        item = {"pixel_values": pixel_values, "original_size": original_size, "crop_top_left": crop_top_left}
        for position, tokenizer in enumerate(self.tokenizers):
            key = "input_ids" if position == 0 else f"input_ids_{position + 1}"
            item[key] = tokenize_captions([caption], tokenizer, caption_column=self.caption_column)[0]
        return item


def make_text_to_image_dataset(
    raw_dataset: datasets.Dataset,
    tokenizers,
    preprocessor: ImagePreprocessor,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    seed: int | None = None,
    strict: bool = False,
) -> TextToImageDataset:
    """The training dataset of the text-to-image trainer: upstream's `preprocess_train`, applied per fetch.

    Rows whose caption is unusable (`drop_bad_captions`: null, NaN, not a string, an empty list, ...), then rows whose
    image cannot be decoded (`drop_unreadable_images`; it decodes every image once, which suits the small datasets
    LoRA trains on) are dropped first, each kind with one warning naming the rows; `strict` refuses them instead.

    Args:
        raw_dataset: The train split, e.g. from `load_image_caption_dataset`.
        tokenizers: The tokenizer, or a list of one per text encoder (two for SDXL: items get `input_ids_2`).
        preprocessor: The image transforms.
        image_column: Column holding the images.
        caption_column: Column holding the captions.
        max_train_samples: Keep this many rows, chosen as upstream: `shuffle(seed=seed).select(range(n))`
            (at most all rows). Bad captions and unreadable images are dropped after this choice.
        seed: Seed of that shuffle.
        strict: Reject the dataset when a caption is unusable or an image cannot be read, instead of dropping the
            row.

    Returns:
        A `torch.utils.data.Dataset` of dicts (see `TextToImageDataset`); batch them with `collate_text_to_image`.
        Its `skipped_captions` and `skipped_images` hold the numbers of rows dropped for an unusable caption and for
        an unreadable image.

    Raises:
        ValueError: A column is missing, no caption is usable or no image readable, or (with `strict`) one is not;
            the message names the rows (for an image folder, the caption file and line).
    """
    _check_column("image_column", image_column, raw_dataset.column_names)
    _check_column("caption_column", caption_column, raw_dataset.column_names)
    if not isinstance(tokenizers, (list, tuple)):
        tokenizers = [tokenizers]
    if max_train_samples is not None:
        count = min(max_train_samples, len(raw_dataset))
        raw_dataset = raw_dataset.shuffle(seed=seed).select(range(count))
    dataset = raw_dataset.select_columns([image_column, caption_column])
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image):
        # Rows are fetched undecoded and decoded by `load_rgb_image`, the same path that checks them once here. The
        # feature's `mode` is not applied: `to_rgb` gives every image the RGB a person sees.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    captioned = drop_bad_captions(dataset, caption_column, image_column, strict=strict)
    readable = drop_unreadable_images(captioned, image_column, strict=strict)
    text_to_image = TextToImageDataset(readable, tokenizers, preprocessor, image_column, caption_column)
    text_to_image.skipped_captions = len(dataset) - len(captioned)
    text_to_image.skipped_images = len(captioned) - len(readable)
    return text_to_image


def collate_text_to_image(examples: Sequence[dict]) -> dict:
    """Batches items of `TextToImageDataset`, or items whose images or captions were replaced by cached encodings.

    Args:
        examples: Items with `pixel_values` (or cached `latents`) and `input_ids` (or cached text-encoder outputs such
            as `prompt_embeds`); optionally `input_ids_2`, ..., `original_size` and `crop_top_left`.

    Returns:
        A dict of every tensor of the items stacked along a new first dimension (`pixel_values` (N, 3, R, R) as
        contiguous float32, `input_ids` (N, L), ...) and, when the items have them, `original_sizes` and
        `crop_top_lefts` as LongTensors of shape (N, 2).
    """
    batch = {}
    for key in examples[0]:
        if key in _SIZE_KEYS:
            batch[_SIZE_KEYS[key]] = torch.tensor([tuple(example[key]) for example in examples], dtype=torch.long)
        else:
            batch[key] = torch.stack([example[key] for example in examples])
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format).float()
    return batch


# Per-item size conditioning of Stable Diffusion XL -> its batch key.
_SIZE_KEYS = {"original_size": "original_sizes", "crop_top_left": "crop_top_lefts"}


class WithCachedEncodings(torch.utils.data.Dataset):
    """Items of `dataset` with the keys computed once before training (e.g. text-encoder outputs) replacing their
    inputs (e.g. `input_ids`, `input_ids_2`); every other key is fetched from `dataset` as before.

    Args:
        dataset: The dataset to wrap; `set_epoch` is passed on to it.
        encodings: One dict per item of `dataset`, in its order.
        replaces: Key prefixes of `dataset`'s items that the encodings make unneeded; they are dropped.
    """

    def __init__(self, dataset, encodings: Sequence[dict], replaces: Sequence[str] = ("input_ids",)):
        if len(encodings) != len(dataset):
            raise ValueError(f"{len(encodings)} cached encodings for a dataset of {len(dataset)} items.")
        self.dataset = dataset
        self.encodings = encodings
        self.replaces = tuple(replaces)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = {key: value for key, value in self.dataset[index].items() if not key.startswith(self.replaces)}
        item.update(self.encodings[index])
        return item


# --------------------------------------------------------------------------------------------------------------------
# Causal language modelling data.
# --------------------------------------------------------------------------------------------------------------------


def _text_loader(train_file: str | None, validation_file: str | None) -> tuple[str, dict]:
    # As upstream, the last file given decides the loader.
    extension = str(validation_file or train_file).rsplit(".", 1)[-1].lower()
    if extension not in TEXT_FILE_LOADERS:
        raise ValueError(
            f"Cannot load '{validation_file or train_file}': the data files must end in "
            f"{', '.join('.' + name for name in TEXT_FILE_LOADERS)}."
        )
    data_files = {}
    if train_file is not None:
        data_files["train"] = str(train_file)
    if validation_file is not None:
        data_files["validation"] = str(validation_file)
    return TEXT_FILE_LOADERS[extension], data_files


def _remote_code_kwargs(trust_remote_code: bool) -> dict:
    # `datasets` 4 dropped dataset scripts and the argument with them.
    if "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
        return {"trust_remote_code": trust_remote_code}
    if trust_remote_code:
        logger.warning("datasets %s runs no dataset scripts; trust_remote_code is ignored.", datasets.__version__)
    return {}


def load_text_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: int = 5,
    cache_dir: str | None = None,
    keep_linebreaks: bool = True,
    trust_remote_code: bool = False,
) -> datasets.DatasetDict:
    """Loads the raw text of causal language modelling, as upstream's `run_clm_no_trainer.py`.

    Without a validation split, the first `validation_split_percentage` percent of train becomes validation and
    train keeps the rest (`train[:p%]` / `train[p%:]`).

    Args:
        dataset_name: A hub dataset name or a local dataset path. Takes precedence over the files.
        dataset_config_name: The dataset's configuration, if it has several.
        train_file: A `.txt` (one row per line), `.csv` or `.json` / `.jsonl` file.
        validation_file: A file of the same kind.
        validation_split_percentage: Percent of train held out when there is no validation split.
        cache_dir: Where `datasets` caches downloads and Arrow files.
        keep_linebreaks: For `.txt` files, keep each line's trailing newline in its text.
        trust_remote_code: Allow dataset scripts, where the installed `datasets` still runs them.

    Returns:
        A `DatasetDict` with `train` and `validation`. Rows whose text is not a string (null, NaN, ...) are dropped
        with one warning naming their file and line (`drop_bad_text_rows`).

    Raises:
        ValueError: No source, a file of an unknown kind, no train split, a split with no text at all, or a
            `validation_split_percentage` that leaves no validation or no train row (the message names the flag and
            the smallest percentage that holds a row out).
    """
    if dataset_name is not None:
        path, name, load_kwargs = dataset_name, dataset_config_name, _remote_code_kwargs(trust_remote_code)
    elif train_file is not None or validation_file is not None:
        path, data_files = _text_loader(train_file, validation_file)
        name, load_kwargs = None, {"data_files": data_files}
        if path == "text":
            load_kwargs["keep_linebreaks"] = keep_linebreaks
    else:
        raise ValueError("Give a dataset: --dataset_name, or --train_file and/or --validation_file (txt, csv, json).")

    raw_datasets = datasets.load_dataset(path, name, cache_dir=cache_dir, **load_kwargs)
    if "train" not in raw_datasets:
        raise ValueError(
            f"{dataset_name or validation_file} has no train split: pass --train_file (or a dataset with a train split)."
        )
    sources = {"train": dataset_name or train_file, "validation": dataset_name or validation_file}
    for split in list(raw_datasets):
        raw_datasets[split] = drop_bad_text_rows(raw_datasets[split], sources.get(split) or split)
    if "validation" not in raw_datasets:
        raw_datasets["validation"], raw_datasets["train"] = _split_off_validation(
            raw_datasets["train"], validation_split_percentage, sources["train"]
        )
    return raw_datasets


def _split_off_validation(train: datasets.Dataset, percent: int, source: str) -> tuple[datasets.Dataset, ...]:
    """`(train[:percent%], train[percent%:])` with `datasets`' rounding of percent slices, refusing an empty side."""
    num_rows = len(train)
    held_out = int(round(percent * num_rows / 100.0))  # `datasets`' "closest" rounding of `train[:p%]`
    if held_out == 0:
        enough = next((p for p in range(1, 100) if int(round(p * num_rows / 100.0)) >= 1), None)
        what = f"--validation_split_percentage {enough} or more, or" if enough else "more rows, or"
        raise ValueError(
            f"--validation_split_percentage {percent} of the {num_rows} rows of {source} holds out no row for"
            f" validation: pass {what} a --validation_file."
        )
    if held_out == num_rows:
        raise ValueError(
            f"--validation_split_percentage {percent} of the {num_rows} rows of {source} leaves no row to train on:"
            " pass a smaller --validation_split_percentage, or a --validation_file."
        )
    return train.select(range(held_out)), train.select(range(held_out, num_rows))


def _row_name(source: str, index: int) -> str:
    """A row of a text data file as its editor shows it: a line of .txt/.jsonl, a line after the header of .csv."""
    extension = str(source).rsplit(".", 1)[-1].lower()
    if os.path.isfile(str(source)) and extension in ("txt", "jsonl"):
        return f"line {index + 1}"
    if os.path.isfile(str(source)) and extension == "csv":
        return f"line {index + 2}"
    return f"row {index}"


def drop_bad_text_rows(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """Removes the rows whose text (`text_column_name`) is not a string (null, NaN, a number, ...), with one warning
    naming them by file and line, as the image-caption data drops unusable captions.

    Args:
        dataset: One split of raw text.
        source: Its file (or dataset name), for the messages.

    Returns:
        The split without those rows (the same object when every row is text).

    Raises:
        ValueError: No row holds text; the message names the column and the first rows.
    """
    column = text_column_name(dataset)
    bad, index = [], 0
    for batch in dataset.select_columns([column]).iter(batch_size=1000):
        for value in batch[column]:
            if not isinstance(value, str):
                bad.append((index, f"{_row_name(source, index)}: {_describe_value(value)}"))
            index += 1
    if not bad:
        return dataset
    named = "; ".join(name for _, name in bad[:_MAX_NAMED_CORRUPT_IMAGES])
    if len(bad) > _MAX_NAMED_CORRUPT_IMAGES:
        named += f"; ... ({len(bad) - _MAX_NAMED_CORRUPT_IMAGES} more)"
    if len(bad) == len(dataset):
        raise ValueError(f"No row of {source} holds text in column '{column}' ({named}): check the file.")
    logger.warning(
        "Dropping %d of %d rows of %s whose '%s' is not text: %s.", len(bad), len(dataset), source, column, named
    )
    bad_rows = {row for row, _ in bad}
    return dataset.select([row for row in range(len(dataset)) if row not in bad_rows])


def text_column_name(dataset) -> str:
    """The column holding the text: `text` if there is one, else the first column, as upstream.

    Args:
        dataset: A `Dataset` (or anything with `column_names` as a list).

    Returns:
        The column name.
    """
    column_names = dataset.column_names
    return "text" if "text" in column_names else column_names[0]


# Config fields holding a model's number of positions, by family (transformers maps GPT-2's `n_positions` to
# `max_position_embeddings` too, but a config read as a plain dict keeps the family's own name).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def _config_value(config, name: str):
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def max_positions(config) -> int | None:
    """The number of token positions a model's config allows (`max_position_embeddings`, GPT-2's `n_positions`, ...).

    Args:
        config: A `transformers` config, or its `config.json` as a dict.

    Returns:
        The number of positions, or None when the config sets none (e.g. ALiBi or rotary models without a limit).
    """
    for name in _POSITION_FIELDS:
        value = _config_value(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def resolve_block_size(tokenizer, block_size: int | None = None, max_position_embeddings: int | None = None) -> int:
    """The length of the training blocks: upstream's rule, and never more than the model's positions.

    As upstream, the default is min(1024, the tokenizer's `model_max_length`) and a `--block_size` above
    `model_max_length` is clamped to it with a warning. A block longer than the model's positions would fail at the
    first step (`IndexError: index out of range in self` in the position embedding), so it is clamped the same way,
    with a warning naming `--block_size` and the limit.

    Args:
        tokenizer: The tokenizer; its `model_max_length` bounds the block.
        block_size: The requested length (`--block_size`); None for the default.
        max_position_embeddings: The model's number of positions (`max_positions(config)`), or None for no limit.

    Returns:
        The block size.
    """
    model_max_length = tokenizer.model_max_length
    if block_size is None:
        block_size = min(1024, model_max_length)
        if max_position_embeddings is not None and block_size > max_position_embeddings:
            logger.warning(
                "The tokenizer allows %d tokens but the model has %d positions; using block_size=%d. "
                "Pass --block_size to change it.",
                model_max_length,
                max_position_embeddings,
                max_position_embeddings,
            )
            block_size = max_position_embeddings
        return block_size
    if block_size > model_max_length:
        logger.warning(
            "The block_size passed (%d) is larger than the maximum length for the model (%d). Using block_size=%d.",
            block_size,
            model_max_length,
            model_max_length,
        )
        block_size = model_max_length
    if max_position_embeddings is not None and block_size > max_position_embeddings:
        logger.warning(
            "--block_size %d is more than the model's %d positions (max_position_embeddings of its config); using "
            "block_size=%d. Pass --block_size %d or less.",
            block_size,
            max_position_embeddings,
            max_position_embeddings,
            max_position_embeddings,
        )
        block_size = max_position_embeddings
    return block_size


def check_vocabulary(tokenizer, model_config, role: str = "the model") -> None:
    """Refuses a tokenizer whose ids have no row in the model's input embedding (`len(tokenizer)` > `vocab_size`),
    which would fail at the first step with `IndexError: index out of range in self`.

    Args:
        tokenizer: The tokenizer.
        model_config: The model's config (an object or its `config.json` dict).
        role: The model's name in the message, e.g. "text_encoder".

    Raises:
        ValueError: The tokenizer has more tokens than the embedding has rows.
    """
    vocab_size = _config_value(model_config, "vocab_size")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but {role} embeds {vocab_size} (vocab_size of its config):"
            " use the tokenizer the model was trained with (--tokenizer_name)."
        )


def vae_scale_factor(vae_config) -> int:
    """How many pixels one latent stands for along a side: 2 ** (len(block_out_channels) - 1), as diffusers' pipelines.

    Args:
        vae_config: The VAE's config (an object or its `config.json` dict).

    Returns:
        The factor (8 for Stable Diffusion).
    """
    block_out_channels = _config_value(vae_config, "block_out_channels") or [0] * 4
    return 2 ** (len(block_out_channels) - 1)


def check_text_to_image_limits(resolution: int, tokenizers: Sequence, text_encoder_configs: dict, vae_config) -> None:
    """Refuses, before any model is loaded, data the models' configs cannot take, all problems in one message.

    - `--resolution` must be a multiple of the VAE's scale factor (`vae_scale_factor`): latents of another size
      train, but the pipeline refuses the size (validation images, inference).
    - Each tokenizer pads captions to its `model_max_length`, which must not exceed its text encoder's positions
      (`max_position_embeddings`), or the text encoder fails with an `IndexError` at the first step.
    - Each tokenizer's ids must have rows in its text encoder's embedding (`len(tokenizer)` <= `vocab_size`).

    Args:
        resolution: `--resolution`, in pixels.
        tokenizers: One tokenizer per text encoder, in the order of `text_encoder_configs`.
        text_encoder_configs: `{role: config}` (objects or `config.json` dicts), e.g. `{"text_encoder": ...}`.
        vae_config: The VAE's config.

    Raises:
        ValueError: Any of the above; the message names the flag or file and what to pass.
    """
    problems = []
    scale = vae_scale_factor(vae_config)
    if resolution % scale:
        lower, upper = resolution // scale * scale, (resolution // scale + 1) * scale
        choices = f"{lower} or {upper}" if lower else str(upper)
        problems.append(
            f"--resolution {resolution} is not a multiple of {scale}, the VAE's scale factor (2 ** (len("
            f"block_out_channels) - 1) in vae/config.json): pass --resolution {choices}"
        )
    for (role, config), tokenizer in zip(text_encoder_configs.items(), tokenizers):
        tokenizer_folder = role.replace("text_encoder", "tokenizer")
        positions = max_positions(config)
        if positions is not None and tokenizer.model_max_length > positions:
            problems.append(
                f"{tokenizer_folder} pads captions to {tokenizer.model_max_length} tokens (model_max_length) but"
                f" {role} has {positions} positions (max_position_embeddings): set model_max_length to {positions} in"
                f" {tokenizer_folder}/tokenizer_config.json"
            )
        vocab_size = _config_value(config, "vocab_size")
        if vocab_size is not None and len(tokenizer) > vocab_size:
            problems.append(
                f"{tokenizer_folder} has {len(tokenizer)} tokens but {role} embeds {vocab_size} (vocab_size): use the"
                f" tokenizer the text encoder was trained with"
            )
    if problems:
        raise ValueError("The model cannot take this data: " + "; ".join(problems) + ".")


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenates a batch of tokenized rows and cuts it into blocks, dropping the remainder; labels = input_ids.

    Args:
        examples: Columns of token lists (a batch of `Dataset.map(batched=True)`).
        block_size: Tokens per block.

    Returns:
        The same columns as lists of blocks, plus `labels`, a copy of `input_ids`.
    """
    concatenated = {key: list(chain(*examples[key])) for key in examples}
    total_length = len(concatenated[next(iter(examples))])
    total_length = (total_length // block_size) * block_size
    result = {
        key: [tokens[start : start + block_size] for start in range(0, total_length, block_size)]
        for key, tokens in concatenated.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def tokenize_and_group(
    raw_datasets: datasets.DatasetDict,
    tokenizer,
    block_size: int,
    num_proc: int | None = None,
    overwrite_cache: bool = False,
) -> datasets.DatasetDict:
    """Tokenizes the text column and regroups the tokens into blocks of `block_size`, as upstream.

    As upstream, rows are concatenated per `map` batch of 1,000 rows, so each batch drops its own remainder.

    Args:
        raw_datasets: Splits with a text column (`text_column_name`); all raw columns are removed.
        tokenizer: The tokenizer, called without padding or truncation.
        block_size: Tokens per block (see `resolve_block_size`).
        num_proc: Processes of `Dataset.map`.
        overwrite_cache: Recompute instead of reusing `datasets`' cache files.

    Returns:
        Splits with `input_ids`, `attention_mask` (whatever the tokenizer returns) and `labels`, every row
        `block_size` long. Batch them with `causal_lm_collate`.
    """
    column_names = raw_datasets["train"].column_names
    text_column = text_column_name(raw_datasets["train"])

    def tokenize_function(examples):
        return tokenizer(examples[text_column])

    tokenized = raw_datasets.map(
        tokenize_function,
        batched=True,
        num_proc=num_proc,
        remove_columns=column_names,
        load_from_cache_file=not overwrite_cache,
        desc="Running tokenizer on dataset",
    )
    return tokenized.map(
        group_texts,
        batched=True,
        fn_kwargs={"block_size": block_size},
        num_proc=num_proc,
        load_from_cache_file=not overwrite_cache,
        desc=f"Grouping texts in chunks of {block_size}",
    )


causal_lm_collate = default_data_collator
