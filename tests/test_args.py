"""The trainers' command lines: parity with the upstream scripts' flags, our groups, and the validators' errors."""

import argparse
import re
from pathlib import Path

import pytest

from diffusers_lowmem.adapters import AdapterConfig
from diffusers_lowmem.args import (
    adapter_config_from_args,
    causal_lm_parser,
    parse_spec,
    parser_actions,
    spec_value,
    text_to_image_parser,
    validate_causal_lm_args,
    validate_text_to_image_args,
)

SPEC_DIR = Path(__file__).parent / "spec"
TEXT_TO_IMAGE_SPEC = parse_spec(SPEC_DIR / "train_text_to_image_lora.flags")
CAUSAL_LM_SPEC = parse_spec(SPEC_DIR / "run_clm_no_trainer.flags")
SDXL_SPEC = parse_spec(SPEC_DIR / "train_text_to_image_lora_sdxl.flags")
# Upstream's `--lr_scheduler_type` is a `transformers.SchedulerType`, whose values are the str choices we accept.
SPEC_TYPES = {"str": str, "int": int, "float": float, "SchedulerType": str}
# Choices the spec describes in words rather than listing: the installed transformers decides them.
CHOICES_NOT_LISTED = {"--model_type"}


@pytest.fixture(scope="module")
def t2i_actions():
    return parser_actions(text_to_image_parser())


@pytest.fixture(scope="module")
def clm_actions():
    return parser_actions(causal_lm_parser())


def expected_default(attributes: dict):
    if "default" in attributes:
        return spec_value(attributes["default"])
    return False if spec_value(attributes.get("action", "None")) == "store_true" else None


def expected_choices(raw: str) -> list:
    """`['no', 'fp16']` as a list literal, or the names in parentheses of a description like `names of X (a, b)`."""
    if raw.startswith("["):
        return spec_value(raw)
    return re.search(r"\((.*)\)", raw).group(1).split(", ")


def assert_matches_spec(flag: str, attributes: dict, action: argparse.Action) -> None:
    assert action.default == expected_default(attributes), flag
    if "type" in attributes:
        assert action.type is SPEC_TYPES[attributes["type"]], flag
    if "action" in attributes:
        assert isinstance(action, argparse._StoreTrueAction) == (spec_value(attributes["action"]) == "store_true")
    if "choices" in attributes and flag not in CHOICES_NOT_LISTED:
        assert list(action.choices) == expected_choices(attributes["choices"]), flag
    if "required" in attributes:
        assert action.required == spec_value(attributes["required"]), flag


# --------------------------------------------------------------------------------------------------------------------
# Parity with upstream
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", list(TEXT_TO_IMAGE_SPEC))
def test_text_to_image_parser_accepts_upstream_flag(flag, t2i_actions):
    assert flag in t2i_actions, f"{flag} of train_text_to_image_lora.py is missing"
    assert_matches_spec(flag, TEXT_TO_IMAGE_SPEC[flag], t2i_actions[flag])


@pytest.mark.parametrize("flag", list(CAUSAL_LM_SPEC))
def test_causal_lm_parser_accepts_upstream_flag(flag, clm_actions):
    assert flag in clm_actions, f"{flag} of run_clm_no_trainer.py is missing"
    assert_matches_spec(flag, CAUSAL_LM_SPEC[flag], clm_actions[flag])


def test_causal_lm_special_flags(clm_actions):
    assert clm_actions["--validation_split_percentage"].default == 5
    assert "llama" in clm_actions["--model_type"].choices
    assert clm_actions["--lr_scheduler_type"].default == "linear"


def test_sdxl_spec_agrees_with_text_to_image_spec_on_shared_flags():
    # Informational: the SDXL script shares most flags; where both define one, the defaults agree except the
    # resolution (1024 for SDXL), so an SDXL command line means the same thing here.
    shared = set(SDXL_SPEC) & set(TEXT_TO_IMAGE_SPEC)
    different = {
        flag for flag in shared if expected_default(SDXL_SPEC[flag]) != expected_default(TEXT_TO_IMAGE_SPEC[flag])
    }
    assert len(shared) > 40
    assert different == {"--resolution"}


