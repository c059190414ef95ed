"""The datasets of both trainers on the tiny image folder, tokenizers and text corpus: upstream's preprocessing,
reproducible augmentations, corrupt images dropped, and token blocks of the requested size."""

import json
import logging
import random
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from transformers import AutoConfig, AutoTokenizer, CLIPTokenizer

from diffusers_lowmem import data

LOGGER = "diffusers_lowmem.data"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A `datasets` cache of this module's own, so parallel workers never share lock files."""
    return str(tmp_path_factory.mktemp("datasets_cache"))


@pytest.fixture(scope="module")
def image_dataset(tiny_images_path, cache_dir):
    return data.load_image_caption_dataset(train_data_dir=tiny_images_path, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def clip_tokenizer(tiny_sd_path):
    return CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")


def column_pattern(width=48, height=32):
    """An RGB image whose pixel (x, y) is (5x, 7y, 100): every crop has a different value at its corner."""
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x * 5, y * 7, np.full_like(x, 100)], axis=-1), mode="RGB")


def as_expected_tensor(image):
    """What torchvision's ToTensor + Normalize([0.5], [0.5]) give for a PIL RGB image."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def noise_image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def copy_image_folder(source, destination, corrupt_files=()):
    shutil.copytree(source, destination)
    for name in corrupt_files:
        (destination / name).write_bytes(b"this is not a PNG file" * 10)
    return destination


# --------------------------------------------------------------------------------------------------------------------
# Loading image-caption datasets.
# --------------------------------------------------------------------------------------------------------------------


def test_image_folder_loads_eight_captioned_images(image_dataset):
    assert len(image_dataset) == 8
    assert image_dataset.column_names == ["image", "text"]
    assert image_dataset[0]["text"] == "a red circle"
    assert image_dataset[0]["image"].size == (32, 32)


@pytest.mark.parametrize(
    "flag, kwargs", [("image_column", {"image_column": "img"}), ("caption_column", {"caption_column": "caption"})]
)
def test_missing_column_is_named_with_the_available_ones(tiny_images_path, cache_dir, flag, kwargs):
    wrong = next(iter(kwargs.values()))
    with pytest.raises(
        ValueError, match=f"--{flag} '{wrong}' is not a column of the dataset; its columns are: image, text."
    ):
        data.load_image_caption_dataset(train_data_dir=tiny_images_path, cache_dir=cache_dir, **kwargs)


def test_no_source_raises():
    with pytest.raises(ValueError, match="--dataset_name"):
        data.load_image_caption_dataset()


@pytest.mark.parametrize("as_dict", [False, True])
def test_dataset_saved_to_disk_loads_the_same_rows(image_dataset, tmp_path, as_dict):
    saved = datasets.DatasetDict(train=image_dataset) if as_dict else image_dataset
    saved.save_to_disk(str(tmp_path / "saved"))
    loaded = data.load_image_caption_dataset(dataset_name=str(tmp_path / "saved"))
    assert len(loaded) == 8
    assert list(loaded["text"]) == list(image_dataset["text"])
    assert np.array_equal(np.array(loaded[5]["image"]), np.array(image_dataset[5]["image"]))


# --------------------------------------------------------------------------------------------------------------------
# Image preprocessing.
# --------------------------------------------------------------------------------------------------------------------


def test_output_is_float32_in_minus_one_to_one():
    half_black = np.zeros((40, 50, 3), dtype=np.uint8)
    half_black[:, 25:] = 255
    pixel_values = data.ImagePreprocessor(16)(Image.fromarray(half_black))
    assert pixel_values.shape == (3, 16, 16)
    assert pixel_values.dtype == torch.float32
    assert pixel_values.min().item() >= -1.0 and pixel_values.max().item() <= 1.0
    assert pixel_values.min().item() == -1.0 and pixel_values.max().item() == 1.0


def test_grayscale_and_rgba_are_converted_to_rgb():
    preprocessor = data.ImagePreprocessor(8, center_crop=True)
    for mode in ("L", "RGBA", "P"):
        assert preprocessor(Image.new(mode, (12, 8))).shape == (3, 8, 8)


# --------------------------------------------------------------------------------------------------------------------
# Image modes: every mode a folder holds becomes the RGB picture a person sees (`data.to_rgb`), read from files.
# --------------------------------------------------------------------------------------------------------------------

WHITE = (255, 255, 255)
MAGENTA = (255, 0, 255)


def reopen(image, path, **save_kwargs):
    """Writes `image` with Pillow and reads it back as the data pipeline does (`load_rgb_image`) and as Pillow
    opens it; returns `(rgb pixels as an int array (H, W, 3), the mode Pillow opened)`."""
    image.save(path, **save_kwargs)
    with Image.open(path) as opened:
        mode = opened.mode
    rgb = data.load_rgb_image(str(path))
    assert rgb.mode == "RGB" and rgb.size == image.size
    return np.asarray(rgb).astype(int), mode


def png_bytes(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (which Pillow can read but not write) of `samples` (H, W, C) uint16, big-endian as PNG stores."""
    import struct
    import zlib

    height, width = samples.shape[:2]

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples.reshape(height, -1))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_rgba_transparent_magenta_becomes_white_and_opaque_pixels_stay(tmp_path):
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[:, :32] = (*MAGENTA, 0)  # the issue's file: a transparent left half that holds magenta
    pixels[:, 32:48] = (10, 200, 30, 255)
    pixels[:, 48:] = (0, 0, 0, 128)  # half-transparent black over white: mid gray
    rgb, mode = reopen(Image.fromarray(pixels, mode="RGBA"), tmp_path / "rgba.png")
    assert mode == "RGBA"
    assert (rgb[:, :32] == WHITE).all()
    assert (rgb[:, 32:48] == (10, 200, 30)).all()
    assert np.abs(rgb[:, 48:] - 127).max() <= 1
    # Through the preprocessor as the VAE gets it: +1 in every channel on the left, not magenta's [1, -1, 1].
    pixel_values = data.ImagePreprocessor(64, center_crop=True)(data.load_rgb_image(str(tmp_path / "rgba.png")))
    assert torch.equal(pixel_values[:, :, :32], torch.ones(3, 64, 32))


