"""The profile command on tiny architectures: one process per cell through the real trainer, result files whose
values parse and make sense, and an out-of-memory cell that does not end the matrix; `--estimate`: the matrix from
the trainers' own fake-tensor estimate, equal to their `--estimate_memory`."""

import csv
import json
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from diffusers_lowmem import profile


def read_markdown_rows(path: Path) -> list[dict[str, str]]:
    """The result table of `results.md` as dicts keyed by the header."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def text_to_image_matrix(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("profile-t2i")
    argv = [
        "--task", "text-to-image", "--architecture", "tiny-sd",
        "--adapters", "lora,lokr", "--quant", "none,nf4",
        "--steps", "2", "--resolution", "32", "--output_dir", str(output_dir),
    ]  # fmt: skip
    return output_dir, profile.main(profile.parse_args(argv))


def test_matrix_writes_csv_markdown_png_and_tensorboard(text_to_image_matrix):
    output_dir, results = text_to_image_matrix
    labels = [result.label for result in results]
    assert labels == [
        "lora / none",
        "lora / nf4",
        "lokr / none",
        "lokr / nf4",
        "quant only / none",
        "quant only / nf4",
    ]
    assert all(result.status == "ok" for result in results), [(r.label, r.error) for r in results]

    with open(output_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["adapter"], row["quant"]) for row in rows] == [(r.adapter, r.quant) for r in results]

    table = read_markdown_rows(output_dir / "results.md")
    assert [row["cell"] for row in table] == labels
    # On CPU the memory columns are the trainer's counted tensor bytes (allocated), the process RSS a side column.
    for row, result in zip(table[:4], results[:4]):
        assert float(row["peak (allocated, MiB)"]) == pytest.approx(result.peak_allocated / profile.MIB, abs=0.006)
        assert 0 < float(row["after load (allocated, MiB)"]) < float(row["peak (allocated, MiB)"])
        assert float(row["peak RSS (process)"]) > 10 * float(row["peak (allocated, MiB)"])  # the libraries' RSS
        assert row["peak % of device"].endswith("%")
    assert (output_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((output_dir / "logs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("peak_rss", [200 * profile.MIB, 3 * profile.GIB, 40 * profile.GIB])
def test_the_table_unit_follows_the_cells_tensor_bytes_not_the_process_rss(peak_rss):
    """The process's lifetime peak RSS (whatever ran before in the process) must not choose the table's unit."""
    tiny = profile.CellResult(adapter="lora", quant="nf4", status="ok", peak_allocated=9 * profile.MIB,
                              frozen_weights=2 * profile.MIB, peak_rss=peak_rss)  # fmt: skip
    assert profile.table_unit([tiny]) == (profile.MIB, "MiB")
    real_scale = profile.CellResult(adapter="lora", quant="nf4", status="ok", peak_allocated=5 * profile.GIB,
                                    frozen_weights=3 * profile.GIB, peak_rss=peak_rss)  # fmt: skip
    assert profile.table_unit([tiny, real_scale]) == (profile.GIB, "GiB")
    cuda_reserved = profile.CellResult(adapter="lora", quant="none", status="ok", peak_allocated=900 * profile.MIB,
                                       peak_reserved=int(1.2 * profile.GIB), peak_rss=peak_rss)  # fmt: skip
    assert profile.table_unit([cuda_reserved]) == (profile.GIB, "GiB")


def test_cells_report_breakdown_steps_and_quantization_savings(text_to_image_matrix):
    _, results = text_to_image_matrix
    by_cell = {(r.adapter, r.quant): r for r in results}
    for adapter in ("lora", "lokr"):
        unquantized, nf4 = by_cell[(adapter, "none")], by_cell[(adapter, "nf4")]
        assert nf4.frozen_weights < unquantized.frozen_weights
        assert nf4.trainable_params == unquantized.trainable_params > 0
        assert nf4.gradients == nf4.trainable_params_bytes  # fp32 adapters, fp32 gradients
        # AdamW: two fp32 moments per parameter, plus one 4-byte step counter per parameter tensor.
        assert 0 <= nf4.optimizer_state - 2 * nf4.trainable_params_bytes < 4 * 1024
        assert nf4.median_step_seconds > 0
        assert nf4.peak_rss >= nf4.after_model_load_rss > 0
        # Counted tensor bytes show what quantization saves (the process RSS, which the libraries dominate, did not).
        assert nf4.peak_allocated < unquantized.peak_allocated
        assert unquantized.peak_allocated - nf4.peak_allocated == pytest.approx(
            unquantized.frozen_weights - nf4.frozen_weights, rel=0.25
        )
    quant_only = by_cell[(profile.QUANT_ONLY, "nf4")]
    assert quant_only.trainable_params == 0
    # The same frozen base; the adapter cell adds only LyCORIS' small per-layer buffers (alpha, dtype marker).
    assert 0 <= by_cell[("lora", "nf4")].frozen_weights - quant_only.frozen_weights < 0.001 * quant_only.frozen_weights


def test_a_cell_over_the_memory_cap_is_recorded_as_oom_and_the_matrix_completes(tmp_path):
    argv = [
        "--task", "text-to-image", "--architecture", "tiny-sd",
        "--adapters", "lora", "--quant", "nf4", "--no_quant_only_row",
        "--steps", "1", "--resolution", "32", "--max_memory", "0.02", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    results = profile.main(profile.parse_args(argv))
    assert [(r.label, r.status) for r in results] == [("lora / nf4", "oom")]
    table = read_markdown_rows(tmp_path / "results.md")
    assert table[0]["status"] == "oom"
    assert "did not finish" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapters", "dora"], "--adapters"),
        (["--quant", "4bit"], "--quant"),
        (["--architecture", "llama2-7b"], "causal-lm"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_fail_before_any_cell_runs(tmp_path, capsys, argv, message):
    base = {"--task": "text-to-image", "--architecture": "tiny-sd", "--output_dir": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as error:
        profile.parse_args([item for pair in base.items() for item in pair])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_memory_options_reach_the_trainer_and_the_reproduce_command(tmp_path):
    from diffusers_lowmem import train_text_to_image

    argv = ["--task", "text-to-image", "--architecture", "tiny-sdxl", "--resolution", "64", "--output_dir", "out"]
    argv += ["--cache_latents", "--cache_text_encoder_outputs", "--gradient_checkpointing"]
    args = profile.parse_args(argv)
    (tmp_path / "metadata.jsonl").write_text("")  # the data folder only has to exist and hold files here
    cell_argv = profile.trainer_argv(args, "lokr", "nf4", tmp_path, tmp_path / "cell")
    trainer_args = train_text_to_image.parse_args(cell_argv)
    assert (
        trainer_args.cache_latents and trainer_args.cache_text_encoder_outputs and trainer_args.gradient_checkpointing
    )
    assert (trainer_args.adapter, trainer_args.quant, trainer_args.resolution) == ("lokr", "nf4", 64)
    assert profile.parse_args(profile._reproduce_argv(args)) == args


def test_train_steps_puts_held_out_loss_beside_memory(tiny_sd_path, tmp_path):
    argv = [
        "--task", "text-to-image", "--pretrained", str(tiny_sd_path),
        "--adapters", "lora", "--quant", "none,nf4", "--no_quant_only_row",
        "--train_steps", "2", "--learning_rate", "1e-3", "--validation_split", "0.25", "--num_images", "8",
        "--resolution", "32", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    results = profile.main(profile.parse_args(argv))
    unquantized, nf4 = results
    assert all(r.status == "ok" for r in results), [(r.label, r.error) for r in results]
    for result in results:
        assert result.held_out_loss_before > 0 and result.held_out_loss_after > 0
        assert result.held_out_loss_after != result.held_out_loss_before
    # The nf4 cell measured its own unquantized base: the one the unquantized cell starts from.
    delta = nf4.held_out_loss_before - unquantized.held_out_loss_before
    assert nf4.quantization_loss_delta == pytest.approx(delta, rel=1e-5, abs=1e-7)
    assert unquantized.quantization_loss_delta is None and unquantized.quantized_conv_bytes is None
    assert 0 < nf4.quantized_conv_bytes < nf4.frozen_weights

    table = {row["cell"]: row for row in read_markdown_rows(tmp_path / "results.md")}
    assert float(table["lora / nf4"]["held-out loss after"]) == pytest.approx(nf4.held_out_loss_after, abs=1e-4)
    assert table["lora / none"]["quantization loss delta"] == "-"
    assert float(table["lora / nf4"]["quantized convs"]) > 0
    text = (tmp_path / "results.md").read_text()
    assert "--train_steps 2" in text and "the same problem in every cell" in text
    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[1]["held_out_loss_after"]) == pytest.approx(nf4.held_out_loss_after)
    # results.png gains a memory-versus-loss panel beside the bars: twice as wide as the bars alone.
    from PIL import Image

    with Image.open(tmp_path / "results.png") as png:
        assert png.width > 2.5 * png.height


def test_causal_lm_train_steps_reports_eval_loss_before_and_after(tmp_path):
    argv = [
        "--task", "causal-lm", "--architecture", "tiny-llama", "--adapters", "lora", "--quant", "none,nf4",
        "--no_quant_only_row", "--train_steps", "2", "--seq_len", "32", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    unquantized, nf4 = profile.main(profile.parse_args(argv))
    assert nf4.status == unquantized.status == "ok", (nf4.error, unquantized.error)
    assert nf4.held_out_loss_before > 0 and nf4.held_out_loss_after > 0
    # The causal trainer has no delta of its own: the profile takes it from the unquantized cell's start.
    delta = nf4.held_out_loss_before - unquantized.held_out_loss_before
    assert nf4.quantization_loss_delta == pytest.approx(delta) and delta != 0
    assert unquantized.quantization_loss_delta is None and nf4.quantized_conv_bytes is None


# ----------------------------------------------------------------------------------------------------------------
# --estimate
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def trainers_own_estimate(args, adapter: str, quant: str, output_dir: Path) -> dict:
    """The trainer's `--estimate_memory` JSON for the command line the profile builds for this cell."""
    trainer = profile._trainer(args.task)
    argv = profile.trainer_argv(args, adapter, quant, output_dir / "no-data", output_dir) + ["--estimate_memory"]
    trainer.estimate_memory(trainer.parse_args(argv))
    AcceleratorState._reset_state(reset_partial_state=True)
    return json.loads((output_dir / "memory_estimate.json").read_text())


