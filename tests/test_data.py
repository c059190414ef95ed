"""The datasets of both trainers on the tiny image folder, tokenizers and text corpus: upstream's preprocessing,
reproducible augmentations, corrupt images dropped, and token blocks of the requested size."""

import logging
import random
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPTokenizer

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
