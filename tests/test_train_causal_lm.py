"""The causal-LM drop-in trainer on the tiny Llama and GPT-2: every adapter x quantization, perplexity as upstream,
outputs that load with `load_adapter` and peft, memory in TensorBoard, exact resumption, and a model that learns."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffusers_lowmem import adapters, data, quantization, train_causal_lm
from diffusers_lowmem import args as arg_groups
from diffusers_lowmem.training import list_checkpoints

SPEC = Path(__file__).parent / "spec" / "run_clm_no_trainer.flags"
MEMORY_MILESTONES = ("after_model_load", "after_adapter", "after_first_step")
BLOCK_SIZE = 32
EVAL_BATCH_SIZE = 8
# The factor of each algorithm that LyCORIS initialises to zero: nonzero after training means the adapter learned.
ZERO_INIT_FACTORS = {"lora": ("lora_up.weight",), "locon": ("lora_up.weight",), "loha": ("hada_w2_a",)}
ZERO_INIT_FACTORS["lokr"] = ("lokr_w2", "lokr_w2_b")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a separate `accelerate launch` would."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train_argv(model_path, text_path, output_dir, *extra):
    return [
        "--model_name_or_path", str(model_path),
        "--train_file", str(Path(text_path, "train.txt")),
        "--validation_file", str(Path(text_path, "validation.txt")),
        "--block_size", str(BLOCK_SIZE),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", str(EVAL_BATCH_SIZE),
        "--learning_rate", "1e-3",
        "--seed", "0",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def run(argv):
    return train_causal_lm.main(train_causal_lm.parse_args(argv))


def scalar_tags(output_dir: Path) -> dict[str, list[float]]:
    values = {}
    for events in Path(output_dir, "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values[tag] = [event.value for event in accumulator.Scalars(tag)]
    return values


def fresh_model(model_path, quant="none"):
    """The base as the trainer prepares it (GPT-2's Conv1D as nn.Linear), on the CPU in fp32, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    quantization.conv1d_to_linear_(model)
    if quant != "none":
        quantization.quantize_model(model, quant, skip=quantization.DEFAULT_SKIP_CAUSAL_LM, compute_errors=False)
    return model


_VALIDATION_BATCHES = {}


def validation_batches(model_path, text_path) -> list[dict]:
    """The validation split in `BLOCK_SIZE` blocks, batched as the trainer's evaluation loader batches it."""
    key = (str(model_path), str(text_path))
    if key not in _VALIDATION_BATCHES:
        raw = data.load_text_datasets(
            None, None, str(Path(text_path, "train.txt")), str(Path(text_path, "validation.txt"))
        )
        blocks = data.tokenize_and_group(raw, AutoTokenizer.from_pretrained(model_path), BLOCK_SIZE)["validation"]
        loader = torch.utils.data.DataLoader(blocks, batch_size=EVAL_BATCH_SIZE, collate_fn=data.causal_lm_collate)
        _VALIDATION_BATCHES[key] = list(loader)
    return _VALIDATION_BATCHES[key]


def eval_loss_of(model, model_path, text_path) -> float:
    """Upstream's eval loss: each batch's loss counted once per block (`gather_for_metrics` trims the repeated loss
    of the last, partial batch to its blocks), averaged."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in validation_batches(model_path, text_path):
            total += model(**batch).loss.item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return total / count


def logits(model, model_path, text_path):
    with torch.no_grad():
        return model(input_ids=validation_batches(model_path, text_path)[0]["input_ids"]).logits


def check_run_outputs(output_dir, adapter, quant, model_path, text_path, summary):
    """What every run must leave: results as upstream, a loadable adapter that learned, memory milestones."""
    results = json.loads((output_dir / "all_results.json").read_text())
    assert math.isfinite(results["perplexity"]) and results["perplexity"] > 1
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))

    weights = load_file(output_dir / adapters.LYCORIS_WEIGHT_NAME)
    learned = [key for key in weights if key.endswith(ZERO_INIT_FACTORS[adapter])]
    assert learned and all(weights[key].abs().max() > 0 for key in learned)

    # The saved adapter, loaded into a fresh base, reproduces the trained model's evaluation.
    base_loss = eval_loss_of(fresh_model(model_path, quant), model_path, text_path)
    loaded = fresh_model(model_path, quant)
    adapters.load_adapter(loaded, output_dir)
    assert eval_loss_of(loaded, model_path, text_path) == pytest.approx(results["eval_loss"], abs=2e-5)
    assert abs(base_loss - results["eval_loss"]) > 1e-4  # the comparison can tell the adapter is there

    report = json.loads((output_dir / "memory_report.json").read_text())
    assert set(report["milestones"]) >= set(MEMORY_MILESTONES)
    assert report["params"]["trainable"] > 0
    training_summary = json.loads((output_dir / "training_summary.json").read_text())
    assert training_summary["global_step"] == summary["global_step"]
    assert len(training_summary["step_seconds"]) == summary["global_step"]
    assert (output_dir / "tokenizer_config.json").is_file()
    return loaded


def check_peft_export(output_dir, expected_model, model_path, text_path, peft_base):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(peft_base, output_dir)
    expected = logits(expected_model, model_path, text_path)
    torch.testing.assert_close(logits(peft_model, model_path, text_path), expected, atol=1e-5, rtol=1e-5)


def test_parser_accepts_every_upstream_flag_with_upstream_default():
    spec = arg_groups.parse_spec(SPEC)
    args = train_causal_lm.parse_args(["--model_name_or_path", "architecture:tiny-llama", "--dataset_name", "x/y"])
    for flag, attributes in spec.items():
        destination = flag.lstrip("-")
        assert hasattr(args, destination), flag
        if "default" in attributes and flag != "--dataset_name":
            assert getattr(args, destination) == arg_groups.spec_value(attributes["default"]), flag
    assert args.adapter == "lora" and args.quant is None and args.memory_log_steps == 1


def test_help_documents_every_group(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_causal_lm.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("Adapter (LyCORIS)", "Quantization", "Memory", "--checkpointing_steps", "--memory_log_steps"):
        assert expected in text


@pytest.mark.parametrize("quant", ["none", "8bit", "nf4"])
@pytest.mark.parametrize("adapter", adapters.ADAPTER_ALGOS)
def test_every_adapter_and_quantization_trains_saves_and_reloads(
    adapter, quant, tiny_llama_path, tiny_text_path, tmp_path
):
    extra = ["--adapter", adapter, "--max_train_steps", "2", "--rank", "4", "--with_tracking"]
    extra += ["--report_to", "tensorboard"] + ([] if quant == "none" else ["--quant", quant])
    summary = run(train_argv(tiny_llama_path, tiny_text_path, tmp_path, *extra))
    assert summary["global_step"] == 2 and math.isfinite(summary["loss"])
    loaded = check_run_outputs(tmp_path, adapter, quant, tiny_llama_path, tiny_text_path, summary)

    tags = scalar_tags(tmp_path)
    for milestone in MEMORY_MILESTONES:
        assert any(tag.startswith(f"memory/{milestone}/") for tag in tags), (milestone, sorted(tags))
    assert any(tag.startswith("memory/step/") and len(values) == 2 for tag, values in tags.items())
    assert tags["perplexity"] == [pytest.approx(summary["perplexity"])]

    # peft represents lora on any base and loha/lokr on an unquantized one.
    exported = adapter in ("lora", "locon") or quant == "none"
    assert (summary["peft"] is not None) == exported == (tmp_path / "adapter_config.json").is_file()
    if exported:
        check_peft_export(tmp_path, loaded, tiny_llama_path, tiny_text_path, fresh_model(tiny_llama_path, quant))


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gpt2_conv1d_layers_train_with_lora(quant, tiny_gpt2_path, tiny_text_path, tmp_path):
    extra = ["--adapter", "lora", "--max_train_steps", "2"] + ([] if quant == "none" else ["--quant", quant])
    summary = run(train_argv(tiny_gpt2_path, tiny_text_path, tmp_path, *extra))
    assert summary["global_step"] == 2
    loaded = check_run_outputs(tmp_path, "lora", quant, tiny_gpt2_path, tiny_text_path, summary)
    weights = load_file(tmp_path / adapters.LYCORIS_WEIGHT_NAME)
    assert any("_attn_c_attn." in key for key in weights) and any("_mlp_c_fc." in key for key in weights)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    # Unquantized, the peft adapter loads into GPT-2 exactly as transformers builds it, with its Conv1D layers.
    peft_base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval() if quant == "none" else None
    check_peft_export(
        tmp_path, loaded, tiny_gpt2_path, tiny_text_path, peft_base or fresh_model(tiny_gpt2_path, quant)
    )


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_bf16_base_with_gradient_checkpointing_keeps_fp32_adapters(quant, tiny_llama_path, tiny_text_path, tmp_path):
    extra = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--max_train_steps", "2"]
    extra += [] if quant == "none" else ["--quant", quant]
    summary = run(train_argv(tiny_llama_path, tiny_text_path, tmp_path, *extra))
    assert math.isfinite(summary["perplexity"])
    weights = load_file(tmp_path / adapters.LYCORIS_WEIGHT_NAME)
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert any(weights[key].abs().max() > 0 for key in weights if key.endswith("lora_up.weight"))
    report = json.loads((tmp_path / "memory_report.json").read_text())
    unquantized_fp32_bytes = sum(p.numel() * 4 for p in fresh_model(tiny_llama_path).parameters())
    assert report["breakdown"]["frozen_weights"] < 0.55 * unquantized_fp32_bytes  # bf16 (and nf4) frozen weights


def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(tiny_llama_path, tiny_text_path, tmp_path):
    # Dropout on the adapter path (bypass mode on nf4), gradient accumulation, and 12 batches = 6 updates an epoch:
    # the resumed part crosses an epoch boundary and its evaluation.
    common = ["--adapter", "lora", "--quant", "nf4", "--adapter_dropout", "0.2", "--per_device_train_batch_size", "16"]
    common += ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "3", "--max_train_steps", "8"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run(train_argv(tiny_llama_path, tiny_text_path, uninterrupted, *common))
    # The "crash": only checkpoint-3 survived.
    shutil.copytree(uninterrupted / "checkpoint-3", resumed / "checkpoint-3")
    summary = run(train_argv(tiny_llama_path, tiny_text_path, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert summary["global_step"] == 8
    # It resumed (a fresh run with the same seed would also end equal): only steps 4 to 8 ran.
    assert len(json.loads((resumed / "training_summary.json").read_text())["step_seconds"]) == 5
    expected = load_file(uninterrupted / adapters.LYCORIS_WEIGHT_NAME)
    actual = load_file(resumed / adapters.LYCORIS_WEIGHT_NAME)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert json.loads((resumed / "checkpoint-6" / "training_state.json").read_text()) == {"seed": 0, "global_step": 6}

    # Resuming mid-epoch from a checkpoint at --max_train_steps trains nothing more and still evaluates.
    finished = tmp_path / "finished"
    shutil.copytree(uninterrupted / "checkpoint-3", finished / "checkpoint-3")
    AcceleratorState._reset_state(reset_partial_state=True)
    at_the_end = [*common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    summary = run(train_argv(tiny_llama_path, tiny_text_path, finished, *at_the_end))
    assert summary["global_step"] == 3 and math.isfinite(summary["perplexity"])
    at_three = load_file(finished / "checkpoint-3" / adapters.LYCORIS_WEIGHT_NAME)
    final = load_file(finished / adapters.LYCORIS_WEIGHT_NAME)
    assert all(torch.equal(at_three[key], final[key]) for key in at_three)


def test_latest_without_checkpoints_starts_a_new_run(tiny_llama_path, tiny_text_path, tmp_path):
    summary = run(
        train_argv(
            tiny_llama_path, tiny_text_path, tmp_path, "--max_train_steps", "1", "--resume_from_checkpoint", "latest"
        )
    )
    assert summary["global_step"] == 1


def test_epoch_checkpoints_and_total_limit(tiny_llama_path, tiny_text_path, tmp_path):
    # 128-token blocks, batch 16: 3 updates an epoch.
    extra = ["--block_size", "128", "--per_device_train_batch_size", "16", "--num_train_epochs", "2"]
    extra += ["--checkpointing_steps", "epoch", "--checkpoints_total_limit", "1"]
    summary = run(train_argv(tiny_llama_path, tiny_text_path, tmp_path, *extra))
    assert summary["global_step"] == 6
    assert [path.name for path in list_checkpoints(tmp_path)] == ["checkpoint-6"]
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / adapters.LYCORIS_WEIGHT_NAME).is_file()
    # Only adapter weights are stored, never the frozen base.
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("pytorch_model*.bin"))


def test_gradient_checkpointing_gives_the_same_adapter(tiny_llama_path, tiny_text_path, tmp_path):
    common = ["--adapter", "loha", "--max_train_steps", "2"]
    run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "plain", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "checkpointed", *common, "--gradient_checkpointing"))
    plain = load_file(tmp_path / "plain" / adapters.LYCORIS_WEIGHT_NAME)
    checkpointed = load_file(tmp_path / "checkpointed" / adapters.LYCORIS_WEIGHT_NAME)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5)


def test_the_model_learns(tiny_llama_path, tiny_text_path, tmp_path):
    extra = ["--adapter", "lora", "--rank", "8", "--per_device_train_batch_size", "8"]
    # A run of 0 steps evaluates the untrained model: its perplexity is the base's.
    run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "initial", *extra, "--max_train_steps", "0"))
    initial = json.loads((tmp_path / "initial" / "all_results.json").read_text())["perplexity"]
    base_loss = eval_loss_of(fresh_model(tiny_llama_path), tiny_llama_path, tiny_text_path)
    assert initial == pytest.approx(math.exp(base_loss), rel=1e-4)

    AcceleratorState._reset_state(reset_partial_state=True)
    summary = run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "trained", *extra, "--max_train_steps", "80"))
    final = json.loads((tmp_path / "trained" / "all_results.json").read_text())["perplexity"]
    assert final == pytest.approx(summary["perplexity"])
    assert final < 0.8 * initial, (initial, final)


def test_measure_frozen_base_reports_the_quantized_base(tiny_llama_path, tiny_text_path, tmp_path):
    args = train_causal_lm.parse_args(train_argv(tiny_llama_path, tiny_text_path, tmp_path, "--quant", "nf4"))
    report = train_causal_lm.measure_frozen_base(args)
    assert set(report["milestones"]) == {"after_model_load", "after_first_step"}
    assert report["params"]["trainable"] == 0 and report["breakdown"]["optimizer_state"] == 0
    assert json.loads((tmp_path / "memory_report.json").read_text())["params"] == report["params"]


def test_architecture_builds_a_random_model_and_trains(tiny_text_path, tmp_path):
    argv = train_argv("architecture:tiny-llama", tiny_text_path, tmp_path, "--quant", "nf4", "--max_train_steps", "2")
    summary = run(argv)
    assert summary["global_step"] == 2 and math.isfinite(summary["perplexity"])
    assert (tmp_path / adapters.LYCORIS_WEIGHT_NAME).is_file()


def test_module_runs_under_accelerate_launch(tiny_gpt2_path, tiny_text_path, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusers_lowmem.train_causal_lm",
        *train_argv(tiny_gpt2_path, tiny_text_path, tmp_path, "--adapter", "lokr", "--quant", "8bit"),
        "--max_train_steps", "2", "--with_tracking",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / adapters.LYCORIS_WEIGHT_NAME).is_file()
    assert (tmp_path / "memory_report.md").is_file()
    assert math.isfinite(json.loads((tmp_path / "all_results.json").read_text())["perplexity"])
    assert "Steps" in completed.stderr  # the progress bar


def test_a_nonfinite_loss_stops_with_the_step_and_last_checkpoint(tiny_llama_path, tiny_text_path, tmp_path):
    from diffusers_lowmem.training import NonFiniteLossError

    extra = ["--max_train_steps", "8", "--learning_rate", "1e30", "--checkpointing_steps", "1"]
    with pytest.raises(NonFiniteLossError, match=r"at step \d+\. Last good checkpoint: "):
        run(train_argv(tiny_llama_path, tiny_text_path, tmp_path, *extra))
    assert not (tmp_path / adapters.LYCORIS_WEIGHT_NAME).exists()


def test_skip_nonfinite_loss_finishes_with_a_finite_adapter(tiny_llama_path, tiny_text_path, tmp_path):
    extra = ["--max_train_steps", "6", "--learning_rate", "1e30", "--skip_nonfinite_loss"]
    run(train_argv(tiny_llama_path, tiny_text_path, tmp_path, *extra))
    weights = load_file(tmp_path / adapters.LYCORIS_WEIGHT_NAME)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_llama_path, tiny_text_path, tmp_path):
    import signal
    import time

    argv = train_argv(tiny_llama_path, tiny_text_path, tmp_path, "--max_train_steps", "100000", "--with_tracking")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusers_lowmem.train_causal_lm", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(Path(tmp_path).rglob("events.out.tfevents.*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-2000:]
    checkpoints = list_checkpoints(tmp_path)
    assert len(checkpoints) == 1
    assert f"Stopped by SIGTERM at step {checkpoints[0].name.split('-')[1]}; saved {checkpoints[0]}" in output


def test_chunked_loss_trains_the_same_adapter_as_upstreams_loss(tiny_llama_path, tiny_text_path, tmp_path):
    """--loss_chunk_size (on by default) against upstream's loss on the full logits: the same losses, eval loss and
    adapter, in fp32 and with gradient checkpointing."""
    common = ["--adapter", "lora", "--max_train_steps", "3", "--gradient_checkpointing", "--loss_chunk_size"]
    upstream = run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "upstream", *common, "0"))
    AcceleratorState._reset_state(reset_partial_state=True)
    chunked = run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "chunked", *common, "5"))
    assert chunked["loss"] == pytest.approx(upstream["loss"], rel=1e-5)
    assert chunked["eval_loss"] == pytest.approx(upstream["eval_loss"], rel=1e-5)
    reference = load_file(tmp_path / "upstream" / adapters.LYCORIS_WEIGHT_NAME)
    weights = load_file(tmp_path / "chunked" / adapters.LYCORIS_WEIGHT_NAME)
    assert weights.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], atol=1e-6, rtol=1e-5)


def test_offload_activations_trains_the_same_adapter_and_reports_the_allocator(
    tiny_llama_path, tiny_text_path, tmp_path, monkeypatch
):
    from diffusers_lowmem import allocator

    for name in allocator.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    common = ["--adapter", "lokr", "--max_train_steps", "2", "--gradient_checkpointing", "--mixed_precision", "bf16"]
    run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "plain", *common))
    AcceleratorState._reset_state(reset_partial_state=True)
    run(train_argv(tiny_llama_path, tiny_text_path, tmp_path / "offload", *common, "--offload_activations"))
    reference = load_file(tmp_path / "plain" / adapters.LYCORIS_WEIGHT_NAME)
    weights = load_file(tmp_path / "offload" / adapters.LYCORIS_WEIGHT_NAME)
    assert all(torch.equal(weights[key], reference[key]) for key in reference)
    report = json.loads((tmp_path / "offload" / "memory_report.json").read_text())
    assert report["allocator"] == {
        "variable": "PYTORCH_CUDA_ALLOC_CONF",
        "value": "expandable_segments:True",
        "set_by": "diffusers_lowmem",
    }
