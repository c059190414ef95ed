"""Tests of `diffusers_lowmem.memory`: exact breakdowns, TensorBoard logging through accelerate, reports."""

import gc
import json
import os
import socket
import traceback
import weakref
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from diffusers_lowmem.memory import (
    CUDA_BLOCK_BYTES,
    GIB,
    LiveTensorCounter,
    MemoryBreakdown,
    MemoryTracker,
    device_memory,
    memory_breakdown,
)

FLOAT32 = 4
REPORT_KEYS = {"device", "milestones", "peak", "breakdown", "params", "steps_logged"}
BREAKDOWN_KEYS = {"frozen_weights", "trainable_params", "gradients", "optimizer_state", "activations_peak"}


def frozen_first_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    model[0].requires_grad_(False)
    return model


def train_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, model[0].in_features)).square().mean().backward()
    optimizer.step()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


# Hand-computed sizes of `frozen_first_mlp`.
FROZEN_BYTES = (16 * 32 + 32) * FLOAT32
TRAINABLE_BYTES = (32 * 8 + 8) * FLOAT32
# AdamW: exp_avg and exp_avg_sq like each parameter, plus a float32 scalar `step` tensor per parameter (2 of them).
ADAMW_STATE_BYTES = 2 * TRAINABLE_BYTES + 2 * FLOAT32


def test_breakdown_of_partly_frozen_mlp_after_adamw_step_is_exact():
    model = frozen_first_mlp()
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    train_one_step(model, optimizer)

    breakdown = memory_breakdown([model], optimizer)

    steps = [state["step"] for state in optimizer.state.values()]
    assert [(step.dtype, step.numel()) for step in steps] == [(torch.float32, 1)] * 2
    assert breakdown == MemoryBreakdown(
        frozen_weights=FROZEN_BYTES,
        trainable_params=TRAINABLE_BYTES,
        gradients=TRAINABLE_BYTES,
        optimizer_state=ADAMW_STATE_BYTES,
        activations_peak=None,
    )
    assert breakdown.static_total == FROZEN_BYTES + 2 * TRAINABLE_BYTES + ADAMW_STATE_BYTES
    assert breakdown.to_dict() == {
        "frozen_weights": 2176,
        "trainable_params": 1056,
        "gradients": 1056,
        "optimizer_state": 2120,
        "activations_peak": None,
    }


def test_breakdown_counts_buffers_as_frozen_and_grads_only_while_they_exist():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    # BatchNorm: running_mean, running_var (float32) and num_batches_tracked (int64) are buffers.
    buffer_bytes = 8 * FLOAT32 * 2 + 8
    parameter_bytes = (8 * 8 + 8 + 8 + 8) * FLOAT32

    with_grads = memory_breakdown(model, optimizer)
    optimizer.step()
    optimizer.zero_grad()
    without_grads = memory_breakdown(model, optimizer)

    assert (with_grads.frozen_weights, with_grads.trainable_params) == (buffer_bytes, parameter_bytes)
    assert with_grads.gradients == parameter_bytes
    # SGD without momentum keeps no tensors; zero_grad sets the gradients to None.
    assert (without_grads.gradients, without_grads.optimizer_state) == (0, 0)


def test_breakdown_counts_nf4_weight_with_its_quant_state():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 128, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        layer.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    layer = layer.to("cpu")

    breakdown = memory_breakdown([layer])

    weight = layer.weight
    quant_state = weight.quant_state
    packed = 64 * 128 // 2  # two 4-bit values a byte
    assert weight.dtype == torch.uint8 and weight.numel() == packed
    nested_absmax = quant_state.state2.absmax
    expected = (
        packed
        + quant_state.absmax.numel() * quant_state.absmax.element_size()  # uint8: double-quantized absmax
        + quant_state.offset.numel() * quant_state.offset.element_size()  # float32 offset of the absmax
        + nested_absmax.numel() * nested_absmax.element_size()  # float32, one per 256 absmax
        + quant_state.code.numel() * quant_state.code.element_size()  # 16 nf4 levels, float32
        + quant_state.state2.code.numel() * quant_state.state2.code.element_size()  # 256-entry 8-bit map, float32
    )
    assert expected == 4096 + 128 + 4 + 4 + 64 + 1024
    assert breakdown.frozen_weights == expected
    assert breakdown.trainable_params == 128 * FLOAT32  # the float32 bias stays trainable