@pytest.mark.parametrize(
    "task, architecture, size",
    [("causal-lm", "tiny-llama", ["--seq_len", "32"]), ("text-to-image", "tiny-sd", ["--resolution", "32"])],
)
def test_estimate_matrix_equals_the_trainers_own_estimate(fresh_accelerator_state, tmp_path, task, architecture, size):
    argv = ["--estimate", "--task", task, "--architecture", architecture, *size, "--adapters", "lora"]
    argv += ["--quant", "none,nf4", "--gradient_checkpointing", "--output_dir", str(tmp_path / "matrix")]
    args = profile.parse_args(argv)
    results = profile.main(args)
    assert [(r.label, r.status) for r in results] == [
        ("lora / none", "ok"),
        ("lora / nf4", "ok"),
        ("quant only / none", "ok"),
        ("quant only / nf4", "ok"),
    ], [r.error for r in results]
    assert not (tmp_path / "matrix" / "data").exists()  # an estimate reads no data, so none is generated
    by_cell = {(r.adapter, r.quant): r for r in results}
    for quant in ("none", "nf4"):
        cell = by_cell[("lora", quant)]
        own = trainers_own_estimate(args, "lora", quant, tmp_path / f"own-{quant}")
        assert cell.peak_allocated == own["peak_bytes"] > 0
        assert cell.extra["estimate"]["breakdown"] == own["breakdown"]
        assert cell.phase_of_peak == own["phase_of_peak"]
        written = json.loads((tmp_path / "matrix" / "cells" / f"lora-{quant}" / "memory_estimate.json").read_text())
        assert written["peak_bytes"] == own["peak_bytes"] and written["at_peak"] == own["at_peak"]
        assert own["at_peak"][0]["owner"] in cell.held_at_peak
    # Quantization lowers the frozen weights and the peak, with and without an adapter.
    for adapter in ("lora", profile.QUANT_ONLY):
        unquantized, nf4 = by_cell[(adapter, "none")], by_cell[(adapter, "nf4")]
        assert nf4.frozen_weights < unquantized.frozen_weights
        assert nf4.peak_allocated < unquantized.peak_allocated
    # Quantization only: the same frozen base, no adapter, gradients or optimizer state, one no-grad forward.
    for quant in ("none", "nf4"):
        quant_only, adapted = by_cell[(profile.QUANT_ONLY, quant)], by_cell[("lora", quant)]
        assert quant_only.trainable_params_bytes == quant_only.gradients == quant_only.optimizer_state == 0
        assert 0 <= adapted.frozen_weights - quant_only.frozen_weights < 0.001 * quant_only.frozen_weights
        assert quant_only.frozen_weights < quant_only.peak_allocated < adapted.peak_allocated
        assert quant_only.phase_of_peak == "forward"
    table = {row["cell"]: row for row in read_markdown_rows(tmp_path / "matrix" / "results.md")}
    for result in results:
        row = table[result.label]
        assert float(row["peak (estimated allocated, MiB)"]) == pytest.approx(
            result.peak_allocated / profile.MIB, abs=0.006
        )
        assert row["phase of peak"] == result.phase_of_peak
    text = (tmp_path / "matrix" / "results.md").read_text()
    assert "--estimate" in text and "torch " in text and "bitsandbytes " in text
    with open(tmp_path / "matrix" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["peak_allocated"]) for row in rows] == [r.peak_allocated for r in results]
    assert (tmp_path / "matrix" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert profile.parse_args(profile._reproduce_argv(args)) == args


def test_estimate_of_the_real_run_matches_its_counted_peak(fresh_accelerator_state, tmp_path):
    """The estimate cell and the real CPU run of the same cell count the same live tensor bytes (within 5 %)."""
    common = ["--task", "causal-lm", "--architecture", "tiny-llama", "--seq_len", "32", "--adapters", "lora"]
    common += ["--quant", "nf4", "--no_quant_only_row", "--steps", "2"]
    (estimated,) = profile.main(profile.parse_args(common + ["--estimate", "--output_dir", str(tmp_path / "e")]))
    (measured,) = profile.main(profile.parse_args(common + ["--output_dir", str(tmp_path / "m")]))
    assert measured.status == estimated.status == "ok", (measured.error, estimated.error)
    assert estimated.peak_allocated == pytest.approx(measured.peak_allocated, rel=0.05)
    assert estimated.frozen_weights == measured.frozen_weights
