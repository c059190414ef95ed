"""The text-to-image trainer on the tiny Stable Diffusion XL pipeline: detection, flag parity with
train_text_to_image_lora_sdxl.py, SDXL conditioning, every adapter on the UNet and both text encoders (with and
without nf4), outputs that load in StableDiffusionXLPipeline, and cached text-encoder outputs."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_args import assert_matches_spec
from test_train_text_to_image import MEMORY_MILESTONES, image_tags, run, scalar_tags, train_argv

from diffusers_lowmem import adapters, train_text_to_image
from diffusers_lowmem import args as arg_groups

SDXL_SPEC = arg_groups.parse_spec(Path(__file__).parent / "spec" / "train_text_to_image_lora_sdxl.flags")


@pytest.fixture(scope="module")
def sdxl_actions():
    return arg_groups.parser_actions(arg_groups.text_to_image_parser(sdxl=True))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a separate `accelerate launch` would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def fresh_pipeline(sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_path)


def unet_output(pipeline, seed=0):
    """The UNet's prediction with SDXL's added conditioning (pooled text embeddings and time ids)."""
    generator = torch.Generator().manual_seed(seed)
    unet = pipeline.unet
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(1, pipeline.text_encoder_2.config.projection_dim, generator=generator)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), states, added_cond_kwargs=added, return_dict=False)[0]


def text_encoder_outputs(pipeline):
    """Both encoders' conditioning for one prompt, through the trainer's `encode_prompt`."""
    batch = {}
    for key, tokenizer in (("input_ids", pipeline.tokenizer), ("input_ids_2", pipeline.tokenizer_2)):
        batch[key] = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    encoders = {"text_encoder": pipeline.text_encoder, "text_encoder_2": pipeline.text_encoder_2}
    with torch.no_grad():
        return train_text_to_image.encode_prompt(batch, encoders, sdxl=True)


# --------------------------------------------------------------------------------------------------------------------
# Detection and flags
# --------------------------------------------------------------------------------------------------------------------


def test_sdxl_pipelines_and_architectures_are_detected(tiny_sd_path, tiny_sdxl_path):
    assert arg_groups.is_sdxl_pipeline(str(tiny_sdxl_path))
    assert arg_groups.is_sdxl_pipeline("architecture:tiny-sdxl")
    assert arg_groups.is_sdxl_pipeline("architecture:sdxl")
    assert not arg_groups.is_sdxl_pipeline(str(tiny_sd_path))
    assert not arg_groups.is_sdxl_pipeline("architecture:sd15")


@pytest.mark.parametrize("flag", list(SDXL_SPEC))
def test_sdxl_parser_accepts_upstream_flag_with_upstream_default(flag, sdxl_actions):
    assert flag in sdxl_actions, f"{flag} of train_text_to_image_lora_sdxl.py is missing"
    assert_matches_spec(flag, SDXL_SPEC[flag], sdxl_actions[flag])


def test_parse_args_uses_the_sdxl_defaults_for_an_sdxl_pipeline(tiny_sd_path, tiny_sdxl_path, tiny_images_path):
    def parsed(model, *extra):
        argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tiny_images_path), *extra]
        return train_text_to_image.parse_args(argv)

    sdxl = parsed(tiny_sdxl_path, "--debug_loss", "--pretrained_vae_model_name_or_path", str(tiny_sdxl_path / "vae"))
    given = (
        "--pretrained_model_name_or_path",
        "--pretrained_vae_model_name_or_path",
        "--train_data_dir",
        "--debug_loss",
    )
    for flag, attributes in SDXL_SPEC.items():
        if "default" in attributes and flag not in given:
            assert getattr(sdxl, flag.lstrip("-")) == arg_groups.spec_value(attributes["default"]), flag
    assert sdxl.resolution == 1024 and sdxl.debug_loss
    assert parsed(tiny_sd_path).resolution == 512
    assert parsed(tiny_sdxl_path, "--resolution", "64").resolution == 64


def test_caching_text_encoder_outputs_while_training_them_is_refused(
    tiny_sdxl_path, tiny_images_path, tmp_path, capsys
):
    argv = train_argv(
        tiny_sdxl_path, tiny_images_path, tmp_path, "--train_text_encoder", "--cache_text_encoder_outputs"
    )
    with pytest.raises(SystemExit) as error:
        train_text_to_image.parse_args(argv)
    assert error.value.code == 2
    assert "--cache_text_encoder_outputs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------------------


def test_encode_prompt_and_time_ids_follow_upstream(tiny_sdxl_path):
    pipeline = fresh_pipeline(tiny_sdxl_path)
    prompt_embeds, pooled_prompt_embeds = text_encoder_outputs(pipeline)
    # The pipeline's own encode_prompt (no classifier-free guidance) is what upstream's training encode_prompt mirrors.
    expected, _, expected_pooled, _ = pipeline.encode_prompt("a red circle", do_classifier_free_guidance=False)
    torch.testing.assert_close(prompt_embeds, expected)
    torch.testing.assert_close(pooled_prompt_embeds, expected_pooled)

    args = train_text_to_image.parse_args(
        ["--pretrained_model_name_or_path", str(tiny_sdxl_path), "--dataset_name", "x/y", "--resolution", "64"]
    )
    batch = {"original_sizes": torch.tensor([[100, 80], [64, 64]]), "crop_top_lefts": torch.tensor([[3, 0], [0, 0]])}
    time_ids = train_text_to_image.compute_time_ids(args, batch, "cpu", torch.float32)
    assert time_ids.tolist() == [[100, 80, 3, 0, 64, 64], [64, 64, 0, 0, 64, 64]]


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------

# Each adapter with and without nf4, and each of those once with the text encoders trained: 8 runs, not 16.
MATRIX = [
    ("lora", "none", False),
    ("lora", "nf4", True),
    ("loha", "none", True),
    ("loha", "nf4", False),
    ("lokr", "none", False),
    ("lokr", "nf4", True),
    ("locon", "none", True),
    ("locon", "nf4", False),
]


@pytest.mark.parametrize(
    "adapter, quant, train_text_encoder", MATRIX, ids=[f"{a}-{q}-{'te' if t else 'unet'}" for a, q, t in MATRIX]
)
def test_every_adapter_trains_saves_and_reloads_on_sdxl(
    adapter, quant, train_text_encoder, tiny_sdxl_path, tiny_images_path, tmp_path
):
    extra = ["--adapter", adapter, "--max_train_steps", "2", "--rank", "4"]
    extra += [] if quant == "none" else ["--quant", quant]
    extra += ["--train_text_encoder"] if train_text_encoder else []
    summary = run(train_argv(tiny_sdxl_path, tiny_images_path, tmp_path, *extra))
    assert summary["global_step"] == 2
    assert torch.isfinite(torch.tensor(summary["loss"]))

    weights = load_file(tmp_path / adapters.DIFFUSERS_WEIGHT_NAME)
    assert any(key.startswith("lora_unet_") for key in weights)
    assert any(key.startswith("lora_te1_text_model_encoder_") for key in weights) == train_text_encoder
    assert any(key.startswith("lora_te2_text_model_encoder_") for key in weights) == train_text_encoder
    assert not any(key.startswith("lora_te_") for key in weights)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())

    base = fresh_pipeline(tiny_sdxl_path)
    adapted = fresh_pipeline(tiny_sdxl_path)
    networks = adapters.load_adapter(adapted, tmp_path)
    # Reloaded exactly: the adapters in the pipeline hold the saved tensors, under the roles trained.
    assert set(networks) == ({"unet", "text_encoder", "text_encoder_2"} if train_text_encoder else {"unet"})
    reloaded = adapters.adapter_state_dict(networks)
    assert reloaded.keys() == weights.keys()
    # LoKr layers with full (not low-rank) Kronecker factors have a scale of 1 whatever alpha says; LyCORIS rebuilds
    # them with alpha = rank = 1, so only their alpha buffer differs from the file.
    compared = [key for key in weights if not (adapter == "lokr" and key.endswith(".alpha"))]
    assert all(torch.equal(reloaded[key], weights[key]) for key in compared)
    assert not torch.allclose(unet_output(base), unet_output(adapted), atol=1e-6)
    if train_text_encoder:
        for before, after in zip(text_encoder_outputs(base), text_encoder_outputs(adapted)):
            assert not torch.allclose(before, after, atol=1e-6)

    tags = scalar_tags(tmp_path)
    for milestone in MEMORY_MILESTONES:
        assert any(tag.startswith(f"memory/{milestone}/") for tag in tags), (milestone, sorted(tags))
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert set(report["milestones"]) >= set(MEMORY_MILESTONES)
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    if quant != "none":
        # --quant reaches the UNet and, trained or not, both text encoders.
        assert set(summary["quantization"]) == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("adapter", ["lora", "locon"])
def test_lora_and_locon_load_with_diffusers_load_lora_weights_on_sdxl(
    adapter, tiny_sdxl_path, tiny_images_path, tmp_path
):
    extra = ["--adapter", adapter, "--max_train_steps", "2", "--train_text_encoder"]
    run(train_argv(tiny_sdxl_path, tiny_images_path, tmp_path, *extra))
    ours = fresh_pipeline(tiny_sdxl_path)
    adapters.load_adapter(ours, tmp_path)
    theirs = fresh_pipeline(tiny_sdxl_path)
    theirs.load_lora_weights(tmp_path)
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), atol=1e-4, rtol=1e-4)
    for their_output, our_output in zip(text_encoder_outputs(theirs), text_encoder_outputs(ours)):
        torch.testing.assert_close(their_output, our_output, atol=1e-4, rtol=1e-4)


def test_cached_text_encoder_outputs_give_the_same_training(tiny_sdxl_path, tiny_images_path, tmp_path):
    # Center crops and one caption per image: caching changes no input, so the same seed gives the same run.
    common = ["--adapter", "lokr", "--max_train_steps", "3", "--center_crop"]
    uncached = run(train_argv(tiny_sdxl_path, tiny_images_path, tmp_path / "uncached", *common))
    cached = run(
        train_argv(tiny_sdxl_path, tiny_images_path, tmp_path / "cached", *common, "--cache_text_encoder_outputs")
    )
    assert cached["loss"] == pytest.approx(uncached["loss"], rel=1e-5)
    expected = load_file(tmp_path / "uncached" / adapters.DIFFUSERS_WEIGHT_NAME)
    trained = load_file(tmp_path / "cached" / adapters.DIFFUSERS_WEIGHT_NAME)
    assert expected.keys() == trained.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], atol=1e-5, rtol=1e-4)


def test_cached_latents_and_text_separate_vae_and_validation_use_the_sdxl_pipeline(
    tiny_sdxl_path, tiny_images_path, tmp_path
):
    extra = ["--adapter", "lokr", "--quant", "nf4", "--cache_latents", "--cache_text_encoder_outputs"]
    extra += ["--max_train_steps", "4", "--validation_prompt", "a red circle", "--num_validation_images", "1"]
    extra += ["--gradient_checkpointing", "--snr_gamma", "5.0"]
    extra += ["--pretrained_vae_model_name_or_path", str(tiny_sdxl_path / "vae")]
    summary = run(train_argv(tiny_sdxl_path, tiny_images_path, tmp_path, *extra))
    assert summary["global_step"] == 4
    # 8 images / batch 2 = 4 steps: one validation image after the epoch, one from the adapter reloaded from disk.
    counts = image_tags(tmp_path)
    assert sum(n for tag, n in counts.items() if tag.startswith("validation")) == 1
    assert sum(n for tag, n in counts.items() if tag.startswith("test")) == 1


def test_sdxl_architecture_trains_and_measures_its_frozen_base(tiny_images_path, tmp_path):
    # The profiler's two entry points on `architecture:tiny-sdxl` (random weights built on meta, no files).
    argv = train_argv("architecture:tiny-sdxl", tiny_images_path, tmp_path / "train", "--max_train_steps", "2")
    summary = run([*argv, "--adapter", "lokr", "--quant", "nf4", "--cache_latents", "--cache_text_encoder_outputs"])
    assert summary["global_step"] == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    args = train_text_to_image.parse_args(train_argv("architecture:tiny-sdxl", tiny_images_path, tmp_path / "base"))
    report = train_text_to_image.measure_frozen_base(args)
    assert "after_first_step" in report["milestones"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="where the encoders live only shows on a GPU")
def test_cached_text_encoders_leave_the_device(tiny_sdxl_path, tiny_images_path, tmp_path):
    def frozen_bytes(output_dir, *extra):
        run(train_argv(tiny_sdxl_path, tiny_images_path, output_dir, "--max_train_steps", "1", *extra))
        AcceleratorState._reset_state(reset_partial_state=True)
        report = json.loads((output_dir / "memory_report.json").read_text())
        return report["breakdown"]["frozen_weights"]

    assert frozen_bytes(tmp_path / "cached", "--cache_text_encoder_outputs") < frozen_bytes(tmp_path / "uncached")


def test_resumed_sdxl_run_ends_with_the_same_adapter_as_an_uninterrupted_one(
    tiny_sdxl_path, tiny_images_path, tmp_path
):
    common = ["--adapter", "lora", "--train_text_encoder", "--random_flip", "--checkpointing_steps", "2"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run(train_argv(tiny_sdxl_path, tiny_images_path, uninterrupted, *common, "--max_train_steps", "4"))
    run(train_argv(tiny_sdxl_path, tiny_images_path, interrupted, *common, "--max_train_steps", "2"))
    resume = ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    assert run(train_argv(tiny_sdxl_path, tiny_images_path, interrupted, *common, *resume))["global_step"] == 4
    expected = load_file(uninterrupted / adapters.DIFFUSERS_WEIGHT_NAME)
    resumed = load_file(interrupted / adapters.DIFFUSERS_WEIGHT_NAME)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