def test_premultiplied_rgba_and_la_are_composited_too():
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[:, :2] = (*MAGENTA, 0)
    pixels[:, 2:] = (40, 80, 120, 255)
    rgb = np.asarray(data.to_rgb(Image.fromarray(pixels, mode="RGBA").convert("RGBa"))).astype(int)
    assert (rgb[:, :2] == WHITE).all() and (rgb[:, 2:] == (40, 80, 120)).all()
    gray = Image.merge("LA", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0))).convert("La")
    assert (np.asarray(data.to_rgb(gray)) == 255).all()


def test_la_transparent_pixels_become_white(tmp_path):
    gray = np.full((8, 8), 30, dtype=np.uint8)
    alpha = np.full((8, 8), 255, dtype=np.uint8)
    alpha[:, :4] = 0
    rgb, mode = reopen(Image.merge("LA", (Image.fromarray(gray), Image.fromarray(alpha))), tmp_path / "la.png")
    assert mode == "LA"
    assert (rgb[:, :4] == WHITE).all() and (rgb[:, 4:] == 30).all()


def palette_image():
    """4x2 `P` image: index 0 is magenta, 1 red, 2 green, 3 blue; column x holds index x."""
    image = Image.fromarray(np.tile(np.arange(4, dtype=np.uint8), (2, 1)), mode="P")
    image.putpalette([*MAGENTA, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return image


def test_palette_without_transparency_shows_its_colours(tmp_path):
    rgb, mode = reopen(palette_image(), tmp_path / "p.png")
    assert mode == "P"
    assert [tuple(rgb[0, x]) for x in range(4)] == [MAGENTA, (255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_a_transparent_entry_shows_white_there(tmp_path, suffix):
    rgb, mode = reopen(palette_image(), tmp_path / f"p.{suffix}", transparency=0)
    assert mode == "P"
    assert [tuple(rgb[1, x]) for x in range(4)] == [WHITE, (255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_colour_key_transparency_of_rgb_and_l_files_becomes_white(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = MAGENTA
    rgb, _ = reopen(Image.fromarray(pixels, mode="RGB"), tmp_path / "key.png", transparency=MAGENTA)
    assert (rgb[:, :2] == WHITE).all() and (rgb[:, 2:] == 0).all()
    gray = np.array([[7, 7, 9, 9]], dtype=np.uint8)
    rgb, _ = reopen(Image.fromarray(gray, mode="L"), tmp_path / "key_l.png", transparency=7)
    assert (rgb[0, :2] == WHITE).all() and (rgb[0, 2:] == 9).all()


def test_bilevel_and_grayscale_become_equal_channels(tmp_path):
    checker = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)
    bilevel = Image.fromarray(checker.astype(np.uint8) * 255).convert("1")  # (fromarray of bools packs wrongly)
    rgb, mode = reopen(bilevel, tmp_path / "bits.png")
    assert mode == "1"
    assert (rgb == np.where(checker, 255, 0)[..., None]).all()
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (3, 1))
    rgb, mode = reopen(Image.fromarray(ramp, mode="L"), tmp_path / "gray.png")
    assert mode == "L"
    assert (rgb == ramp[..., None]).all()


def test_rgb_is_returned_unchanged(tmp_path):
    image = noise_image(12, 10)
    rgb, _ = reopen(image, tmp_path / "rgb.png")
    assert (rgb == np.asarray(image)).all()
    assert data.to_rgb(image) is image


def test_cmyk_shows_as_ink_on_paper(tmp_path):
    inks = np.zeros((1, 4, 4), dtype=np.uint8)
    inks[0, 1] = (255, 0, 0, 0)  # cyan
    inks[0, 2] = (0, 255, 255, 0)  # magenta + yellow = red
    inks[0, 3] = (0, 0, 0, 255)  # black
    rgb, mode = reopen(Image.fromarray(inks, mode="CMYK"), tmp_path / "cmyk.tiff")
    assert mode == "CMYK"
    assert [tuple(rgb[0, x]) for x in range(4)] == [WHITE, (0, 255, 255), (255, 0, 0), (0, 0, 0)]


def test_ycbcr_shows_its_rgb(tmp_path):
    image = noise_image(8, 8, seed=3)
    rgb, mode = reopen(image.convert("YCbCr"), tmp_path / "ycbcr.tiff")
    assert mode == "YCbCr"
    assert np.abs(rgb - np.asarray(image).astype(int)).max() <= 3  # YCbCr rounding, both ways


def sixteen_bit_ramp(width=256):
    return np.round(np.linspace(0, 65535, width)).astype(np.uint16)[None, :].repeat(4, axis=0)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = sixteen_bit_ramp()
    rgb, mode = reopen(Image.fromarray(ramp), tmp_path / "gray16.png")
    assert mode == "I;16"
    assert (rgb == np.round(ramp / 257.0).astype(int)[..., None]).all()


def test_the_issues_sixteen_bit_gradient_reaches_the_vae_as_a_gradient(tmp_path):
    gradient = np.round(np.linspace(0, 65535, 64 * 64)).astype(np.uint16).reshape(64, 64)
    Image.fromarray(gradient).save(tmp_path / "gradient16.png")
    pixel_values = data.ImagePreprocessor(64, center_crop=True)(Image.open(tmp_path / "gradient16.png"))
    values = pixel_values[0].flatten()
    assert torch.equal(pixel_values[0], pixel_values[1]) and torch.equal(pixel_values[1], pixel_values[2])
    assert values[0].item() == -1.0 and values[-1].item() == 1.0
    assert (values[1:] >= values[:-1]).all()  # monotonic, row after row
    assert (values == 1.0).float().mean().item() < 0.01  # was 94 % saturated at +1
    assert abs(values.mean().item()) < 0.01


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_every_sixteen_bit_mode_scales_65535_to_255(tmp_path, mode):
    ramp = sixteen_bit_ramp(64)
    samples = ramp.astype({"I;16B": ">u2", "I": np.int32}.get(mode, "<u2"))
    image = Image.frombuffer(mode, (64, 4), samples.tobytes(), "raw", mode, 0, 1)
    assert np.array_equal(np.asarray(image).astype(int), ramp.astype(int))
    rgb, opened_mode = reopen(image, tmp_path / "sixteen.tiff")
    assert opened_mode.startswith("I")
    assert (rgb == np.round(ramp / 257.0).astype(int)[..., None]).all()


def test_int32_values_outside_sixteen_bits_are_clipped(tmp_path):
    samples = np.array([[-5, 0, 65535, 100000]], dtype=np.int32)
    rgb, mode = reopen(Image.fromarray(samples, mode="I"), tmp_path / "int32.tiff")
    assert mode == "I"
    assert rgb[0, :, 0].tolist() == [0, 0, 255, 255]


def test_float_images_map_zero_to_one_onto_black_to_white(tmp_path):
    samples = np.array([[0.0, 0.25, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    rgb, mode = reopen(Image.fromarray(samples, mode="F"), tmp_path / "float.tiff")
    assert mode == "F"
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255, 255, 0, 0]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_sixteen_bit_rgb_and_rgba_pngs(tmp_path):
    ramp = np.round(np.linspace(0, 65535, 32)).astype(np.uint16)
    samples = np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], axis=-1)[None].repeat(2, axis=0)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(samples, color_type=2))
    with Image.open(tmp_path / "rgb16.png") as opened:
        assert opened.mode in ("RGB", "I;16", "I;16B")  # what the installed Pillow decodes 16-bit RGB to
    rgb = np.asarray(data.load_rgb_image(str(tmp_path / "rgb16.png"))).astype(int)
    assert rgb.shape == (2, 32, 3)
    assert np.abs(rgb - samples / 257.0).max() <= 1.0
    alpha = np.full((2, 32, 1), 65535, dtype=np.uint16)
    alpha[:, :16] = 0
    (tmp_path / "rgba16.png").write_bytes(png_bytes(np.concatenate([samples, alpha], axis=-1), color_type=6))
    rgba = np.asarray(data.load_rgb_image(str(tmp_path / "rgba16.png"))).astype(int)
    assert (rgba[:, :16] == WHITE).all()
    assert np.abs(rgba[:, 16:] - samples[:, 16:] / 257.0).max() <= 1.0


def test_exif_rotated_jpeg_is_upright_and_sized_upright(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # wide, with a white left third
    pixels[:, :13] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    rgb = data.load_rgb_image(str(tmp_path / "rotated.jpg"))
    assert rgb.size == (20, 40)  # upright: tall
    upright = np.asarray(rgb).astype(int)
    assert upright[:10].mean() > 240 and upright[-10:].mean() < 15  # the white third is now on top
    # A PIL image handed over still carrying the tag is turned too, and SDXL's original size is the upright one.
    _, original_size, _ = data.ImagePreprocessor(16, center_crop=True).preprocess(Image.open(tmp_path / "rotated.jpg"))
    assert original_size == (40, 20)


def test_background_is_one_flat_colour_for_every_mode_with_alpha():
    transparent = {
        "RGBA": Image.new("RGBA", (2, 2), (*MAGENTA, 0)),
        "LA": Image.new("LA", (2, 2), (0, 0)),
        "PA": Image.new("PA", (2, 2), (0, 0)),
    }
    for mode, image in transparent.items():
        assert (np.asarray(data.to_rgb(image)) == 255).all(), mode
        assert (np.asarray(data.to_rgb(image, background=(0, 0, 0))) == 0).all(), mode
    assert data.TRANSPARENT_BACKGROUND == WHITE


def test_the_image_folder_pipeline_decodes_through_to_rgb(tmp_path, cache_dir, clip_tokenizer):
    folder = tmp_path / "modes"
    folder.mkdir()
    pixels = np.zeros((32, 32, 4), dtype=np.uint8)
    pixels[:, :16] = (*MAGENTA, 0)
    pixels[:, 16:] = (0, 0, 0, 255)
    Image.fromarray(pixels, mode="RGBA").save(folder / "a.png")
    Image.fromarray(sixteen_bit_ramp(32)[:1].repeat(32, axis=0)).save(folder / "b.png")
    rows = [{"file_name": "a.png", "text": "transparent"}, {"file_name": "b.png", "text": "ramp"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = data.load_image_caption_dataset(train_data_dir=str(folder), cache_dir=cache_dir)
    dataset = data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32, center_crop=True))
    by_caption = {row: dataset[index]["pixel_values"] for index, row in enumerate(dataset.dataset["text"])}
    transparent = by_caption["transparent"]
    assert torch.equal(transparent[:, :, :16], torch.ones(3, 32, 16))
    assert torch.equal(transparent[:, :, 16:], -torch.ones(3, 32, 16))
    ramp = by_caption["ramp"][0, 0]
    assert ramp[0].item() == -1.0 and ramp[-1].item() == 1.0 and (ramp[1:] > ramp[:-1]).all()


def test_center_crop_keeps_the_middle_without_resizing():
    image = column_pattern(width=48, height=32)
    pixel_values, original_size, crop_top_left = data.ImagePreprocessor(32, center_crop=True).preprocess(image)
    assert original_size == (32, 48)
    assert crop_top_left == (0, 8)
    assert torch.equal(pixel_values, as_expected_tensor(image.crop((8, 0, 40, 32))))


def test_center_crop_of_a_tall_image_after_resizing():
    image = column_pattern(width=64, height=100)
    pixel_values, original_size, crop_top_left = data.ImagePreprocessor(32, center_crop=True).preprocess(image)
    # The shorter side becomes 32; the longer one int(32 * 100 / 64) = 50; round((50 - 32) / 2) = 9.
    resized = image.resize((32, 50), resample=Image.Resampling.LANCZOS)
    assert original_size == (100, 64)
    assert crop_top_left == (9, 0)
    assert torch.equal(pixel_values, as_expected_tensor(resized.crop((0, 9, 32, 41))))


def test_random_crop_draws_like_torchvision():
    image = column_pattern(width=48, height=32)
    preprocessor = data.ImagePreprocessor(16)  # resized to 24 x 16: top in [0, 0], left in [0, 8]
    resized = image.resize((24, 16), resample=Image.Resampling.LANCZOS)
    for seed in range(5):
        torch.manual_seed(seed)
        top = torch.randint(0, 1, size=(1,)).item()
        left = torch.randint(0, 9, size=(1,)).item()
        torch.manual_seed(seed)
        pixel_values, _, crop_top_left = preprocessor.preprocess(image)
        assert crop_top_left == (top, left)
        assert torch.equal(pixel_values, as_expected_tensor(resized.crop((left, top, left + 16, top + 16))))


def test_square_image_of_the_target_size_draws_nothing():
    preprocessor = data.ImagePreprocessor(16, random_flip=False)
    torch.manual_seed(0)
    preprocessor(noise_image(16, 16))
    after_preprocessing = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after_preprocessing, torch.rand(1))


def test_same_seed_same_crop_and_flip_other_seeds_differ():
    image = noise_image(60, 40)
    preprocessor = data.ImagePreprocessor(24, random_flip=True)
    outcomes = []
    for seed in range(8):
        torch.manual_seed(seed)
        first = preprocessor.preprocess(image)
        torch.manual_seed(seed)
        second = preprocessor.preprocess(image)
        assert torch.equal(first[0], second[0]) and first[2] == second[2]
        outcomes.append(first[0])
    assert sum(not torch.equal(outcomes[0], other) for other in outcomes[1:]) >= 5


def test_flip_mirrors_the_unflipped_crop_with_probability_one_half():
    image = noise_image(60, 40)
    plain = data.ImagePreprocessor(24, random_flip=False)
    flipping = data.ImagePreprocessor(24, random_flip=True)
    flips = []
    for seed in range(12):
        torch.manual_seed(seed)
        unflipped, _, (top, left) = plain.preprocess(image)
        expect_flip = torch.rand(1).item() < 0.5  # drawn after the crop, as RandomHorizontalFlip after RandomCrop
        torch.manual_seed(seed)
        pixel_values, _, crop_top_left = flipping.preprocess(image)
        if expect_flip:
            assert torch.equal(pixel_values, torch.flip(unflipped, dims=[-1]))
            # Resized to 36 x 24: the crop's left edge, seen in the mirrored image.
            assert crop_top_left == (top, 36 - left - 24)
        else:
            assert torch.equal(pixel_values, unflipped)
            assert crop_top_left == (top, left)
        flips.append(expect_flip)
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("name", ["bilinear", "bicubic", "box", "hamming", "lanczos", "nearest", "nearest_exact"])
def test_every_interpolation_mode_resizes(name):
    image = column_pattern(width=48, height=32)
    pixel_values = data.ImagePreprocessor(16, center_crop=True, interpolation=name)(image)
    resample = Image.Resampling.NEAREST if name == "nearest_exact" else Image.Resampling[name.upper()]
    expected = image.resize((24, 16), resample=resample).crop((4, 0, 20, 16))
    assert torch.equal(pixel_values, as_expected_tensor(expected))


def test_unknown_interpolation_lists_the_known_ones():
    with pytest.raises(ValueError, match="'cubic'.*bicubic, bilinear, box"):
        data.ImagePreprocessor(16, interpolation="cubic")


# --------------------------------------------------------------------------------------------------------------------
# Captions.
# --------------------------------------------------------------------------------------------------------------------


def test_captions_are_padded_to_the_tokenizer_length(clip_tokenizer):
    input_ids = data.tokenize_captions(["a red circle", "a blue square"], clip_tokenizer)
    assert input_ids.shape == (2, clip_tokenizer.model_max_length) == (2, 77)
    assert input_ids.dtype == torch.long
    # Start token, the three words, end token, then padding (the end token, as in CLIP) to the end.
    assert input_ids[0, 0].item() == clip_tokenizer.bos_token_id
    assert input_ids[0, 4].item() == clip_tokenizer.eos_token_id
    assert (input_ids[0, 5:] == clip_tokenizer.pad_token_id).all()
    assert clip_tokenizer.decode(input_ids[1], skip_special_tokens=True).strip() == "a blue square"


def test_long_captions_are_truncated(clip_tokenizer):
    input_ids = data.tokenize_captions([" ".join(["red"] * 200)], clip_tokenizer)
    assert input_ids.shape == (1, 77)
    assert input_ids[0, -1].item() == clip_tokenizer.eos_token_id


def test_one_of_several_captions_is_chosen(clip_tokenizer):
    options = ["a red circle", "a green square", "a blue triangle"]
    by_caption = {caption: data.tokenize_captions([caption], clip_tokenizer)[0] for caption in options}
    chosen = set()
    for seed in range(20):
        random.seed(seed)
        input_ids = data.tokenize_captions([options], clip_tokenizer)[0]
        chosen.update(caption for caption, ids in by_caption.items() if torch.equal(ids, input_ids))
    assert chosen == set(options)
    first = data.tokenize_captions([np.array(options)], clip_tokenizer, is_train=False)[0]
    assert torch.equal(first, by_caption["a red circle"])


def test_caption_of_another_type_raises(clip_tokenizer):
    with pytest.raises(ValueError, match="Caption column `text` should contain either strings or lists of strings"):
        data.tokenize_captions([42], clip_tokenizer)


# --------------------------------------------------------------------------------------------------------------------
# Bad captions: every row's value checked when the dataset is built, named by its file and line.
# --------------------------------------------------------------------------------------------------------------------

BAD_CAPTIONS = {
    "null": (None, "null"),
    "NaN": (float("nan"), "NaN"),
    "number": (42, "42 (int)"),
    "empty list": ([], "an empty list"),
    "list holding null": (["a cat", None], "a list holding null"),
    "list holding a number": (["a cat", 3.5], "a list holding 3.5 (float)"),
    "object": ({"en": "a cat"}, "{'en': 'a cat'} (dict)"),
}


@pytest.mark.parametrize("kind", list(BAD_CAPTIONS))
def test_caption_problem_names_each_kind(kind):
    value, words = BAD_CAPTIONS[kind]
    assert data.caption_problem(value) == words
    with pytest.raises(ValueError, match=re.escape(f"got {words}")):
        data.choose_caption(value)


@pytest.mark.parametrize("caption", ["a cat", "", ["a cat", "a dog"], np.array(["a cat"]), ("a", "b")])
def test_strings_and_lists_of_strings_are_captions(caption):
    assert data.caption_problem(caption) is None


def folder_with_captions(tiny_images_path, destination, captions: dict):
    """A copy of the tiny image folder whose metadata.jsonl gives rows `captions` ({line index: value}) instead."""
    shutil.copytree(tiny_images_path, destination)
    lines = (destination / "metadata.jsonl").read_text().splitlines()
    for index, value in captions.items():
        row = json.loads(lines[index])
        row["text"] = value
        lines[index] = json.dumps(row)
    (destination / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return destination


def test_null_captions_are_dropped_with_their_file_and_line(
    tiny_images_path, tmp_path, cache_dir, clip_tokenizer, caplog
):
    folder = folder_with_captions(tiny_images_path, tmp_path / "images", {2: None, 5: None})
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dataset = data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32))
    assert (len(dataset), dataset.skipped_captions, dataset.skipped_images) == (6, 2, 0)
    assert None not in list(dataset.dataset["text"])
    metadata = folder / "metadata.jsonl"
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "Dropping 2 of 8 rows whose caption in column 'text' is not usable" in warning
    assert f"{metadata} line 3): null" in warning and f"{metadata} line 6): null" in warning
    for index in range(len(dataset)):  # every row left is fetched and tokenized
        assert dataset[index]["input_ids"].shape == (77,)


def test_strict_refuses_a_null_caption_by_file_and_line(tiny_images_path, tmp_path, cache_dir, clip_tokenizer):
    folder = folder_with_captions(tiny_images_path, tmp_path / "images", {2: None})
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    with pytest.raises(ValueError) as error:
        data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32), strict=True)
    message = str(error.value)
    assert "1 of 8 captions in column 'text' are not usable" in message
    assert f"row 2 ({folder / 'metadata.jsonl'} line 3): null" in message and "--strict_data" in message


def test_list_captions_with_an_empty_list_or_a_null_entry_are_dropped(clip_tokenizer, caplog):
    images = [noise_image(8, 8, seed=seed) for seed in range(4)]
    captions = [["a", "b"], [], ["c", None], ["d"]]
    raw = datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dataset = data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(8))
    assert list(dataset.dataset["text"]) == [["a", "b"], ["d"]]
    assert "row 1: an empty list; row 2: a list holding null" in caplog.text