def test_parse_spec_reads_raw_values_and_drops_comments(tmp_path):
    spec = tmp_path / "x.flags"
    spec.write_text(
        "# header\n\n--a | type=str; default=None  (csv, json or txt)\n--b | action='store_true'\n"
        "--c | type=str; choices=names (x, y)\n--b | action='store_true'; default=False\n"
    )
    assert parse_spec(spec) == {
        "--a": {"type": "str", "default": "None"},
        "--b": {"action": "'store_true'", "default": "False"},
        "--c": {"type": "str", "choices": "names (x, y)"},
    }


# --------------------------------------------------------------------------------------------------------------------
# Our flags
# --------------------------------------------------------------------------------------------------------------------

SHARED_DEFAULTS = {
    "adapter": "lora",
    "rank": 4,
    "adapter_alpha": None,
    "conv_rank": None,
    "conv_alpha": None,
    "lokr_factor": -1,
    "adapter_dropout": 0.0,
    "target_modules": None,
    "quant": None,
    "quant_skip": None,
    "memory_log_steps": 1,
    "skip_nonfinite_loss": False,
}
TEXT_TO_IMAGE_DEFAULTS = {
    **SHARED_DEFAULTS,
    "train_text_encoder": False,
    "text_encoder_lr": None,
    "cache_latents": False,
    "strict_data": False,
}
CAUSAL_LM_DEFAULTS = {
    **SHARED_DEFAULTS,
    "mixed_precision": None,
    "gradient_checkpointing": False,
    "use_8bit_adam": False,
    "checkpoints_total_limit": None,
    "logging_dir": "logs",
}


def test_text_to_image_our_flags_defaults():
    args = text_to_image_parser().parse_args(["--pretrained_model_name_or_path", "x"])
    assert {name: getattr(args, name) for name in TEXT_TO_IMAGE_DEFAULTS} == TEXT_TO_IMAGE_DEFAULTS


def test_causal_lm_our_flags_defaults():
    args = causal_lm_parser().parse_args([])
    assert {name: getattr(args, name) for name in CAUSAL_LM_DEFAULTS} == CAUSAL_LM_DEFAULTS
    assert not hasattr(args, "cache_latents") and not hasattr(args, "strict_data")


def test_our_flags_choices(t2i_actions, clm_actions):
    for actions in (t2i_actions, clm_actions):
        assert list(actions["--adapter"].choices) == ["lora", "loha", "lokr", "locon"]
        assert list(actions["--quant"].choices) == ["8bit", "nf4"]
        assert list(actions["--mixed_precision"].choices) == ["no", "fp16", "bf16"]
        assert actions["--target_modules"].nargs == "+"
        assert actions["--quant_skip"].nargs == "*"  # no pattern: quantize every layer


def test_list_flags_parse_to_lists():
    args = causal_lm_parser().parse_args(["--target_modules", "q_proj", "v_proj", "--quant_skip", "lm_head"])
    assert args.target_modules == ["q_proj", "v_proj"]
    assert args.quant_skip == ["lm_head"]
    assert causal_lm_parser().parse_args(["--quant_skip"]).quant_skip == []


@pytest.mark.parametrize("make_parser", [text_to_image_parser, causal_lm_parser])
def test_every_flag_has_help_and_help_renders(make_parser):
    parser = make_parser()
    missing = [action.option_strings for action in parser._actions if not (action.help or "").strip()]
    assert missing == []
    text = parser.format_help()
    assert "drop-in" in text and "Adapter (LyCORIS)" in text and "(default: lora)" in text
    for group in ("Quantization (bitsandbytes)", "Optimizer", "Evaluation", "Memory", "Reliability"):
        assert f"\n{group}:\n" in text, group
    assert "paged_adamw8bit" in text and ("--validation_loss_steps" in text or "--eval_steps" in text)


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a square"}\n')
    return folder


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    return path