def test_breakdown_counts_bitsandbytes_8bit_adam_state_and_shared_maps_once():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Linear(128, 64)
    optimizer = bnb.optim.AdamW8bit(model.parameters(), min_8bit_size=16)
    model(torch.randn(4, 128)).sum().backward()
    optimizer.step()

    breakdown = memory_breakdown([model], optimizer)

    # Per parameter: state1 and state2 as uint8, one float32 absmax per 256-value block for each; the signed and
    # unsigned 256-entry float32 quantization maps are shared by all parameters.
    weight_state = 2 * 64 * 128 + 2 * (64 * 128 // 256) * FLOAT32
    bias_state = 2 * 64 + 2 * 1 * FLOAT32
    shared_maps = 2 * 256 * FLOAT32
    assert breakdown.optimizer_state == weight_state + bias_state + shared_maps
    assert breakdown.gradients == breakdown.trainable_params == (128 * 64 + 64) * FLOAT32


def test_breakdown_counts_shared_modules_once_and_unwraps_accelerate_and_ddp(tmp_path):
    shared = nn.Linear(16, 16)
    first, second = nn.Sequential(shared, nn.Linear(16, 4)), nn.Sequential(shared, nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(list(first.parameters()) + list(second[1].parameters()))
    train_one_step(first, optimizer)
    plain = memory_breakdown([first, second], optimizer)

    accelerator = Accelerator(cpu=True)
    prepared_first, prepared_optimizer = accelerator.prepare(first, optimizer)
    assert prepared_optimizer is not optimizer and hasattr(prepared_optimizer, "optimizer")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp_second = nn.parallel.DistributedDataParallel(second)
        wrapped = memory_breakdown([prepared_first, ddp_second, first], prepared_optimizer)
    finally:
        torch.distributed.destroy_process_group()

    shared_bytes = (16 * 16 + 16) * FLOAT32
    heads = (16 * 4 + 4 + 16 * 2 + 2) * FLOAT32
    assert plain.trainable_params == shared_bytes + heads
    assert wrapped == plain


def test_tracker_holds_no_reference_to_watched_models():
    model = frozen_first_mlp()
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    tracker = MemoryTracker("cpu", models=[model], optimizer=optimizer)
    model_reference, optimizer_reference = weakref.ref(model), weakref.ref(optimizer)

    del model, optimizer
    gc.collect()

    assert model_reference() is None and optimizer_reference() is None
    # Parameters are counted at watch: counting again finds nothing left.
    tracker.watch()
    assert tracker.breakdown().to_dict() == {key: (None if key == "activations_peak" else 0) for key in BREAKDOWN_KEYS}


def test_device_memory_on_cpu_reads_rss_and_peak():
    held = torch.ones(32 * 2**20, dtype=torch.uint8)  # 32 MiB, touched, so resident
    stats = device_memory("cpu")
    psutil_rss = psutil.Process().memory_info().rss

    assert set(stats) == {"rss", "peak_rss"}
    assert 32 * 2**20 < stats["rss"] <= stats["peak_rss"]
    assert stats["rss"] == pytest.approx(psutil_rss, abs=2**20)
    del held


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    (event_file,) = log_dir.rglob("events.out.tfevents*")
    accumulator = EventAccumulator(str(event_file.parent))
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def test_milestones_and_steps_reach_tensorboard_through_accelerate(tmp_path):
    model = frozen_first_mlp()
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=tmp_path)
    tracker = MemoryTracker(accelerator.device, accelerator, tmp_path, log_every=1, models=[model])
    # Taken before init_trackers, like the trainers' model-load milestone: logged once trackers exist.
    tracker.milestone("after_model_load")
    accelerator.init_trackers("memory-test")
    logged_steps = {0: tracker.log_step(0)}  # logs the pending milestone too
    tracker.watch(optimizer=optimizer)
    train_one_step(model, optimizer)
    after_first_step = tracker.milestone("after_first_step", step=1)
    logged_steps.update({step: tracker.log_step(step) for step in range(1, 4)})
    accelerator.end_training()

    scalars = read_scalars(tmp_path)

    assert set(scalars) == {
        "memory/after_model_load/rss_gib",
        "memory/after_first_step/rss_gib",
        "memory/breakdown/frozen_weights_gib",
        "memory/breakdown/trainable_params_gib",
        "memory/breakdown/gradients_gib",
        "memory/breakdown/optimizer_state_gib",
        "memory/step/rss_gib",
        "memory/step/peak_rss_gib",
    }
    # TensorBoard stores float32.
    step_rss = scalars["memory/step/rss_gib"]
    assert [step for step, _ in step_rss] == [0, 1, 2, 3]
    for step, value in step_rss:
        assert value > 0
        assert value == pytest.approx(logged_steps[step]["memory/step/rss_gib"], rel=1e-6)
    for step, value in scalars["memory/step/peak_rss_gib"]:
        assert value == pytest.approx(logged_steps[step]["memory/step/peak_rss_gib"], rel=1e-6)
        assert value >= logged_steps[step]["memory/step/rss_gib"] * (1 - 1e-6)
    assert scalars["memory/after_model_load/rss_gib"][0][0] == 0
    assert scalars["memory/after_first_step/rss_gib"] == [
        (1, pytest.approx(after_first_step["memory/after_first_step/rss_gib"], rel=1e-6))
    ]
    breakdown = {tag: dict(values) for tag, values in scalars.items() if tag.startswith("memory/breakdown/")}
    assert breakdown == {
        # Step 0: after model load, no gradients and no optimizer yet.
        "memory/breakdown/frozen_weights_gib": {
            0: pytest.approx(FROZEN_BYTES / GIB),
            1: pytest.approx(FROZEN_BYTES / GIB),
        },
        "memory/breakdown/trainable_params_gib": {
            0: pytest.approx(TRAINABLE_BYTES / GIB),
            1: pytest.approx(TRAINABLE_BYTES / GIB),
        },
        "memory/breakdown/gradients_gib": {0: 0.0, 1: pytest.approx(TRAINABLE_BYTES / GIB)},
        "memory/breakdown/optimizer_state_gib": {0: 0.0, 1: pytest.approx(ADAMW_STATE_BYTES / GIB)},
    }


def test_log_every_skips_steps_not_divisible():
    tracker = MemoryTracker("cpu", log_every=3)

    logged = [step for step in range(1, 11) if tracker.log_step(step) is not None]

    assert logged == [3, 6, 9]
    assert tracker.steps_logged == 3
    assert MemoryTracker("cpu", log_every=0).log_step(5) is None


def test_report_has_exactly_the_documented_keys_and_files_hold_the_tables(tmp_path):
    model = frozen_first_mlp()
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    tracker = MemoryTracker("cpu", output_dir=tmp_path, models=[model], optimizer=optimizer)
    tracker.milestone("after_model_load")
    train_one_step(model, optimizer)
    tracker.milestone("after_first_step", step=1)
    tracker.log_step(1)
    tracker.log_step(2)

    json_path, markdown_path = tracker.write_report(extra={"quantization": {"unet": "nf4"}})
    report = json.loads(json_path.read_text())
    markdown = markdown_path.read_text()

    assert (json_path, markdown_path) == (tmp_path / "memory_report.json", tmp_path / "memory_report.md")
    assert set(report) == REPORT_KEYS | {"quantization"}
    assert set(tracker.report()) == REPORT_KEYS
    assert report["device"] == "cpu"
    assert set(report["milestones"]) == {"after_model_load", "after_first_step"}
    for values in report["milestones"].values():
        assert set(values) == {"allocated", "reserved", "rss"}
        assert values["allocated"] is None and values["reserved"] is None and values["rss"] > 0
    assert set(report["peak"]) == {"allocated", "reserved", "rss"}
    assert report["peak"]["rss"] >= max(values["rss"] for values in report["milestones"].values())
    assert report["breakdown"] == {
        "frozen_weights": FROZEN_BYTES,
        "trainable_params": TRAINABLE_BYTES,
        "gradients": TRAINABLE_BYTES,
        "optimizer_state": ADAMW_STATE_BYTES,
        "activations_peak": None,
    }
    assert report["params"] == {"total": 16 * 32 + 32 + 32 * 8 + 8, "trainable": 32 * 8 + 8}
    assert report["steps_logged"] == 2
    assert report["quantization"] == {"unet": "nf4"}

    rss_cell = f"{report['milestones']['after_model_load']['rss'] / GIB:.3f} GiB"
    assert f"| after_model_load | n/a | n/a | {rss_cell}" in markdown
    assert "| after_first_step | n/a | n/a |" in markdown
    assert "| **peak** | n/a | n/a |" in markdown
    assert "| optimizer_state | 0.000 | 0.0 | 2,120 |" in markdown
    assert "| frozen_weights | 0.000 | 0.0 | 2,176 |" in markdown
    assert "| trainable | 264 (32.673%) |" in markdown
    assert markdown.endswith(tracker.summary_table() + "\n")
    with pytest.raises(ValueError, match="steps_logged"):
        tracker.write_report(extra={"steps_logged": 0})


def test_report_counts_now_when_watched_after_the_last_milestone():
    model = frozen_first_mlp()
    tracker = MemoryTracker("cpu", models=[model])
    tracker.milestone("after_model_load")
    optimizer = torch.optim.AdamW(trainable_parameters(model))
    train_one_step(model, optimizer)

    tracker.watch(optimizer=optimizer)

    assert tracker.report()["breakdown"]["optimizer_state"] == ADAMW_STATE_BYTES


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _logged_by_rank(rank: int, results) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank)})
    try:
        accelerator = Accelerator(cpu=True)
        # Rank 1 has the larger model: the logged breakdown is the maximum over ranks on every rank.
        model = nn.Linear(8, 8 * (rank + 1), bias=False)
        tracker = MemoryTracker(accelerator.device, accelerator, models=[model])
        values = tracker.milestone("after_model_load")
        step_values = tracker.log_step(1)
        results.put((rank, values["memory/breakdown/trainable_params_gib"], step_values["memory/step/rss_gib"]))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:
        results.put((rank, traceback.format_exc(), None))
        raise