def test_a_csv_caption_file_with_an_empty_field_is_named_by_line(
    tiny_images_path, tmp_path, cache_dir, clip_tokenizer
):
    folder = tmp_path / "images"
    shutil.copytree(tiny_images_path, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").unlink()
    lines = ["file_name,text"] + [
        f"{row['file_name']},{'' if index == 4 else row['text']}" for index, row in enumerate(rows)
    ]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'metadata.csv'} line 6): null")):
        data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32), strict=True)


def test_only_bad_captions_raise(tiny_images_path, tmp_path, cache_dir, clip_tokenizer):
    folder = folder_with_captions(tiny_images_path, tmp_path / "images", dict.fromkeys(range(8)))
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="No row of the dataset has a usable caption in column 'text'"):
        data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32))


@pytest.mark.parametrize("value, kind", [(5, "a number"), (["a", None], "a list"), (float("nan"), "a number")])
def test_a_caption_of_another_json_type_is_named_by_file_and_line(tiny_images_path, tmp_path, cache_dir, value, kind):
    folder = folder_with_captions(tiny_images_path, tmp_path / "images", {3: value})
    with pytest.raises(ValueError) as error:
        data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    assert f'{folder / "metadata.jsonl"} line 4: "text" is {kind}' in str(error.value)
    assert "where line 1 has a string" in str(error.value)


