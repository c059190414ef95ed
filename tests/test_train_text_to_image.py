"""The text-to-image drop-in trainer on the tiny pipeline: every adapter x quantization, outputs that load where users
live, memory in TensorBoard, checkpoints that resume exactly, and a model that learns."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusers_lowmem import adapters, memory, train_text_to_image
from diffusers_lowmem import args as arg_groups
from diffusers_lowmem.training import list_checkpoints

SPEC = Path(__file__).parent / "spec" / "train_text_to_image_lora.flags"
MEMORY_MILESTONES = ("after_model_load", "after_adapter", "after_first_step")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a separate `accelerate launch` would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train_argv(sd_path, images_path, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path", str(sd_path),
        "--train_data_dir", str(images_path),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def run(argv):
    return train_text_to_image.main(train_text_to_image.parse_args(argv))


def scalar_tags(output_dir: Path) -> dict[str, list[float]]:
    values = {}
    for events in Path(output_dir, "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values[tag] = [event.value for event in accumulator.Scalars(tag)]
    return values


def unet_output(pipeline, seed=0):
    generator = torch.Generator().manual_seed(seed)
    unet = pipeline.unet
    latents = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), states, return_dict=False)[0]


def text_encoder_output(pipeline):
    ids = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.text_encoder(ids)[0]


def fresh_pipeline(sd_path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd_path, safety_checker=None)


def test_parser_accepts_every_upstream_flag_with_upstream_default():
    spec = arg_groups.parse_spec(SPEC)
    args = train_text_to_image.parse_args(
        ["--pretrained_model_name_or_path", "architecture:tiny-sd", "--dataset_name", "x/y"]
    )
    for flag, attributes in spec.items():
        destination = flag.lstrip("-")
        assert hasattr(args, destination), flag
        if "default" in attributes and flag not in ("--pretrained_model_name_or_path", "--dataset_name"):
            assert getattr(args, destination) == arg_groups.spec_value(attributes["default"]), flag
    assert args.adapter == "lora" and args.quant is None and args.memory_log_steps == 1


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("quant", ["none", "8bit", "nf4"])
@pytest.mark.parametrize("adapter", adapters.ADAPTER_ALGOS)
def test_every_adapter_and_quantization_trains_saves_and_reloads(
    adapter, quant, train_text_encoder, tiny_sd_path, tiny_images_path, tmp_path
):
    extra = ["--adapter", adapter, "--max_train_steps", "2", "--rank", "4"]
    extra += [] if quant == "none" else ["--quant", quant]
    extra += ["--train_text_encoder"] if train_text_encoder else []
    summary = run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    assert summary["global_step"] == 2
    assert torch.isfinite(torch.tensor(summary["loss"]))

    weights = load_file(tmp_path / adapters.DIFFUSERS_WEIGHT_NAME)
    assert any(key.startswith("lora_unet_") for key in weights)
    assert any(key.startswith("lora_te_text_model_encoder_") for key in weights) == train_text_encoder
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())

    base = fresh_pipeline(tiny_sd_path)
    adapted = fresh_pipeline(tiny_sd_path)
    adapters.load_adapter(adapted, tmp_path)
    assert not torch.allclose(unet_output(base), unet_output(adapted), atol=1e-6)
    if train_text_encoder:
        assert not torch.allclose(text_encoder_output(base), text_encoder_output(adapted), atol=1e-6)

    tags = scalar_tags(tmp_path)
    for milestone in MEMORY_MILESTONES:
        assert any(tag.startswith(f"memory/{milestone}/") for tag in tags), (milestone, sorted(tags))
    assert any(tag.startswith("memory/step/") and len(values) == 2 for tag, values in tags.items())
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert set(report["milestones"]) >= set(MEMORY_MILESTONES)
    assert report["params"]["trainable"] > 0
    if quant != "none":
        assert report["breakdown"]["frozen_weights"] < _unquantized_frozen_bytes(tiny_sd_path)


_FROZEN_BYTES = {}


def _unquantized_frozen_bytes(sd_path) -> int:
    """Bytes of the fp32 UNet + text encoder + VAE, for comparison with a quantized run."""
    if sd_path not in _FROZEN_BYTES:
        pipeline = fresh_pipeline(sd_path)
        modules = (pipeline.unet, pipeline.text_encoder, pipeline.vae)
        _FROZEN_BYTES[sd_path] = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return _FROZEN_BYTES[sd_path]


@pytest.mark.parametrize("adapter", ["lora", "locon"])
def test_lora_and_locon_load_with_diffusers_load_lora_weights(adapter, tiny_sd_path, tiny_images_path, tmp_path):
    run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--adapter", adapter, "--max_train_steps", "3"))
    ours = fresh_pipeline(tiny_sd_path)
    adapters.load_adapter(ours, tmp_path)
    theirs = fresh_pipeline(tiny_sd_path)
    theirs.load_lora_weights(tmp_path)
    torch.testing.assert_close(unet_output(theirs), unet_output(ours), atol=1e-4, rtol=1e-4)


def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tiny_sd_path, tiny_images_path, tmp_path):
    common = ["--adapter", "lokr", "--quant", "nf4", "--random_flip", "--checkpointing_steps", "3"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run(train_argv(tiny_sd_path, tiny_images_path, uninterrupted, *common, "--max_train_steps", "6"))
    run(train_argv(tiny_sd_path, tiny_images_path, interrupted, *common, "--max_train_steps", "3"))
    # The "crash": only checkpoint-3 survives; resume from it up to step 6 (crossing an epoch boundary: 4 steps each).
    summary = run(
        train_argv(
            tiny_sd_path, tiny_images_path, interrupted, *common, "--max_train_steps", "6",
            "--resume_from_checkpoint", "latest",
        )
    )  # fmt: skip
    assert summary["global_step"] == 6
    expected = load_file(uninterrupted / adapters.DIFFUSERS_WEIGHT_NAME)
    resumed = load_file(interrupted / adapters.DIFFUSERS_WEIGHT_NAME)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd_path, tiny_images_path, tmp_path):
    extra = ["--max_train_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    checkpoint = tmp_path / "checkpoint-5"
    assert (checkpoint / adapters.DIFFUSERS_WEIGHT_NAME).is_file()
    # Only adapter weights are stored, never the frozen base.
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*.bin"))
    assert not list(tmp_path.glob("*.partial"))


def test_resume_from_a_missing_checkpoint_fails_before_loading(tiny_sd_path, tiny_images_path, tmp_path, capsys):
    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path / "out", "--resume_from_checkpoint", "nope")
    with pytest.raises(SystemExit) as error:
        train_text_to_image.parse_args(argv)
    assert error.value.code == 2
    assert "--resume_from_checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_is_refused_by_main(tiny_sd_path, tiny_images_path, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()  # a folder without training_state.json: killed mid-save
    args = train_text_to_image.parse_args(
        train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--resume_from_checkpoint", "checkpoint-3")
    )
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        train_text_to_image.main(args)


def fixed_pair_loss(pipeline, images_path, resolution=32, seed=1234) -> float:
    """Mean denoising loss over the data set at fixed (noise, timestep) pairs: comparable before and after."""
    from diffusers_lowmem import data

    dataset = data.load_image_caption_dataset(None, None, str(images_path), None, "image", "text")
    preprocessor = data.ImagePreprocessor(resolution, center_crop=True, random_flip=False)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for example in dataset:
            pixels = preprocessor(example["image"]).unsqueeze(0)
            latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
            ids = pipeline.tokenizer(
                [example["text"]], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            states = pipeline.text_encoder(ids)[0]
            for _ in range(4):
                noise = torch.randn(latents.shape, generator=generator)
                timestep = torch.randint(50, 950, (1,), generator=generator)
                noisy = pipeline.scheduler.add_noise(latents, noise, timestep)
                prediction = pipeline.unet(noisy, timestep, states, return_dict=False)[0]
                losses.append(torch.nn.functional.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)


def test_the_model_learns(tiny_sd_path, tiny_images_path, tmp_path):
    extra = ["--adapter", "lora", "--rank", "8", "--max_train_steps", "150", "--train_batch_size", "8"]
    extra += ["--learning_rate", "3e-3", "--center_crop"]
    run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    before = fixed_pair_loss(fresh_pipeline(tiny_sd_path), tiny_images_path)
    trained = fresh_pipeline(tiny_sd_path)
    adapters.load_adapter(trained, tmp_path)
    after = fixed_pair_loss(trained, tiny_images_path)
    assert after < 0.8 * before, (before, after)


def test_module_runs_under_accelerate_launch(tiny_sd_path, tiny_images_path, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusers_lowmem.train_text_to_image",
        *train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--adapter", "lokr", "--quant", "nf4"),
        "--max_train_steps", "2", "--cache_latents",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / adapters.DIFFUSERS_WEIGHT_NAME).is_file()
    assert (tmp_path / "memory_report.md").is_file()
    assert "Steps" in completed.stderr  # the progress bar


def image_tags(output_dir: Path) -> dict[str, int]:
    counts = {}
    for events in Path(output_dir, "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["images"]:
            counts[tag] = counts.get(tag, 0) + len(accumulator.Images(tag))
    return counts


def test_validation_and_final_test_images_go_to_tensorboard(tiny_sd_path, tiny_images_path, tmp_path):
    extra = ["--max_train_steps", "8", "--validation_prompt", "a red circle", "--num_validation_images", "2"]
    extra += ["--validation_epochs", "1", "--adapter", "loha"]
    run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    counts = image_tags(tmp_path)
    # 8 images / batch 2 = 4 steps per epoch: a validation grid after each of the 2 epochs, then one from the test
    # phase on the adapter reloaded from disk.
    assert {tag.split("/")[0] for tag in counts} == {"validation", "test"}
    assert sum(n for tag, n in counts.items() if tag.startswith("validation")) == 2
    assert sum(n for tag, n in counts.items() if tag.startswith("test")) == 1
    # The test images are also saved side by side in the output dir.
    with Image.open(tmp_path / train_text_to_image.FINAL_IMAGES_NAME) as grid:
        assert grid.size == (2 * 32, 32) and grid.mode == "RGB"


@pytest.mark.parametrize(
    "options",
    [
        ["--cache_latents"],
        ["--cache_text_encoder_outputs", "--cache_latents"],
        ["--snr_gamma", "5.0", "--noise_offset", "0.1"],
        ["--prediction_type", "v_prediction"],
        ["--gradient_checkpointing", "--train_text_encoder", "--text_encoder_lr", "1e-4"],
        ["--use_8bit_adam", "--quant", "nf4"],
        ["--mixed_precision", "bf16", "--quant", "nf4"],
        ["--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--lr_scheduler", "cosine", "--scale_lr"],
        ["--center_crop", "--random_flip", "--image_interpolation_mode", "bicubic", "--max_train_samples", "6"],
    ],
    ids=[
        "cache-latents",
        "cache-text",
        "snr-noise-offset",
        "v-prediction",
        "grad-ckpt-te",
        "8bit-adam",
        "bf16",
        "accum",
        "data",
    ],
)
def test_upstream_training_options_train(options, tiny_sd_path, tiny_images_path, tmp_path):
    summary = run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--max_train_steps", "2", *options))
    assert summary["global_step"] == 2
    assert torch.isfinite(torch.tensor(summary["loss"]))
    weights = load_file(tmp_path / adapters.DIFFUSERS_WEIGHT_NAME)
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in weights.values())
    changed = [key for key, tensor in weights.items() if key.endswith("lora_up.weight") and tensor.abs().sum() > 0]
    assert changed, "the adapter did not train"


def test_resuming_at_the_last_step_trains_nothing_more(tiny_sd_path, tiny_images_path, tmp_path):
    common = ["--max_train_steps", "3", "--checkpointing_steps", "3"]
    run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *common))
    finished = load_file(tmp_path / adapters.DIFFUSERS_WEIGHT_NAME)
    summary = run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *common, "--resume_from_checkpoint", "latest"))
    assert summary["global_step"] == 3
    resumed = load_file(tmp_path / adapters.DIFFUSERS_WEIGHT_NAME)
    assert all(torch.equal(finished[key], resumed[key]) for key in finished)


def test_a_nonfinite_loss_stops_with_the_step_and_last_checkpoint(tiny_sd_path, tiny_images_path, tmp_path):
    from diffusers_lowmem.training import NonFiniteLossError

    # An absurd learning rate overflows the adapter after its first updates.
    extra = ["--max_train_steps", "8", "--learning_rate", "1e30", "--checkpointing_steps", "1", "--adapter", "lora"]
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)\. Last good checkpoint: .*checkpoint-\d+"):
        run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    assert not (tmp_path / adapters.DIFFUSERS_WEIGHT_NAME).exists()
    for checkpoint in list_checkpoints(tmp_path):
        weights = load_file(checkpoint / adapters.DIFFUSERS_WEIGHT_NAME)
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint


def test_skip_nonfinite_loss_finishes_with_a_finite_adapter(tiny_sd_path, tiny_images_path, tmp_path, caplog):
    extra = ["--max_train_steps", "6", "--learning_rate", "1e30", "--skip_nonfinite_loss", "--adapter", "lora"]
    with caplog.at_level("WARNING"):
        run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    assert "Skipping a batch" in caplog.text
    weights = load_file(tmp_path / adapters.DIFFUSERS_WEIGHT_NAME)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_a_checkpoint_of_nonfinite_weights_is_refused_and_names_the_last_good_one(tmp_path):
    from accelerate import Accelerator

    from diffusers_lowmem.training import NonFiniteLossError, save_checkpoint

    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(3))
    assert save_checkpoint(accelerator, tmp_path, 1, {}, trainable=[weight]) == tmp_path / "checkpoint-1"
    with torch.no_grad():
        weight[1] = float("inf")
    with pytest.raises(
        NonFiniteLossError, match=r"after step 2; they were not saved\. Last good checkpoint: .*checkpoint-1"
    ):
        save_checkpoint(accelerator, tmp_path, 2, {}, trainable=[weight])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-1"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_sd_path, tiny_images_path, tmp_path):
    import signal
    import time

    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--max_train_steps", "100000", "--adapter", "lokr")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusers_lowmem.train_text_to_image", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(Path(tmp_path, "logs").rglob("events.out.tfevents.*")) and time.monotonic() < deadline:
        time.sleep(0.5)  # trackers start right before the first step
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    checkpoints = list_checkpoints(tmp_path)
    assert len(checkpoints) == 1
    assert f"Stopped by SIGTERM at step {checkpoints[0].name.split('-')[1]}; saved {checkpoints[0]}" in output
    assert (checkpoints[0] / adapters.DIFFUSERS_WEIGHT_NAME).is_file()


def _is_quantized(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for module in model.modules())


@pytest.mark.parametrize("quant", ["8bit", "nf4"])
def test_cached_encoders_run_alone_before_the_unet_is_placed(tiny_sd_path, tiny_images_path, tmp_path, quant):
    # On the device while each cached encoder runs: the VAE alone, then the text encoder alone; the UNet is placed
    # (quantized) only after both have left, so an encode's activations never sit on top of the UNet's weights.
    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path, "--quant", quant)
    args = train_text_to_image.parse_args([*argv, "--cache_latents", "--cache_text_encoder_outputs"])
    text_encoders, vae, unet, _ = train_text_to_image.load_models(args, torch.float32)
    (text_encoder,) = text_encoders.values()
    seen = {}

    class RecordingEncodings:
        def cache_latents(self, encoder):
            assert encoder is vae
            seen["latents"] = (counter.live_bytes, _is_quantized(text_encoder), _is_quantized(unet))

        def cache_text_encoder_outputs(self, encoders):
            assert encoders == text_encoders
            vae_gone = all(counter.forgot(parameter) for parameter in vae.parameters())
            seen["text"] = (vae_gone, _is_quantized(text_encoder), _is_quantized(unet))

    with memory.LiveTensorCounter("cpu") as counter:
        counter.adopt(list(vae.parameters()) + list(vae.buffers()))  # the VAE is placed first, as in `main`
        vae_bytes = counter.live_bytes
        quant_reports, cached_away = train_text_to_image.place_frozen_base(
            args, unet, text_encoders, vae, torch.float32, "cpu", RecordingEncodings(), counter=counter
        )

    assert vae_bytes > 0
    assert seen["latents"] == (vae_bytes, False, False)
    assert seen["text"] == (True, True, False)
    assert _is_quantized(unet) and all(counter.forgot(parameter) for parameter in text_encoder.parameters())
    assert cached_away == [vae, text_encoder]
    assert set(quant_reports) == {"unet", "text_encoder"}
