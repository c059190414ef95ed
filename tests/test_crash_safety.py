"""SIGKILL, the signal no handler sees: a run killed while saving a checkpoint, or between two, loses nothing it had
saved, `--resume_from_checkpoint latest` skips the half-written checkpoint, and the resumed run ends with the same
adapter as an uninterrupted one.

Each run is a real process. To kill it at an exact point, it starts through a small launcher that wraps one accelerate
method (`Accelerator.save_state` or `AcceleratedOptimizer.step`) so that, after its N-th call returns, the process
sends itself SIGKILL: the state on disk is whatever the real code had written by then.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from diffusers_lowmem import adapters

KILL_AFTER_CALL = textwrap.dedent(
    """
    import os, runpy, signal, sys

    import accelerate
    import accelerate.optimizer

    target, count, module = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    methods = {
        "save": (accelerate.Accelerator, "save_state"),
        "step": (accelerate.optimizer.AcceleratedOptimizer, "step"),
    }
    if target in methods:
        owner, name = methods[target]
        original, calls = getattr(owner, name), []

        def kill_after_call(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(1)
            if len(calls) == count:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, kill_after_call)
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)
MODULES = {"text-to-image": "diffusers_lowmem.train_text_to_image", "causal-lm": "diffusers_lowmem.train_causal_lm"}
WEIGHTS = {"text-to-image": adapters.DIFFUSERS_WEIGHT_NAME, "causal-lm": adapters.LYCORIS_WEIGHT_NAME}


def train(trainer, argv, kill_at=("none", 0)):
    """Runs a trainer in its own process; `kill_at=("save", 2)` SIGKILLs it right after its second `save_state`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", KILL_AFTER_CALL, kill_at[0], str(kill_at[1]), MODULES[trainer], *argv]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return completed.returncode, completed.stdout + completed.stderr


@pytest.fixture
def argv_for(tiny_sd_path, tiny_images_path, tiny_llama_path, tiny_text_path):
    def argv(trainer, output_dir, *extra):
        common = ["--adapter", "lokr", "--seed", "0", "--output_dir", str(output_dir), "--max_train_steps", "6"]
        common += ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--learning_rate", "1e-3"]
        if trainer == "text-to-image":
            data = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(tiny_images_path)]
            data += ["--resolution", "32", "--train_batch_size", "2"]
        else:
            data = ["--model_name_or_path", str(tiny_llama_path), "--train_file", str(tiny_text_path / "train.txt")]
            data += ["--block_size", "32", "--per_device_train_batch_size", "2"]
        return data + common + list(extra)

    return argv


def assert_same_adapter(trainer, resumed_dir, reference_dir):
    resumed = load_file(resumed_dir / WEIGHTS[trainer])
    reference = load_file(reference_dir / WEIGHTS[trainer])
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("trainer", ["text-to-image", "causal-lm"])
def test_sigkill_at_a_save_and_between_saves_loses_nothing(trainer, argv_for, tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    returncode, output = train(trainer, argv_for(trainer, reference_dir))
    assert returncode == 0, output[-3000:]

    # Killed while saving checkpoint-4 (the second save): its state is written but not yet committed.
    killed_dir = tmp_path / "killed-at-save"
    returncode, output = train(trainer, argv_for(trainer, killed_dir), kill_at=("save", 2))
    assert returncode == -signal.SIGKILL, output[-3000:]
    assert (killed_dir / "checkpoint-4.partial").is_dir()
    # The previous checkpoint survives although --checkpoints_total_limit is 1.
    assert sorted(path.name for path in killed_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4.partial"]
    returncode, output = train(trainer, argv_for(trainer, killed_dir, "--resume_from_checkpoint", "latest"))
    assert returncode == 0, output[-3000:]
    assert f"Resumed from {killed_dir / 'checkpoint-2'} at step 2" in output
    assert sorted(path.name for path in killed_dir.glob("checkpoint-*")) == ["checkpoint-6"]
    assert_same_adapter(trainer, killed_dir, reference_dir)

    # Killed between saves, after the optimizer step of step 3: resumes from checkpoint-2.
    killed_dir = tmp_path / "killed-mid-run"
    returncode, output = train(trainer, argv_for(trainer, killed_dir), kill_at=("step", 3))
    assert returncode == -signal.SIGKILL, output[-3000:]
    assert sorted(path.name for path in killed_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (killed_dir / WEIGHTS[trainer]).exists()
    returncode, output = train(trainer, argv_for(trainer, killed_dir, "--resume_from_checkpoint", "latest"))
    assert returncode == 0, output[-3000:]
    assert_same_adapter(trainer, killed_dir, reference_dir)


CAPPED_ADDRESS_SPACE = textwrap.dedent(
    """
    import resource, runpy, sys

    import psutil

    import diffusers_lowmem.train_text_to_image  # imported outside the cap

    limit = psutil.Process().memory_info().vms + int(float(sys.argv[1]) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.argv = ["train_text_to_image", *sys.argv[2:]]
    runpy.run_module("diffusers_lowmem.train_text_to_image", run_name="__main__", alter_sys=True)
    """
)


def test_out_of_memory_writes_the_report_and_says_what_to_try(tiny_sd_path, tiny_images_path, tmp_path):
    """1 GiB more address space loads the tiny pipeline but not a step at 512 px and batch 16 (several GiB)."""
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--train_data_dir", str(tiny_images_path)]
    argv += [
        "--resolution",
        "512",
        "--train_batch_size",
        "16",
        "--max_train_steps",
        "2",
        "--output_dir",
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", CAPPED_ADDRESS_SPACE, "1.0", *argv]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 1, output[-3000:]
    assert "Out of memory on cpu (peak RSS " in output
    for hint in ("--gradient_checkpointing", "--quant nf4", "--train_batch_size", "--cache_latents"):
        assert hint in output
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert "can't allocate memory" in report["out_of_memory"]
    assert {"after_model_load", "after_adapter"} <= set(report["milestones"])
    assert "Traceback" not in output


def test_a_new_run_in_a_folder_with_checkpoints_warns_before_writing_beside_them(tmp_path, caplog):
    from diffusers_lowmem import training

    assert training.resolve_resume_checkpoint(tmp_path, None) is None
    assert not caplog.records  # nothing to warn about in an empty folder
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / training.TRAINING_STATE_NAME).write_text(json.dumps({"global_step": step}))
    with caplog.at_level(logging.WARNING, logger="diffusers_lowmem.training"):
        assert training.resolve_resume_checkpoint(tmp_path, None) is None
    (record,) = caplog.records
    assert "checkpoint-2 ... checkpoint-10" in record.getMessage()
    assert "--resume_from_checkpoint latest" in record.getMessage()
    assert training.resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-10"