# --------------------------------------------------------------------------------------------------------------------
# The text-to-image dataset.
# --------------------------------------------------------------------------------------------------------------------


def test_batches_of_the_tiny_image_folder(image_dataset, clip_tokenizer):
    preprocessor = data.ImagePreprocessor(32, center_crop=False, random_flip=True)
    dataset = data.make_text_to_image_dataset(image_dataset, [clip_tokenizer], preprocessor)
    assert len(dataset) == 8
    batch = data.collate_text_to_image([dataset[index] for index in range(4)])
    assert sorted(batch) == ["crop_top_lefts", "input_ids", "original_sizes", "pixel_values"]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].is_contiguous()
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["original_sizes"], torch.full((4, 2), 32))
    assert torch.equal(batch["crop_top_lefts"], torch.zeros(4, 2, dtype=torch.long))
    assert clip_tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True).strip() == "a green square"


def test_items_are_reproducible_from_the_torch_seed(image_dataset, clip_tokenizer):
    dataset = data.make_text_to_image_dataset(
        image_dataset, clip_tokenizer, data.ImagePreprocessor(32, random_flip=True)
    )
    flipped = []
    for seed in range(6):
        torch.manual_seed(seed)
        first = dataset[2]
        torch.manual_seed(seed)
        assert torch.equal(first["pixel_values"], dataset[2]["pixel_values"])
        flipped.append(not torch.equal(first["pixel_values"], data.ImagePreprocessor(32)(image_dataset[2]["image"])))
    assert 0 < sum(flipped) < len(flipped)  # augmentations happen on each fetch