def parse_text_to_image(argv):
    parser = text_to_image_parser()
    args = parser.parse_args(argv)
    validate_text_to_image_args(args, parser)
    return args


def parse_causal_lm(argv):
    parser = causal_lm_parser()
    args = parser.parse_args(argv)
    validate_causal_lm_args(args, parser)
    return args


def assert_usage_error(parse, argv, capsys, *expected):
    with pytest.raises(SystemExit) as raised:
        parse(argv)
    assert raised.value.code == 2
    stderr = capsys.readouterr().err
    for text in expected:
        assert text in stderr, stderr


def test_valid_text_to_image_command_passes(image_dir, tmp_path):
    args = parse_text_to_image(
        ["--pretrained_model_name_or_path", "architecture:tiny-sd", "--train_data_dir", str(image_dir)]
        + ["--adapter", "lokr", "--quant", "nf4", "--resolution", "64", "--output_dir", str(tmp_path / "out")]
    )
    assert args.adapter == "lokr" and args.quant == "nf4" and args.resolution == 64


@pytest.mark.parametrize(
    "model", ["stable-diffusion-v1-5/stable-diffusion-v1-5", "architecture:sd15", "architecture:tiny-sdxl"]
)
def test_text_to_image_accepts_hub_ids_and_architectures(model, image_dir, hub_online):
    parse_text_to_image(["--pretrained_model_name_or_path", model, "--train_data_dir", str(image_dir)])


def test_text_to_image_accepts_dataset_name_and_local_model(tmp_path):
    parse_text_to_image(["--pretrained_model_name_or_path", str(tmp_path), "--dataset_name", "org/data"])


def test_valid_causal_lm_command_passes(text_file, tmp_path):
    validation_file = tmp_path / "validation.txt"
    validation_file.write_text("bye\n")
    args = parse_causal_lm(
        ["--model_name_or_path", "architecture:tiny-llama", "--train_file", str(text_file)]
        + ["--validation_file", str(validation_file), "--checkpointing_steps", "epoch", "--block_size", "32"]
        + ["--validation_split_percentage", "10", "--adapter", "loha", "--quant", "8bit"]
    )
    assert args.validation_split_percentage == 10 and args.checkpointing_steps == "epoch"


@pytest.mark.parametrize("model", ["gpt2", "openai-community/gpt2", "architecture:llama2-7b"])
def test_causal_lm_accepts_hub_ids_and_architectures(model, hub_online):
    parse_causal_lm(["--model_name_or_path", model, "--dataset_name", "wikitext", "--checkpointing_steps", "100"])


