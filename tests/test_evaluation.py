"""The deterministic held-out loss: the component (split, timesteps, fixed noise, the loss itself) and the
text-to-image trainer's `--validation_loss_steps`, whose numbers must be the same problem in every run."""

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_causal_lm import train_argv as causal_lm_argv
from test_train_text_to_image import train_argv as text_to_image_argv

from diffusers_lowmem import adapters, data, evaluation, quantization, train_causal_lm, train_text_to_image


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a separate `accelerate launch` would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------------------------------------------
# The component
# ----------------------------------------------------------------------------------------------------------------


def test_held_out_split_is_fixed_disjoint_and_ignores_the_global_seed():
    torch.manual_seed(1)
    first = evaluation.held_out_split(40, 0.1)
    torch.manual_seed(2)
    second = evaluation.held_out_split(40, 0.1)
    assert first == second
    train, held_out = first
    assert len(held_out) == 4 and sorted(train + held_out) == list(range(40))
    assert held_out != [36, 37, 38, 39] and held_out != [0, 1, 2, 3]  # a permutation, not a slice
    assert len(evaluation.held_out_split(8, 0.1)[1]) == 1  # rounded up: at least one image held out


@pytest.mark.parametrize("num_examples, fraction", [(8, 0.0), (8, 1.0), (1, 0.5), (8, 0.95)])
def test_held_out_split_refuses_what_leaves_no_side(num_examples, fraction):
    with pytest.raises(ValueError):
        evaluation.held_out_split(num_examples, fraction)


def test_eval_timesteps_are_the_midpoints_of_equal_strata():
    assert evaluation.eval_timesteps(1000).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert evaluation.eval_timesteps(100, count=4).tolist() == [12, 37, 62, 87]


def _items(count, shape=(4, 4, 4)):
    generator = torch.Generator().manual_seed(5)
    return [{"latents": torch.randn(shape, generator=generator), "input_ids": torch.tensor([i])} for i in range(count)]