def test_max_train_samples_follow_the_seed(image_dataset, clip_tokenizer):
    preprocessor = data.ImagePreprocessor(32)

    def chosen_captions(seed):
        dataset = data.make_text_to_image_dataset(
            image_dataset, [clip_tokenizer], preprocessor, max_train_samples=3, seed=seed
        )
        assert len(dataset) == 3
        return list(dataset.dataset["text"])

    assert chosen_captions(0) == chosen_captions(0)
    assert chosen_captions(0) == list(image_dataset.shuffle(seed=0).select(range(3))["text"])
    assert len({tuple(chosen_captions(seed)) for seed in range(5)}) > 1
    too_many = data.make_text_to_image_dataset(image_dataset, [clip_tokenizer], preprocessor, max_train_samples=100)
    assert len(too_many) == 8


def test_two_tokenizers_tokenize_the_same_chosen_caption(tiny_sdxl_path):
    tokenizers = [
        CLIPTokenizer.from_pretrained(tiny_sdxl_path, subfolder=name) for name in ("tokenizer", "tokenizer_2")
    ]
    options = ["a red circle", "a green square", "a blue triangle", "a yellow circle"]
    raw = datasets.Dataset.from_dict(
        {"image": [column_pattern(40, 32)] * 4, "text": [options] * 4},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.List(datasets.Value("string"))}),
    )
    dataset = data.make_text_to_image_dataset(raw, tokenizers, data.ImagePreprocessor(16, center_crop=True))
    for seed in range(6):
        random.seed(seed)
        item = dataset[seed % 4]
        assert item["input_ids"].shape == item["input_ids_2"].shape == (77,)
        first = tokenizers[0].decode(item["input_ids"], skip_special_tokens=True).strip()
        assert first == tokenizers[1].decode(item["input_ids_2"], skip_special_tokens=True).strip()
        assert first in options
        assert item["original_size"] == (32, 40) and item["crop_top_left"] == (0, 2)
    batch = data.collate_text_to_image([dataset[0], dataset[1]])
    assert batch["input_ids_2"].shape == (2, 77)
    assert batch["original_sizes"].tolist() == [[32, 40], [32, 40]]