def test_several_processes_log_the_maximum_over_ranks(monkeypatch):
    # Two CPU processes over gloo. CUDA hidden: accelerate would otherwise give rank 1 a GPU the machine may lack.
    for name, value in {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "CUDA_VISIBLE_DEVICES": "",
    }.items():
        monkeypatch.setenv(name, value)
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_logged_by_rank, args=(rank, results)) for rank in range(2)]
    for process in processes:
        process.start()
    by_rank = dict((rank, (trainable, rss)) for rank, trainable, rss in (results.get(timeout=120) for _ in range(2)))
    for process in processes:
        process.join(timeout=60)

    assert [process.exitcode for process in processes] == [0, 0], by_rank
    assert by_rank[0][0] == by_rank[1][0] == pytest.approx(8 * 16 * FLOAT32 / GIB)
    assert by_rank[0][1] == by_rank[1][1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_statistics_peaks_and_activation_estimate():
    device = torch.device("cuda")
    model = nn.Linear(1024, 1024).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    tracker = MemoryTracker(device, models=[model], optimizer=optimizer)
    tracker.milestone("after_model_load")
    weights = (1024 * 1024 + 1024) * FLOAT32

    activations = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB held across the step
    model(torch.randn(16, 1024, device=device)).sum().backward()
    optimizer.step()
    del activations
    logged = tracker.log_step(1)
    tracker.milestone("after_first_step", step=1)
    report = tracker.report()
    stats = device_memory(device)

    assert set(stats) == {"allocated", "reserved", "active", "peak_allocated", "peak_reserved", "rss", "peak_rss"}
    assert stats["allocated"] == torch.cuda.memory_allocated(device)
    assert stats["reserved"] == torch.cuda.memory_reserved(device)
    assert set(logged) == {
        f"memory/step/{field}_gib" for field in ("allocated", "reserved", "peak_allocated", "rss", "peak_rss")
    }
    assert logged["memory/step/peak_allocated_gib"] * GIB >= weights + 64 * 2**20
    # log_step reset the peak: the allocator's own peak now no longer holds the 64 MiB, the tracker's does.
    assert torch.cuda.max_memory_allocated(device) < logged["memory/step/peak_allocated_gib"] * GIB
    assert report["peak"]["allocated"] >= logged["memory/step/peak_allocated_gib"] * GIB
    breakdown = report["breakdown"]
    assert breakdown["trainable_params"] == breakdown["gradients"] == weights
    assert breakdown["optimizer_state"] == 2 * weights + 2 * FLOAT32
    static_on_device = weights * 4 + 2 * FLOAT32 if optimizer.state[model.weight]["step"].is_cuda else weights * 4
    assert breakdown["activations_peak"] == report["peak"]["allocated"] - static_on_device
    assert breakdown["activations_peak"] >= 64 * 2**20


# --------------------------------------------------------------------------------------------------------------------
# The live tensor counter
# --------------------------------------------------------------------------------------------------------------------


def test_counter_counts_storages_as_made_and_freed_rounded_to_cuda_blocks():
    with LiveTensorCounter("cpu") as counter:
        first = torch.empty(1000, dtype=torch.float32)  # 4,000 bytes -> 4,096
        view = first[:10].view(2, 5)  # a view shares its base's storage: nothing more
        assert counter.live_bytes == 4096
        second = torch.empty(1, dtype=torch.uint8)  # 1 byte -> one 512-byte block
        assert counter.live_bytes == 4096 + CUDA_BLOCK_BYTES
        del first, view
        gc.collect()
        assert counter.live_bytes == CUDA_BLOCK_BYTES
        del second
    assert counter.live_bytes == 0 and counter.peak_bytes == 4096 + CUDA_BLOCK_BYTES


def test_counter_labels_forward_backward_and_optimizer_step_by_module():
    model = frozen_first_mlp()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with LiveTensorCounter("cpu") as counter:
        counter.adopt(model.parameters())
        counter.name_modules({"mlp": model})
        counter.phase = "forward"
        loss = model(torch.randn(4, 16)).square().mean()
        # Activations are named by the module whose forward made them: mlp.0's output is saved for mlp.1's backward.
        assert ("activations", "mlp.0") in {(record.kind, record.owner) for record in counter._live.values()}
        loss.backward()
        optimizer.step()
        counter.label_tensors({"mlp": model}, optimizer)
        kinds = {(record.kind, record.owner) for record in counter._live.values()}
    assert ("frozen weights", "mlp.0.weight") in kinds and ("adapter weights", "mlp.1.weight") in kinds
    assert ("gradients", "mlp.1.weight") in kinds and ("optimizer state", "optimizer") in kinds
    at_peak = counter.at_peak(top=100)
    assert sum(entry["bytes"] for entry in at_peak) == pytest.approx(counter.peak_bytes, rel=0.002)
    assert counter.phase_of_peak == "optimizer step"  # AdamW's two moments arrive on top of the gradients


def test_counter_forgets_models_moved_off_the_device_and_adopt_keeps_them_off():
    model = frozen_first_mlp()
    with LiveTensorCounter("cpu") as counter:
        counter.adopt(model.parameters())
        counted = counter.live_bytes
        assert counted == sum(
            -(-p.numel() * FLOAT32 // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for p in model.parameters()
        )
        assert counter.forget(model[0].parameters()) > 0
        counter.adopt(model.parameters())  # watching the model again does not bring the moved layer back
        assert counter.live_bytes == counted - sum(
            -(-p.numel() * FLOAT32 // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for p in model[0].parameters()
        )


def test_cpu_tracker_reports_counted_allocated_peak_and_activations_then_stops_counting():
    model = frozen_first_mlp()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    tracker = MemoryTracker("cpu", models=[model], optimizer=optimizer, count_tensor_steps=2)
    assert tracker.counting
    weights = tracker.milestone("after_model_load")["memory/after_model_load/allocated_gib"] * GIB
    assert weights == tracker.counter.live_bytes > 0
    for step in (1, 2):
        train_one_step(model, optimizer)
        values = tracker.log_step(step)
        assert values["memory/step/peak_allocated_gib"] * GIB > weights
    assert not tracker.counting  # two steps counted, then no per-op cost
    report = tracker.report()
    assert report["peak"]["allocated"] > weights
    assert report["breakdown"]["activations_peak"] > 0
    train_one_step(model, optimizer)
    assert "memory/step/allocated_gib" not in tracker.log_step(3)  # no count after the window