@pytest.fixture
def hub_online(monkeypatch):
    """Hub ids as they are checked with the Hub reachable (CI sets HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_offline_with_cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set and a Hub cache holding `org/cached` (a snapshot with its `refs/main`)."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("trainer", ["text-to-image", "causal-lm"])
def test_offline_a_hub_id_must_be_cached_and_a_mistyped_path_says_so(
    trainer, hub_offline_with_cache, image_dir, capsys
):
    # `tiny/lama` meant as a local folder: offline, it used to pass as a Hub id and fail after the data was built.
    def argv(model):
        if trainer == "text-to-image":
            return ["--pretrained_model_name_or_path", model, "--train_data_dir", str(image_dir)]
        return ["--model_name_or_path", model, "--dataset_name", "wikitext"]

    parse = parse_text_to_image if trainer == "text-to-image" else parse_causal_lm
    assert_usage_error(parse, argv("tiny/lama"), capsys, "'tiny/lama' is not a local path", "HF_HUB_OFFLINE is set")
    parse(argv("org/cached"))  # in the cache: accepted offline
    if trainer == "text-to-image":  # --revision: that revision must be cached
        assert_usage_error(parse, [*argv("org/cached"), "--revision", "v2"], capsys, "'org/cached'", "HF_HUB_OFFLINE")


def _t2i(image_dir, *extra):
    return ["--pretrained_model_name_or_path", "architecture:tiny-sd", "--train_data_dir", str(image_dir), *extra]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--resolution", "500"], ["--resolution 500", "496 or 504"]),
        (["--resolution", "0"], ["--resolution 0"]),
        (["--rank", "0"], ["--rank 0"]),
        (["--adapter_alpha", "0"], ["--adapter_alpha 0"]),
        (["--conv_rank", "0"], ["--conv_rank 0"]),
        (["--conv_alpha", "-1"], ["--conv_alpha -1"]),
        (["--lokr_factor", "0"], ["--lokr_factor 0", "-1"]),
        (["--adapter_dropout", "1.0"], ["--adapter_dropout 1.0"]),
        (["--train_batch_size", "0"], ["--train_batch_size 0"]),
        (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps 0"]),
        (["--checkpointing_steps", "0"], ["--checkpointing_steps 0"]),
        (["--memory_log_steps", "0"], ["--memory_log_steps 0"]),
        (["--checkpoints_total_limit", "0"], ["--checkpoints_total_limit 0"]),
        (["--learning_rate", "0"], ["--learning_rate 0"]),
        (["--text_encoder_lr", "1e-5"], ["--text_encoder_lr", "--train_text_encoder"]),
        (["--resume_from_checkpoint", "checkpoint-9"], ["--resume_from_checkpoint", "latest"]),
        (["--adapter", "dora"], ["--adapter", "invalid choice"]),
        (["--quant", "4bit"], ["--quant", "invalid choice"]),
        (["--image_interpolation_mode", "cubic"], ["--image_interpolation_mode"]),
        (["--lr_scheduler", "cosin"], ["--lr_scheduler 'cosin'", "cosine_with_restarts"]),
        (["--prediction_type", "v-prediction"], ["--prediction_type 'v-prediction'", "v_prediction"]),
    ],
)
def test_text_to_image_rejects_bad_value(extra, expected, image_dir, capsys):
    assert_usage_error(parse_text_to_image, _t2i(image_dir, *extra), capsys, *expected)


@pytest.mark.parametrize(
    "model, expected",
    [
        ("architecture:sd99", ["architecture:sd99", "architecture:tiny-sd"]),
        ("architecture:llama2-7b", ["not a text-to-image architecture"]),
        ("./no/such/model", ["--pretrained_model_name_or_path", "org/name"]),
        ("sd15", ["architecture:sd15"]),
    ],
)
def test_text_to_image_rejects_bad_model(model, expected, image_dir, capsys):
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", str(image_dir)]
    assert_usage_error(parse_text_to_image, argv, capsys, *expected)


def test_text_to_image_needs_data(capsys):
    argv = ["--pretrained_model_name_or_path", "architecture:tiny-sd"]
    assert_usage_error(parse_text_to_image, argv, capsys, "Need either a dataset name or a training folder.")


def test_text_to_image_rejects_missing_and_empty_data_dir(tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", "architecture:tiny-sd", "--train_data_dir"]
    assert_usage_error(
        parse_text_to_image, argv + [str(tmp_path / "nope")], capsys, "--train_data_dir", "not a folder"
    )
    assert_usage_error(parse_text_to_image, argv + [str(tmp_path)], capsys, "--train_data_dir", "no files")


def test_resume_from_checkpoint_found_under_output_dir(image_dir, tmp_path):
    (tmp_path / "out" / "checkpoint-10").mkdir(parents=True)
    argv = _t2i(image_dir, "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "checkpoint-10")
    assert parse_text_to_image(argv).resume_from_checkpoint == "checkpoint-10"
    parse_text_to_image(_t2i(image_dir, "--resume_from_checkpoint", "latest"))


def _clm(text_file, *extra):
    return ["--model_name_or_path", "architecture:tiny-llama", "--train_file", str(text_file), *extra]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--checkpointing_steps", "abc"], ["--checkpointing_steps 'abc'", "epoch"]),
        (["--checkpointing_steps", "0"], ["--checkpointing_steps '0'"]),
        (["--block_size", "0"], ["--block_size 0"]),
        (["--validation_split_percentage", "100"], ["--validation_split_percentage 100"]),
        (["--per_device_train_batch_size", "0"], ["--per_device_train_batch_size 0"]),
        (["--rank", "0"], ["--rank 0"]),
        (["--lokr_factor", "-2"], ["--lokr_factor -2"]),
        (["--adapter_dropout", "-0.1"], ["--adapter_dropout -0.1"]),
        (["--memory_log_steps", "0"], ["--memory_log_steps 0"]),
        (["--lr_scheduler_type", "exotic"], ["--lr_scheduler_type", "invalid choice"]),
        (["--mixed_precision", "fp8"], ["--mixed_precision", "invalid choice"]),
    ],
)
def test_causal_lm_rejects_bad_value(extra, expected, text_file, capsys):
    assert_usage_error(parse_causal_lm, _clm(text_file, *extra), capsys, *expected)


def test_causal_lm_needs_data_and_model(text_file, capsys):
    assert_usage_error(
        parse_causal_lm,
        ["--model_name_or_path", "gpt2"],
        capsys,
        "Need either a dataset name or a training/validation file.",
    )
    assert_usage_error(
        parse_causal_lm, ["--train_file", str(text_file)], capsys, "--model_name_or_path", "architecture:llama2-7b"
    )


def test_causal_lm_rejects_bad_data_files(tmp_path, text_file, capsys):
    parquet = tmp_path / "train.parquet"
    parquet.write_text("")
    json_file = tmp_path / "validation.json"
    json_file.write_text("{}")
    model = ["--model_name_or_path", "architecture:tiny-llama"]
    assert_usage_error(
        parse_causal_lm, model + ["--train_file", str(tmp_path / "missing.txt")], capsys, "--train_file", "not exist"
    )
    assert_usage_error(parse_causal_lm, model + ["--train_file", str(parquet)], capsys, "--train_file", "csv, json")
    argv = model + ["--train_file", str(text_file), "--validation_file", str(json_file)]
    assert_usage_error(parse_causal_lm, argv, capsys, "--validation_file", "extension")


def test_causal_lm_rejects_bad_model(text_file, capsys):
    argv = ["--train_file", str(text_file), "--model_name_or_path"]
    assert_usage_error(parse_causal_lm, argv + ["architecture:tiny-sd"], capsys, "architecture:tiny-llama")
    assert_usage_error(parse_causal_lm, argv + ["../missing/model"], capsys, "--model_name_or_path")


# --------------------------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------------------------


def test_adapter_config_from_args_round_trip():
    args = causal_lm_parser().parse_args(
        ["--adapter", "lokr", "--rank", "8", "--adapter_alpha", "4", "--conv_rank", "2", "--conv_alpha", "1"]
        + ["--lokr_factor", "4", "--adapter_dropout", "0.1", "--target_modules", "q_proj", "v_proj"]
    )
    config = adapter_config_from_args(args)
    assert isinstance(config, AdapterConfig)
    assert (config.algo, config.rank, config.alpha, config.conv_rank, config.conv_alpha) == ("lokr", 8, 4.0, 2, 1.0)
    assert (config.lokr_factor, config.dropout, config.target_modules) == (4, 0.1, ("q_proj", "v_proj"))
    default = adapter_config_from_args(causal_lm_parser().parse_args([]))
    assert (default.algo, default.rank, default.alpha, default.target_modules) == ("lora", 4, None, None)


@pytest.mark.parametrize("module", ["train_text_to_image", "train_causal_lm"])
def test_push_to_hub_is_refused_before_training_when_the_hub_is_off(module, monkeypatch, capsys, tmp_path):
    import importlib

    from huggingface_hub import constants

    trainer = importlib.import_module(f"diffusers_lowmem.{module}")
    model_flag = "--pretrained_model_name_or_path" if module == "train_text_to_image" else "--model_name_or_path"
    argv = [model_flag, str(tmp_path), "--dataset_name", "x/y", "--output_dir", "out", "--push_to_hub"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(argv)
    assert exit_info.value.code == 2 and "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert trainer.parse_args(argv).push_to_hub


# --------------------------------------------------------------------------------------------------------------------
# Memory savers: --loss_chunk_size (causal LM), --offload_activations (both)
# --------------------------------------------------------------------------------------------------------------------


def test_loss_chunk_size_and_offload_activations_defaults_and_help():
    from diffusers_lowmem.chunked_loss import DEFAULT_CHUNK_SIZE

    causal = causal_lm_parser()
    args = causal.parse_args([])
    assert (args.loss_chunk_size, args.offload_activations) == (DEFAULT_CHUNK_SIZE, False)
    assert causal.parse_args(["--loss_chunk_size", "0", "--offload_activations"]).loss_chunk_size == 0
    help_text = " ".join(causal.format_help().split())
    memory_group = help_text[help_text.index("Memory:") :]
    assert "--loss_chunk_size TOKENS" in memory_group and "--offload_activations" in memory_group
    assert "0.37 GiB with 256" in help_text and "0: upstream's loss on the full logits" in help_text

    text_to_image = text_to_image_parser()
    argv = ["--pretrained_model_name_or_path", "x"]
    assert text_to_image.parse_args([*argv, "--offload_activations"]).offload_activations
    assert not hasattr(text_to_image.parse_args(argv), "loss_chunk_size")
    help_text = " ".join(text_to_image.format_help().split())
    assert "--offload_activations" in help_text[help_text.index("Memory:") :]
    assert "host memory" in help_text


def test_negative_loss_chunk_size_is_refused(text_file, capsys):
    assert_usage_error(parse_causal_lm, _clm(text_file, "--loss_chunk_size", "-1"), capsys, "--loss_chunk_size -1")


# --------------------------------------------------------------------------------------------------------------------
# --target_modules per model: ROLE:PATTERN
# --------------------------------------------------------------------------------------------------------------------


def test_target_modules_take_role_prefixes_per_model(image_dir, text_file):
    argv = _t2i(image_dir, "--train_text_encoder", "--target_modules", "unet:to_q", "to_v", "text_encoder:q_proj")
    args = parse_text_to_image(argv)
    config = adapter_config_from_args(args)
    assert config.target_modules == ("unet:to_q", "to_v", "text_encoder:q_proj")
    assert parse_causal_lm(_clm(text_file, "--target_modules", "llm:q_proj", "v_proj")).target_modules == [
        "llm:q_proj",
        "v_proj",
    ]
    help_text = " ".join(text_to_image_parser().format_help().split())
    assert "unet:to_q unet:to_v text_encoder:q_proj" in help_text and "text_encoder_2:" in help_text


@pytest.mark.parametrize(
    "patterns, expected",
    [
        (["unte:to_q"], ["--target_modules", "'unte:to_q'", "unknown role prefix 'unte'", "unet, text_encoder"]),
        (["unet:"], ["--target_modules", "'unet:'", "no module-name pattern"]),
        (["text_encoder:q_proj"], ["'text_encoder:q_proj'", "does not adapt", "add --train_text_encoder"]),
        (["llm:q_proj"], ["'llm:q_proj'", "does not adapt", "role prefixes here: unet"]),
    ],
)
def test_text_to_image_rejects_bad_role_prefix_before_loading(patterns, expected, image_dir, capsys):
    assert_usage_error(parse_text_to_image, _t2i(image_dir, "--target_modules", *patterns), capsys, *expected)


def test_causal_lm_rejects_a_unet_role_prefix(text_file, capsys):
    argv = _clm(text_file, "--target_modules", "unet:to_q")
    assert_usage_error(parse_causal_lm, argv, capsys, "'unet:to_q'", "does not adapt", "role prefixes here: llm")