def test_corrupt_image_is_dropped_with_one_warning(tiny_images_path, tmp_path, cache_dir, clip_tokenizer, caplog):
    folder = copy_image_folder(tiny_images_path, tmp_path / "images", corrupt_files=["0003.png"])
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    assert len(raw) == 8
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dataset = data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32))
    warnings = [record for record in caplog.records if record.name == LOGGER]
    assert len(warnings) == 1
    assert "Dropping 1 of 8 rows" in warnings[0].getMessage() and "0003.png" in warnings[0].getMessage()
    assert len(dataset) == 7
    assert "a yellow circle" not in list(dataset.dataset["text"])  # image 3's caption
    batch = data.collate_text_to_image([dataset[index] for index in range(7)])
    assert batch["pixel_values"].shape == (7, 3, 32, 32)


def test_corrupt_bytes_in_a_saved_dataset_are_dropped(image_dataset, clip_tokenizer, caplog):
    undecoded = image_dataset.cast_column("image", datasets.Image(decode=False))
    rows = [undecoded[index]["image"] for index in range(8)]
    images = [{"bytes": open(row["path"], "rb").read(), "path": None} for row in rows]
    images[1] = {"bytes": b"\x89PNG\r\n\x1a\n truncated", "path": None}
    raw = datasets.Dataset.from_dict(
        {"image": images, "text": list(image_dataset["text"])},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dataset = data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32))
    assert len(dataset) == 7
    assert "Dropping 1 of 8 rows" in caplog.text and "rows 1." in caplog.text


def test_only_corrupt_images_raise(tiny_images_path, tmp_path, cache_dir, clip_tokenizer):
    names = [f"{index:04d}.png" for index in range(8)]
    folder = copy_image_folder(tiny_images_path, tmp_path / "images", corrupt_files=names)
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="no readable images in column 'image'"):
        data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32))


