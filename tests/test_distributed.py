"""Both trainers data-parallel on 2 CPU processes (gloo) with an nf4 base and LoKr, as `torchrun` launches them:
the distributed state is logged, only the main process writes, and the adapters end identical on both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_lowmem import adapters

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


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
