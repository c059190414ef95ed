"""Bad input costs seconds: a clear error naming the culprit, a non-zero exit, no model loaded and nothing written.

The flag checks of `args.py` have their own tests (test_args.py); these run the trainers' entry points on bad data
and bad environments.
"""

import json
import logging
import math
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train_text_to_image import train_argv

from diffusers_lowmem import train_causal_lm, train_text_to_image


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a trainer gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(train_text_to_image, "load_models", refuse)
    monkeypatch.setattr(train_causal_lm, "load_model", refuse)


def image_folder(tiny_images_path, destination, corrupt=(), captions=True):
    shutil.copytree(tiny_images_path, destination)
    for name in corrupt:
        (destination / name).write_bytes(b"not a png" * 20)
    if not captions:
        (destination / "metadata.jsonl").unlink()
    return destination


def run_text_to_image(*argv):
    return train_text_to_image.main(train_text_to_image.parse_args(list(argv)))


def assert_exit(error, *expected):
    assert error.value.code not in (0, None)
    for text in expected:
        assert text in str(error.value.code)


def test_image_folder_without_captions_names_metadata_and_columns(
    tiny_sd_path, tiny_images_path, tmp_path, no_model_loading
):
    folder = image_folder(tiny_images_path, tmp_path / "images", captions=False)
    with pytest.raises(SystemExit) as error:
        run_text_to_image(*train_argv(tiny_sd_path, folder, tmp_path / "out"))
    assert_exit(error, "--caption_column 'text' is not a column", "its columns are: image", "metadata.jsonl")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--image_column", "picture"), ("--caption_column", "prompt")])
def test_missing_column_lists_the_columns(flag, value, tiny_sd_path, tiny_images_path, tmp_path, no_model_loading):
    with pytest.raises(SystemExit) as error:
        run_text_to_image(*train_argv(tiny_sd_path, tiny_images_path, tmp_path / "out", flag, value))
    assert_exit(error, f"{flag} '{value}' is not a column", "its columns are: image, text")
    assert not (tmp_path / "out").exists()


def test_strict_data_rejects_a_corrupt_image_by_name(tiny_sd_path, tiny_images_path, tmp_path, no_model_loading):
    folder = image_folder(tiny_images_path, tmp_path / "images", corrupt=["0002.png"])
    with pytest.raises(SystemExit) as error:
        run_text_to_image(*train_argv(tiny_sd_path, folder, tmp_path / "out", "--strict_data"))
    assert_exit(error, "1 of 8 images", "0002.png", "--strict_data")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_is_skipped_named_and_counted(tiny_sd_path, tiny_images_path, tmp_path, caplog):
    folder = image_folder(tiny_images_path, tmp_path / "images", corrupt=["0002.png", "0005.png"])
    caplog.set_level(logging.WARNING)
    summary = run_text_to_image(*train_argv(tiny_sd_path, folder, tmp_path / "out", "--max_train_steps", "2"))
    assert summary["global_step"] == 2
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(
        "Dropping 2 of 8 rows" in message and "0002.png" in message and "0005.png" in message for message in messages
    )
    assert any("without 2 unreadable image(s)" in message for message in messages)  # the count again, at the end
    assert json.loads((tmp_path / "out" / "training_summary.json").read_text())["skipped_images"] == 2


def test_a_folder_of_only_corrupt_images_fails_before_loading(
    tiny_sd_path, tiny_images_path, tmp_path, no_model_loading
):
    names = [f"{index:04d}.png" for index in range(8)]
    folder = image_folder(tiny_images_path, tmp_path / "images", corrupt=names)
    with pytest.raises(SystemExit) as error:
        run_text_to_image(*train_argv(tiny_sd_path, folder, tmp_path / "out"))
    assert_exit(error, "no readable images", "0000.png")
    assert not (tmp_path / "out").exists()


def causal_argv(llama_path, train_file, output_dir, *extra):
    return [
        "--model_name_or_path", str(llama_path),
        "--train_file", str(train_file),
        "--block_size", "32",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("trainer", ["text-to-image", "causal-lm"])
@pytest.mark.parametrize("case", ["output dir under a file", "output dir is a file", "fp16 without a GPU"])
def test_environment_errors_exit_2_before_anything(
    trainer, case, tiny_sd_path, tiny_images_path, tiny_llama_path, tiny_text_path, tmp_path, capsys
):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output_dir, extra, expected = tmp_path / "out", [], []
    if case == "output dir under a file":
        output_dir, expected = blocker / "out", ["cannot be created", "is a file"]
    elif case == "output dir is a file":
        output_dir, expected = blocker, ["is a file"]
    else:
        extra, expected = ["--mixed_precision", "fp16"], ["fp16 needs a CUDA GPU", "bf16"]
    if trainer == "text-to-image":
        parse, argv = train_text_to_image.parse_args, train_argv(tiny_sd_path, tiny_images_path, output_dir, *extra)
    else:
        parse = train_causal_lm.parse_args
        argv = causal_argv(tiny_llama_path, tiny_text_path / "train.txt", output_dir, *extra)
    with pytest.raises(SystemExit) as error:
        parse(argv)
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert all(text in message for text in expected), message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


# --------------------------------------------------------------------------------------------------------------------
# Bad rows and limits the model sets: refused (or clamped, skipped) before any model loads.
# --------------------------------------------------------------------------------------------------------------------


def with_null_caption(tiny_images_path, destination, line_index=2):
    folder = image_folder(tiny_images_path, destination)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[line_index])
    row["text"] = None
    lines[line_index] = json.dumps(row)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_strict_data_refuses_a_null_caption_by_file_and_line(
    tiny_sd_path, tiny_images_path, tmp_path, no_model_loading
):
    folder = with_null_caption(tiny_images_path, tmp_path / "images")
    with pytest.raises(SystemExit) as error:
        run_text_to_image(*train_argv(tiny_sd_path, folder, tmp_path / "out", "--strict_data"))
    assert_exit(error, "Bad training data:", f"{folder / 'metadata.jsonl'} line 3): null", "--strict_data")
    assert not (tmp_path / "out").exists()