def test_strict_rejects_corrupt_images_by_name(tiny_images_path, tmp_path, cache_dir, clip_tokenizer):
    folder = copy_image_folder(tiny_images_path, tmp_path / "images", corrupt_files=["0001.png", "0006.png"])
    raw = data.load_image_caption_dataset(train_data_dir=folder, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"2 of 8 images .* 1 \(.*0001.png\), 6 \(.*0006.png\)"):
        data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32), strict=True)
    lenient = data.make_text_to_image_dataset(raw, [clip_tokenizer], data.ImagePreprocessor(32))
    assert (len(lenient), lenient.skipped_images) == (6, 2)


# --------------------------------------------------------------------------------------------------------------------
# Causal language modelling text.
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_datasets(tiny_text_path, cache_dir):
    return data.load_text_datasets(
        train_file=str(tiny_text_path / "train.txt"),
        validation_file=str(tiny_text_path / "validation.txt"),
        cache_dir=cache_dir,
    )


@pytest.mark.parametrize("keep_linebreaks", [True, False])
def test_text_files_load_one_row_per_line(tiny_text_path, cache_dir, keep_linebreaks):
    raw = data.load_text_datasets(
        train_file=str(tiny_text_path / "train.txt"),
        validation_file=str(tiny_text_path / "validation.txt"),
        cache_dir=cache_dir,
        keep_linebreaks=keep_linebreaks,
    )
    assert (len(raw["train"]), len(raw["validation"])) == (600, 100)
    lines = (tiny_text_path / "train.txt").read_text().splitlines(keepends=keep_linebreaks)
    assert list(raw["train"]["text"]) == lines
    assert all(text.endswith("\n") == keep_linebreaks for text in raw["validation"]["text"])


def test_validation_is_split_off_the_start_of_train(tiny_text_path, cache_dir):
    raw = data.load_text_datasets(
        train_file=str(tiny_text_path / "train.txt"), validation_split_percentage=10, cache_dir=cache_dir
    )
    assert (len(raw["validation"]), len(raw["train"])) == (60, 540)
    lines = (tiny_text_path / "train.txt").read_text().splitlines(keepends=True)
    assert list(raw["validation"]["text"]) == lines[:60]
    assert list(raw["train"]["text"]) == lines[60:]


def test_text_sources_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--train_file"):
        data.load_text_datasets()
    with pytest.raises(ValueError, match=r"must end in \.txt, \.csv, \.json"):
        data.load_text_datasets(train_file=str(tmp_path / "train.parquet"))


def test_text_rows_that_are_not_text_are_dropped_by_line(tmp_path, cache_dir, caplog):
    rows = [{"text": "one two three"}, {"text": None}, {"text": "four five"}, {"text": None}, {"text": "six"}]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "seven"}) + "\n")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    raw = data.load_text_datasets(
        train_file=str(train_file), validation_file=str(tmp_path / "validation.jsonl"), cache_dir=cache_dir
    )
    assert list(raw["train"]["text"]) == ["one two three", "four five", "six"]
    assert f"Dropping 2 of 5 rows of {train_file} whose 'text' is not text: line 2: null; line 4: null" in caplog.text
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match="No row of .*empty.jsonl holds text in column 'text'"):
        data.load_text_datasets(train_file=str(tmp_path / "empty.jsonl"), cache_dir=cache_dir)


@pytest.mark.parametrize(
    "percent, rows, expected", [(0, 600, "1 or more"), (5, 3, "17 or more"), (1, 49, "2 or more")]
)
def test_a_validation_split_percentage_that_holds_out_nothing_names_the_flag(
    tmp_path, cache_dir, percent, rows, expected
):
    train_file = tmp_path / "train.txt"
    train_file.write_text("".join(f"line {index}\n" for index in range(rows)))
    with pytest.raises(ValueError) as error:
        data.load_text_datasets(train_file=str(train_file), validation_split_percentage=percent, cache_dir=cache_dir)
    message = str(error.value)
    assert f"--validation_split_percentage {percent} of the {rows} rows of {train_file} holds out no row" in message
    assert f"pass --validation_split_percentage {expected}, or a --validation_file" in message
    smallest = int(expected.split()[0])
    raw = data.load_text_datasets(
        train_file=str(train_file), validation_split_percentage=smallest, cache_dir=cache_dir
    )
    assert len(raw["validation"]) >= 1 and len(raw["validation"]) + len(raw["train"]) == rows


def test_a_validation_split_percentage_that_leaves_no_train_row_names_the_flag(tmp_path, cache_dir):
    train_file = tmp_path / "train.txt"
    train_file.write_text("only line\n")
    with pytest.raises(ValueError, match="--validation_split_percentage 99 of the 1 rows .* leaves no row to train"):
        data.load_text_datasets(train_file=str(train_file), validation_split_percentage=99, cache_dir=cache_dir)


def test_percent_split_equals_datasets_slicing(tmp_path, cache_dir):
    train_file = tmp_path / "train.txt"
    train_file.write_text("".join(f"line {index}\n" for index in range(37)))
    for percent in (3, 10, 50):
        raw = data.load_text_datasets(
            train_file=str(train_file), validation_split_percentage=percent, cache_dir=cache_dir
        )
        sliced = datasets.load_dataset(
            "text", data_files=str(train_file), split=f"train[:{percent}%]", cache_dir=cache_dir, keep_linebreaks=True
        )
        assert list(raw["validation"]["text"]) == list(sliced["text"])