def _collate(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def test_eval_set_noise_is_fixed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluation.DiffusionEvalSet.build(_items(5), 2, 1000, _collate)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluation.DiffusionEvalSet.build(_items(5), 2, 1000, _collate)
    assert [len(batch["latents"]) for batch in first.batches] == [2, 2, 1] and first.num_examples == 5
    assert all(noise.shape == (8, len(b["latents"]), 4, 4, 4) for noise, b in zip(first.noise, first.batches))
    assert all(torch.equal(a, b) for a, b in zip(first.noise, second.noise))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_held_out_loss_is_the_plain_mse_against_the_target(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    eval_set = evaluation.DiffusionEvalSet.build(_items(3), 2, 1000, _collate)

    def perfect(batch, noisy_latents, timesteps):
        index = evaluation.eval_timesteps(1000).tolist().index(int(timesteps[0]))
        batch_index = next(i for i, b in enumerate(eval_set.batches) if b is batch)
        noise = eval_set.noise[batch_index][index]
        return evaluation.diffusion_target(scheduler, batch["latents"], noise, timesteps)

    assert evaluation.diffusion_held_out_loss(eval_set, perfect, scheduler) == pytest.approx(0.0, abs=1e-12)

    # Predicting zeros costs the mean square of the target, over every example and timestep alike.
    expected = []
    for batch, noise in zip(eval_set.batches, eval_set.noise):
        for k, timestep in enumerate(eval_set.timesteps):
            timesteps = timestep.repeat(len(batch["latents"]))
            target = evaluation.diffusion_target(scheduler, batch["latents"], noise[k], timesteps)
            expected += target.pow(2).flatten(1).mean(dim=1).tolist()
    zeros = evaluation.diffusion_held_out_loss(eval_set, lambda b, x, t: torch.zeros_like(x), scheduler)
    assert zeros == pytest.approx(sum(expected) / len(expected), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


def train_argv(sd_path, images_path, output_dir, *extra):
    """The text-to-image trainer's test command line, with a quarter of the 8 tiny images held out."""
    return text_to_image_argv(sd_path, images_path, output_dir, "--validation_split", "0.25", *extra)


def run(argv) -> dict:
    train_text_to_image.main(train_text_to_image.parse_args(argv))
    AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    return json.loads((output_dir / "training_summary.json").read_text())["held_out_loss"]


def scalars(output_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    found = {}
    for event_file in (output_dir / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith(prefix):
                found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def test_held_out_loss_is_logged_before_every_n_steps_and_at_the_end(tiny_sd_path, tiny_images_path, tmp_path):
    extra = ["--max_train_steps", "5", "--validation_loss_steps", "2", "--report_to", "tensorboard"]
    held_out = run(train_argv(tiny_sd_path, tiny_images_path, tmp_path, *extra))
    assert [step for step, _ in held_out["history"]] == [0, 2, 4, 5]
    assert held_out["examples"] == 2 and len(held_out["timesteps"]) == evaluation.NUM_EVAL_TIMESTEPS
    assert held_out["before"] == held_out["history"][0][1] and held_out["after"] == held_out["history"][-1][1]
    assert held_out["after"] != held_out["before"]  # the adapter changed the held-out prediction
    logged = scalars(tmp_path, "eval/loss")["eval/loss"]
    assert [step for step, _ in logged] == [0, 2, 4, 5]
    assert [value for _, value in logged] == pytest.approx([loss for _, loss in held_out["history"]], rel=1e-6)
    assert "quantized_base_loss" not in held_out  # only with --quant


def test_held_out_images_are_kept_out_of_training(tiny_sd_path, tiny_images_path):
    args = train_text_to_image.parse_args(
        train_argv(tiny_sd_path, tiny_images_path, "unused", "--validation_loss_steps", "1")
    )
    tokenizers = train_text_to_image.load_tokenizers(args, sdxl=False)
    train_dataset, held_out_dataset = train_text_to_image.build_datasets(args, tokenizers, seed=0)
    assert (len(train_dataset), len(held_out_dataset)) == (6, 2)
    rows = data.load_image_caption_dataset(train_data_dir=str(tiny_images_path))
    _, held_out_rows = evaluation.held_out_split(len(rows), 0.25)
    held_out_captions = {rows[i]["text"] for i in held_out_rows}
    train_captions = {rows[i]["text"] for i in range(len(rows)) if i not in held_out_rows}
    assert held_out_captions and not held_out_captions & train_captions
    # Held-out images are center-cropped and never flipped: the same tensor in every epoch and every run.
    held_out_dataset.set_epoch(3)
    first = held_out_dataset[0]["pixel_values"]
    held_out_dataset.set_epoch(7)
    assert torch.equal(first, held_out_dataset[0]["pixel_values"])


def test_runs_that_differ_in_seed_and_adapter_start_from_the_same_held_out_loss(
    tiny_sd_path, tiny_images_path, tmp_path
):
    """Adapters start as the identity, so the held-out loss before training is the base's, whatever the run."""
    losses = []
    for seed, adapter in [("0", "lora"), ("7", "lokr"), ("3", "loha")]:
        output_dir = tmp_path / f"{adapter}-{seed}"
        argv = train_argv(tiny_sd_path, tiny_images_path, output_dir, "--max_train_steps", "1", "--adapter", adapter)
        argv += ["--validation_loss_steps", "1", "--seed", seed, "--random_flip"]
        losses.append(run(argv)["before"])
    assert losses[0] == losses[1] == losses[2]


def test_evaluating_more_often_does_not_change_training(tiny_sd_path, tiny_images_path, tmp_path):
    weights = []
    for every in ("1", "100"):
        output_dir = tmp_path / every
        argv = train_argv(tiny_sd_path, tiny_images_path, output_dir, "--max_train_steps", "3", "--adapter_dropout")
        argv += ["0.2", "--validation_loss_steps", every]
        run(argv)
        weights.append(load_file(output_dir / adapters.DIFFUSERS_WEIGHT_NAME))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_quantization_loss_delta_compares_against_the_unquantized_run(tiny_sd_path, tiny_images_path, tmp_path):
    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path / "none", "--max_train_steps", "1")
    unquantized = run(argv + ["--validation_loss_steps", "1"])
    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path / "nf4", "--max_train_steps", "1", "--quant", "nf4")
    argv += ["--validation_loss_steps", "1", "--report_to", "tensorboard"]
    nf4 = run(argv)
    # The unquantized base measured inside the nf4 run is the base the unquantized run starts from.
    assert nf4["unquantized_base_loss"] == pytest.approx(unquantized["before"], rel=1e-6)
    # Zero-initialised adapters leave the quantized base's prediction unchanged at step 0.
    assert nf4["quantized_base_loss"] == pytest.approx(nf4["before"], rel=1e-6)
    delta = nf4["quantized_base_loss"] - nf4["unquantized_base_loss"]
    assert nf4["quantization_loss_delta"] == pytest.approx(delta) and delta != 0
    # The per-layer weight error of the quantization report, summarised per model.
    assert 0.05 < nf4["quantization_weight_error/unet"] < 0.2
    # The tiny text encoder's 32-wide layers quantize worse (0.20 measured on an AVX512-BF16 CPU).
    assert 0.05 < nf4["quantization_weight_error/text_encoder"] < 0.25
    logged = scalars(tmp_path / "nf4", "eval/")
    assert logged["eval/quantization_loss_delta"] == [(0, pytest.approx(delta, rel=1e-5, abs=1e-7))]
    assert math.isfinite(logged["eval/quantization_weight_error/unet"][0][1])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--validation_split", "0.3"], "--validation_loss_steps N"),
        (["--validation_loss_steps", "0"], "--validation_loss_steps"),
        (["--validation_loss_steps", "5", "--validation_split", "1.5"], "must be in (0, 1)"),
    ],
)
def test_bad_evaluation_flags_fail_in_the_parser(extra, message, capsys):
    base = ["--pretrained_model_name_or_path", "architecture:tiny-sd", "--dataset_name", "x/y"]
    with pytest.raises(SystemExit) as exit_info:
        train_text_to_image.parse_args(base + extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_split_that_leaves_nothing_to_train_fails_before_models_load(tiny_sd_path, tiny_images_path, tmp_path):
    argv = train_argv(tiny_sd_path, tiny_images_path, tmp_path / "out", "--validation_loss_steps", "1")
    argv[argv.index("--validation_split") + 1] = "0.95"
    with pytest.raises(SystemExit, match="Bad training data: holding out 95% of 8"):
        train_text_to_image.main(train_text_to_image.parse_args(argv))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# The causal-LM trainer: perplexity every --eval_steps
# ----------------------------------------------------------------------------------------------------------------


def test_causal_lm_logs_perplexity_every_eval_steps(tiny_llama_path, tiny_text_path, tmp_path):
    argv = causal_lm_argv(tiny_llama_path, tiny_text_path, tmp_path / "every-2", "--max_train_steps", "5")
    argv += ["--eval_steps", "2", "--adapter_dropout", "0.1", "--with_tracking", "--report_to", "tensorboard"]
    summary = train_causal_lm.main(train_causal_lm.parse_args(argv))
    history = json.loads((tmp_path / "every-2" / "training_summary.json").read_text())["eval_history"]
    assert [step for step, _, _ in history] == [0, 2, 4, 5]
    assert all(perplexity == pytest.approx(math.exp(loss)) for _, loss, perplexity in history)
    assert history[-1][1] == pytest.approx(summary["eval_loss"]) and history[-1][1] < history[0][1]
    logged = scalars(tmp_path / "every-2", "eval/")
    assert [step for step, _ in logged["eval/perplexity"]] == [0, 2, 4, 5]
    assert [value for _, value in logged["eval/loss"]] == pytest.approx([loss for _, loss, _ in history], rel=1e-6)

    # Evaluating in the middle of an epoch leaves training as it was (dropout included).
    AcceleratorState._reset_state(reset_partial_state=True)
    argv[argv.index("--eval_steps") + 1] = "100"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "every-100")
    train_causal_lm.main(train_causal_lm.parse_args(argv))
    first = load_file(tmp_path / "every-2" / adapters.LYCORIS_WEIGHT_NAME)
    second = load_file(tmp_path / "every-100" / adapters.LYCORIS_WEIGHT_NAME)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_causal_lm_quantization_loss_delta_compares_against_the_unquantized_run(
    tiny_llama_path, tiny_text_path, tmp_path
):
    def run_causal(output_dir, *extra):
        argv = causal_lm_argv(tiny_llama_path, tiny_text_path, output_dir, "--max_train_steps", "1", *extra)
        argv += ["--eval_steps", "1"]
        train_causal_lm.main(train_causal_lm.parse_args(argv))
        AcceleratorState._reset_state(reset_partial_state=True)
        return json.loads((output_dir / "training_summary.json").read_text())

    unquantized = run_causal(tmp_path / "none")
    nf4 = run_causal(tmp_path / "nf4", "--quant", "nf4", "--with_tracking", "--report_to", "tensorboard")
    assert "quantization_loss_delta" not in unquantized
    # The unquantized base measured inside the nf4 run is the base the unquantized run starts from.
    assert nf4["unquantized_base_loss"] == pytest.approx(unquantized["eval_history"][0][1], rel=1e-6)
    assert nf4["quantized_base_loss"] == nf4["eval_history"][0][1]
    delta = nf4["quantized_base_loss"] - nf4["unquantized_base_loss"]
    assert nf4["quantization_loss_delta"] == pytest.approx(delta) and delta != 0
    assert 0.05 < nf4["quantization_weight_error/llm"] < 0.2
    logged = scalars(tmp_path / "nf4", "eval/")
    assert logged["eval/quantization_loss_delta"] == [(0, pytest.approx(delta, rel=1e-5, abs=1e-7))]


def test_unquantized_loss_visits_the_device_and_returns_the_models_unchanged():
    model = torch.nn.Linear(4, 2)
    weight = model.weight.detach().clone()
    seen = []
    loss = evaluation.unquantized_loss([model], "cpu", lambda: seen.append(model.weight.device.type) or 1.5)
    assert loss == 1.5 and seen == ["cpu"]
    assert model.weight.device.type == "cpu" and torch.equal(model.weight, weight)


def test_quantization_scalars_name_the_delta_and_each_models_weight_error():
    report = quantization.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4", compute_errors=True)
    scalars = evaluation.quantization_scalars(1.25, 1.0, {"unet": report, "text_encoder": None})
    assert scalars == {
        "eval/quantized_base_loss": 1.25,
        "eval/unquantized_base_loss": 1.0,
        "eval/quantization_loss_delta": 0.25,
        "eval/quantization_weight_error/unet": pytest.approx(report.layers[0].relative_error),
    }
    assert evaluation.quantization_scalars(1.25, None, {}) == {"eval/quantized_base_loss": 1.25}
    assert evaluation.summary_fields(scalars)["quantization_loss_delta"] == 0.25