def test_a_null_caption_is_skipped_and_named_and_training_runs_past_step_two(
    tiny_sd_path, tiny_images_path, tmp_path, caplog
):
    folder = with_null_caption(tiny_images_path, tmp_path / "images")
    caplog.set_level(logging.WARNING)
    argv = train_argv(tiny_sd_path, folder, tmp_path / "out", "--max_train_steps", "4", "--checkpointing_steps", "1")
    summary = run_text_to_image(*argv)
    assert summary["global_step"] == 4  # every row fetched: 7 rows, batch 2
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("Dropping 1 of 8 rows whose caption" in message and "line 3): null" in message for message in warnings)


def test_a_tokenizer_longer_than_the_text_encoders_positions_is_refused(
    tiny_sd_path, tiny_images_path, tmp_path, no_model_loading
):
    pipeline = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, pipeline)
    config_path = pipeline / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = 100
    config_path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as error:
        run_text_to_image(*train_argv(pipeline, tiny_images_path, tmp_path / "out"))
    assert_exit(error, "pads captions to 100 tokens (model_max_length) but text_encoder has 77 positions")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def short_gpt2(tiny_gpt2_path, tmp_path):
    """The tiny GPT-2 with 64 positions (`n_positions`), saved with a tokenizer that allows 1024 tokens."""
    from transformers import AutoConfig, AutoTokenizer, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(tiny_gpt2_path)
    config.n_positions = 64
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_path)
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_block_size_beyond_the_models_positions_is_clamped_with_a_warning(
    short_gpt2, tiny_text_path, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    argv = causal_argv(short_gpt2, tiny_text_path / "train.txt", tmp_path / "out", "--max_train_steps", "2")
    argv[argv.index("--block_size") + 1] = "128"
    argv += ["--validation_file", str(tiny_text_path / "validation.txt")]
    summary = train_causal_lm.main(train_causal_lm.parse_args(argv))  # was: IndexError at the first step
    assert summary["global_step"] == 2 and math.isfinite(summary["loss"])
    assert "--block_size 128 is more than the model's 64 positions" in caplog.text


def test_text_shorter_than_one_block_is_bad_data_before_loading(tiny_llama_path, tmp_path, no_model_loading):
    (tmp_path / "train.txt").write_text("a few words\n")  # 12 tokens of the tiny Llama tokenizer
    (tmp_path / "validation.txt").write_text("a few words\n" * 3)
    argv = causal_argv(tiny_llama_path, tmp_path / "train.txt", tmp_path / "out")
    argv += ["--validation_file", str(tmp_path / "validation.txt")]
    with pytest.raises(SystemExit) as error:
        train_causal_lm.main(train_causal_lm.parse_args(argv))
    assert_exit(error, "Bad training data:", "fewer than --block_size 32 tokens", "lower --block_size or add text")
    assert not (tmp_path / "out").exists()


def test_a_validation_split_percentage_that_holds_out_nothing_is_bad_data(tiny_llama_path, tmp_path, no_model_loading):
    (tmp_path / "train.txt").write_text("".join(f"line {index} of some text\n" for index in range(10)))
    argv = causal_argv(tiny_llama_path, tmp_path / "train.txt", tmp_path / "out", "--validation_split_percentage", "4")
    with pytest.raises(SystemExit) as error:
        train_causal_lm.main(train_causal_lm.parse_args(argv))
    assert_exit(
        error,
        "Bad training data: --validation_split_percentage 4 of the 10 rows",
        "pass --validation_split_percentage 6 or more, or a --validation_file",  # 5 % of 10 rounds to 0,
    )
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_an_architectures_embedding_is_refused(
    tiny_llama_path, tiny_text_path, tmp_path, no_model_loading
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    tokenizer.add_tokens([f"<extra{index}>" for index in range(1001 - len(tokenizer))])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    argv = causal_argv("architecture:tiny-llama", tiny_text_path / "train.txt", tmp_path / "out")
    argv += [
        "--tokenizer_name",
        str(tmp_path / "tokenizer"),
        "--validation_file",
        str(tiny_text_path / "validation.txt"),
    ]
    with pytest.raises(SystemExit) as error:
        train_causal_lm.main(train_causal_lm.parse_args(argv))
    assert_exit(error, "The tokenizer has 1001 tokens but the model embeds 1000 (vocab_size of its config)")
    assert not (tmp_path / "out").exists()


def test_targets_that_match_no_layer_end_with_a_message_naming_the_model_and_what_to_pass(
    tiny_sd_path, tiny_images_path, tmp_path
):
    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--target_modules", "unet:nonexistent_xyz")
    with pytest.raises(SystemExit) as exit_info:
        train_text_to_image.main(train_text_to_image.parse_args(argv))
    message = str(exit_info.value)
    assert message.startswith("Bad adapter targets:") and "unet" in message and "--target_modules" in message
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