def test_text_column_is_text_or_the_first():
    assert data.text_column_name(datasets.Dataset.from_dict({"id": [1], "text": ["a"]})) == "text"
    assert data.text_column_name(datasets.Dataset.from_dict({"body": ["a"], "title": ["b"]})) == "body"


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_tokens_are_grouped_into_full_blocks(model, tiny_dir, text_datasets):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / model)
    block_size = 48
    grouped = data.tokenize_and_group(text_datasets, tokenizer, block_size)
    for split in ("train", "validation"):
        rows = grouped[split]
        assert sorted(rows.column_names) == ["attention_mask", "input_ids", "labels"]
        total_tokens = sum(len(ids) for ids in tokenizer(list(text_datasets[split]["text"]))["input_ids"])
        assert len(rows) == total_tokens // block_size
        assert all(len(ids) == block_size for ids in rows["input_ids"])
        assert list(rows["labels"]) == list(rows["input_ids"])
        assert all(set(mask) == {1} for mask in rows["attention_mask"])
    first_tokens = tokenizer(text_datasets["train"][0]["text"])["input_ids"]
    assert grouped["train"][0]["input_ids"][: len(first_tokens)] == first_tokens
    batch = data.causal_lm_collate([grouped["train"][0], grouped["train"][1]])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, block_size)
    assert batch["input_ids"].dtype == torch.long


def test_block_size_rules(tiny_llama_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert tokenizer.model_max_length == 256
    assert data.resolve_block_size(tokenizer) == 256
    assert data.resolve_block_size(tokenizer, 64) == 64
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert data.resolve_block_size(tokenizer, 512) == 256
    assert "The block_size passed (512) is larger than the maximum length for the model (256)" in caplog.text
    tokenizer.model_max_length = int(1e30)  # what tokenizers without a known length report
    assert data.resolve_block_size(tokenizer) == 1024
    assert data.resolve_block_size(tokenizer, max_position_embeddings=128) == 128
    assert data.resolve_block_size(tokenizer, 4096) == 4096


def test_block_size_never_exceeds_the_models_positions(tiny_gpt2_path, caplog):
    config = AutoConfig.from_pretrained(tiny_gpt2_path)
    config.n_positions = 64
    assert data.max_positions(config) == 64  # GPT-2's n_positions, through transformers' attribute map
    assert data.max_positions({"n_positions": 64, "vocab_size": 10}) == 64  # a config.json read as a dict
    assert data.max_positions({"vocab_size": 10}) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    tokenizer.model_max_length = 1024
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert data.resolve_block_size(tokenizer, 128, data.max_positions(config)) == 64
    assert "--block_size 128 is more than the model's 64 positions" in caplog.text
    assert "Pass --block_size 64 or less" in caplog.text
    assert data.resolve_block_size(tokenizer, 48, 64) == 48
    assert data.resolve_block_size(tokenizer, None, 64) == 64
    assert data.resolve_block_size(tokenizer, 2048, 4096) == 1024  # the tokenizer's limit first, as upstream


@pytest.fixture(scope="module")
def tiny_sd_configs(tiny_sd_path):
    text_encoder = AutoConfig.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    vae = json.loads((tiny_sd_path / "vae" / "config.json").read_text())
    return {"text_encoder": text_encoder}, vae


def test_text_to_image_limits_pass_for_the_tiny_pipeline(clip_tokenizer, tiny_sd_configs):
    text_encoders, vae = tiny_sd_configs
    assert data.vae_scale_factor(vae) == 2 ** (len(vae["block_out_channels"]) - 1)
    data.check_text_to_image_limits(32, [clip_tokenizer], text_encoders, vae)


def test_resolution_must_be_a_multiple_of_the_vae_scale_factor(clip_tokenizer, tiny_sd_configs):
    text_encoders, vae = tiny_sd_configs
    sd_vae = {"block_out_channels": [128, 256, 512, 512]}
    assert data.vae_scale_factor(sd_vae) == 8
    with pytest.raises(ValueError, match=r"--resolution 500 is not a multiple of 8.*pass --resolution 496 or 504"):
        data.check_text_to_image_limits(500, [clip_tokenizer], text_encoders, sd_vae)
    with pytest.raises(ValueError, match=r"--resolution 5 is not a multiple of 8.*pass --resolution 8\."):
        data.check_text_to_image_limits(5, [clip_tokenizer], text_encoders, sd_vae)


def test_tokenizer_longer_or_larger_than_the_text_encoder_is_refused(tiny_sd_path, tiny_sd_configs):
    text_encoders, vae = tiny_sd_configs
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    tokenizer.model_max_length = 128
    tokenizer.add_tokens([f"<extra{index}>" for index in range(3)])
    vocab_size = text_encoders["text_encoder"].vocab_size
    with pytest.raises(ValueError) as error:
        data.check_text_to_image_limits(32, [tokenizer], text_encoders, vae)
    message = str(error.value)
    assert "tokenizer pads captions to 128 tokens (model_max_length) but text_encoder has 77 positions" in message
    assert "set model_max_length to 77 in tokenizer/tokenizer_config.json" in message
    assert f"tokenizer has {vocab_size + 3} tokens but text_encoder embeds {vocab_size} (vocab_size)" in message


def test_a_tokenizer_with_more_tokens_than_embedding_rows_is_refused(tiny_gpt2_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    config = AutoConfig.from_pretrained(tiny_gpt2_path)
    data.check_vocabulary(tokenizer, config)  # the model's own tokenizer fits
    data.check_vocabulary(tokenizer, {"vocab_size": len(tokenizer)})
    with pytest.raises(ValueError, match=f"The tokenizer has {len(tokenizer)} tokens but llm embeds 10 \\(vocab_size"):
        data.check_vocabulary(tokenizer, {"vocab_size": 10}, role="llm")
