"""Both trainers data-parallel on 2 CPU processes (gloo), as `torchrun` launches them: with an nf4 base and LoKr the
distributed state is logged, only the main process writes, and the adapters end identical on both ranks; the
schedule (steps, epochs, learning rate at each step, resume position) follows the loader as each process sees it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusers_lowmem import adapters, training

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
PEAK_LR = 1e-3


def tiny_paths(tiny_dir: Path) -> dict[str, Path]:
    """The tiny fixtures the schedule tests use, by name."""
    return {name: tiny_dir / name for name in ("sd", "llama", "images", "text")}


def launch(module: str, argv: list[str]) -> str:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    completed = subprocess.run([*TORCHRUN, "-m", module, *argv], env=env, capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    return output


def assert_distributed_run(output: str, output_dir: Path, weights_name: str) -> None:
    assert "Distributed environment: DistributedType.MULTI_CPU  Backend: gloo" in output
    assert "Num processes: 2" in output
    assert "Adapter weights identical on all 2 processes" in output
    weights = load_file(output_dir / weights_name)
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values())
    # One writer: TensorBoard files of one process (`events.out.tfevents.TIME.HOST.PID.N`), one report, checkpoints
    # written once.
    event_files = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files and len({path.name.split(".")[-2] for path in event_files}) == 1
    assert (output_dir / "memory_report.json").is_file()
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    # Renamed only after every process wrote its RNG state into it.
    assert {path.name for path in (output_dir / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }


@pytest.mark.parametrize("trainer", ["text-to-image", "causal-lm"])
def test_two_cpu_processes_train_an_nf4_lokr_adapter(trainer, tiny_sd_path, tiny_images_path, tiny_llama_path,
                                                     tiny_text_path, tmp_path):  # fmt: skip
    common = ["--adapter", "lokr", "--quant", "nf4", "--seed", "0", "--output_dir", str(tmp_path)]
    common += ["--max_train_steps", "3", "--checkpointing_steps", "2"]
    if trainer == "text-to-image":
        argv = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(tiny_images_path)]
        argv += ["--resolution", "32", "--train_batch_size", "2"]
        output = launch("diffusers_lowmem.train_text_to_image", argv + common)
        assert_distributed_run(output, tmp_path, adapters.DIFFUSERS_WEIGHT_NAME)
    else:
        argv = ["--model_name_or_path", str(tiny_llama_path), "--block_size", "32", "--with_tracking"]
        argv += ["--train_file", str(tiny_text_path / "train.txt"), "--report_to", "tensorboard"]
        argv += ["--validation_file", str(tiny_text_path / "validation.txt"), "--per_device_train_batch_size", "2"]
        output = launch("diffusers_lowmem.train_causal_lm", argv + common)
        assert_distributed_run(output, tmp_path, adapters.LYCORIS_WEIGHT_NAME)


def scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar the run logged: tag -> [(step, value)]."""
    values = {}
    for events in Path(output_dir, "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values[tag] = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return values


def cosine(step: int, total: int, warmup: int = 0) -> float:
    """diffusers' cosine schedule (with linear warm-up) after `step` of `total` optimizer steps."""
    if step < warmup:
        return PEAK_LR * step / warmup
    return PEAK_LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def schedule_argv(trainer: str, paths: dict, output_dir: Path, batch_size: int, *extra: str) -> list[str]:
    common = ["--seed", "0", "--learning_rate", str(PEAK_LR), "--output_dir", str(output_dir), *extra]
    if trainer == "text-to-image":
        argv = ["--pretrained_model_name_or_path", str(paths["sd"]), "--train_data_dir", str(paths["images"])]
        argv += ["--resolution", "32", "--train_batch_size", str(batch_size), "--lr_scheduler", "cosine"]
        return argv + common
    argv = ["--model_name_or_path", str(paths["llama"]), "--block_size", "32", "--with_tracking"]
    argv += [
        "--train_file",
        str(paths["text"] / "train.txt"),
        "--validation_file",
        str(paths["text"] / "validation.txt"),
    ]
    argv += ["--per_device_train_batch_size", str(batch_size), "--lr_scheduler_type", "cosine"]
    return argv + common


MODULES = {"text-to-image": "diffusers_lowmem.train_text_to_image", "causal-lm": "diffusers_lowmem.train_causal_lm"}
# Training examples: 8 tiny images; the tiny text in 32-token blocks.
NUM_EXAMPLES = {"text-to-image": 8, "causal-lm": 187}


@pytest.mark.parametrize("trainer", ["text-to-image", "causal-lm"])
def test_two_processes_train_num_train_epochs_with_the_lr_decaying_to_zero_at_the_last_step(
    trainer, tiny_dir, tmp_path
):
    # Batches that do not divide between the processes: accelerate completes the last round from the start, so
    # each process sees ceil(batches / 2) per epoch. t2i: 8 images / 3 = 3 batches -> 2 per process; causal:
    # 187 blocks / 40 = 5 batches -> 3 per process. Two epochs, no accumulation, no warm-up.
    batch_size, steps_per_epoch = {"text-to-image": (3, 2), "causal-lm": (40, 3)}[trainer]
    total_steps = 2 * steps_per_epoch
    argv = schedule_argv(trainer, tiny_paths(tiny_dir), tmp_path, batch_size, "--num_train_epochs", "2")
    argv += ["--lr_warmup_steps" if trainer == "text-to-image" else "--num_warmup_steps", "0"]
    output = launch(MODULES[trainer], argv)

    assert f"Num examples = {NUM_EXAMPLES[trainer]}" in output
    assert "Num Epochs = 2" in output
    assert f"Batches per process and epoch = {steps_per_epoch}" in output
    assert f"Total optimization steps = {total_steps}" in output
    assert json.loads((tmp_path / training.TRAINING_SUMMARY_NAME).read_text())["global_step"] == total_steps
    logged = scalars(tmp_path)
    expected = [(step, cosine(step, total_steps)) for step in range(1, total_steps + 1)]
    assert [step for step, _ in logged["lr"]] == [step for step, _ in expected]
    assert [lr for _, lr in logged["lr"]] == pytest.approx([lr for _, lr in expected], abs=1e-9)
    assert logged["lr"][-1][1] == pytest.approx(0.0, abs=1e-12)
    if trainer == "causal-lm":  # the end of each epoch is logged, at the step it ends
        assert logged["epoch"] == [(steps_per_epoch, 0.0), (total_steps, 1.0)]


@pytest.mark.parametrize("trainer", ["text-to-image", "causal-lm"])
def test_two_processes_max_train_steps_with_warmup_and_accumulation_and_their_resume(trainer, tiny_dir, tmp_path):
    # 4 batches per process (t2i: 8 images of batch 1; causal: 187 blocks / 16 = 12 batches -> 6) accumulated by 3
    # or 4: 2 optimizer steps per epoch, the second one partial. --max_train_steps 3: 2 epochs, the last cut short.
    batch_size, batches_per_epoch, accumulation = {"text-to-image": (1, 4, 3), "causal-lm": (16, 6, 4)}[trainer]
    warmup_flag = "--lr_warmup_steps" if trainer == "text-to-image" else "--num_warmup_steps"
    extra = ["--max_train_steps", "3", "--gradient_accumulation_steps", str(accumulation), warmup_flag, "1"]
    extra += ["--checkpointing_steps", "1"]
    paths = tiny_paths(tiny_dir)
    output = launch(MODULES[trainer], schedule_argv(trainer, paths, tmp_path / "full", batch_size, *extra))

    assert f"Batches per process and epoch = {batches_per_epoch}" in output
    assert "Optimization steps per epoch = 2" in output
    assert "Total optimization steps = 3" in output
    assert "Num Epochs = 2" in output
    full = scalars(tmp_path / "full")
    # Warm-up over step 1; then the cosine from the peak to 0 over steps 1..3.
    assert [step for step, _ in full["lr"]] == [1, 2, 3]
    assert [lr for _, lr in full["lr"]] == pytest.approx([PEAK_LR, PEAK_LR / 2, 0.0], abs=1e-9)
    assert json.loads((tmp_path / "full" / training.TRAINING_SUMMARY_NAME).read_text())["global_step"] == 3

    # Resumed after step 1: epoch 0 after its first 3 or 4 batches; then the same steps, rates and adapter.
    checkpoint = tmp_path / "full" / "checkpoint-1"
    resume_argv = schedule_argv(trainer, paths, tmp_path / "resumed", batch_size, *extra)
    output = launch(MODULES[trainer], [*resume_argv, "--resume_from_checkpoint", str(checkpoint)])
    assert f"Resumed from {checkpoint} at step 1 (epoch 0)." in output
    resumed = scalars(tmp_path / "resumed")
    assert [step for step, _ in resumed["lr"]] == [2, 3]
    assert [lr for _, lr in resumed["lr"]] == pytest.approx([lr for _, lr in full["lr"][1:]], abs=1e-9)
    weights_name = adapters.DIFFUSERS_WEIGHT_NAME if trainer == "text-to-image" else adapters.LYCORIS_WEIGHT_NAME
    full_weights = load_file(tmp_path / "full" / weights_name)
    resumed_weights = load_file(tmp_path / "resumed" / weights_name)
    assert full_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(full_weights[key], resumed_weights[key]) for key in full_weights)
