"""The prepared GPU run (`benchmarks/gpu/run.sh`): its CPU dry run end to end, the carry size, the report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_SH = REPO / "benchmarks" / "gpu" / "run.sh"
MIB = 1024**2
GIB = 1024**3


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


def _dry_run(base: Path):
    """One `run.sh OUT --dry-run`: (OUT, WORK, completed process)."""
    out, work = base / "out", base / "work"
    # A budget far above the ~2 minutes the dry run takes on 2 idle cores: a busy machine must not skip cells.
    env = dict(os.environ, PYTHON=sys.executable, GPU_SUITE_WORK=str(work), OMP_NUM_THREADS="1")
    env["GPU_SUITE_BUDGET"] = "1500"
    completed = subprocess.run(
        ["bash", str(RUN_SH), str(out), "--dry-run"], env=env, capture_output=True, text=True, timeout=1800
    )
    return out, work, completed


def _dry_run_writes_at_most_8_files_that_come_back(out, completed):
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    files = sorted(path.name for path in out.iterdir())
    expected = ["calibration.json", "cells.tar.gz", "env.json", "results.jsonl", "suite.json", "suite.log", "suite.md"]
    assert files == expected
    assert all((out / name).stat().st_size <= 16 * MIB for name in files)
    assert all(path.is_file() for path in out.iterdir())  # nothing nested: every file comes back


def _dry_run_imports_the_carried_packages_from_the_installed_wheels(out, work):
    env = json.loads((out / "env.json").read_text())
    assert env["problems"] == []
    site = (work / "site").resolve()
    for distribution, module in suite.CARRIED_MODULES.items():
        assert distribution in suite.requirement_names(REPO / "benchmarks" / "gpu" / "requirements.txt")
        assert Path(env["modules"][module]).resolve().is_relative_to(site), (module, env["modules"][module])
    assert Path(env["modules"]["diffusers_lowmem"]).resolve().is_relative_to(REPO)
    assert env["versions"]["torch"] and env["versions"]["bitsandbytes"] and env["versions"]["lycoris-lora"]
    # The repacked wheels are the installed versions: pip installed each once, with its own dist-info.
    installed = sorted(path.name for path in site.glob("*.dist-info"))
    assert len(installed) == len(suite.CARRIED_MODULES)


def _dry_run_measures_every_planned_cell_with_its_estimate(out):
    plan = suite.PLANS["dry"]
    summary = json.loads((out / "suite.json").read_text())
    cells = {(c["matrix"], c["adapter"], c["quant"]): c for c in summary["cells"]}
    assert sorted(cells) == sorted(plan.cells)
    for key, cell in cells.items():
        assert cell["status"] == "ok", (key, cell.get("error"))
        assert cell["peak_rss"] > 50 * MIB  # the CPU's measure: the process with torch loaded
        if key[1] == suite.QUANT_ONLY:
            assert cell["trainable_params"] == 0
            assert cell["estimate_status"] == "n/a" and "quantization-only" in cell["estimate_reason"]
        else:
            assert cell["trainable_params"] > 0
            assert cell["median_step_seconds"] > 0
            assert f"--adapter {key[1]}" in cell["command"] and "--gradient_checkpointing" in cell["command"]
            # The lead's --estimate_memory lands separately: a number where it works, else the reason.
            if cell["estimate_status"] == "ok":
                assert isinstance(cell["estimate_peak_bytes"], int) and cell["estimate_peak_bytes"] > 0
            else:
                assert cell["estimate_status"] == "n/a" and cell["estimate_reason"]
    assert "--cache_latents --cache_text_encoder_outputs" in cells[("tiny-sdxl", "lokr", "nf4")]["command"]
    # One line per cell and one per estimate, each written as it finished.
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(line["kind"] for line in lines) == ["cell"] * len(plan.cells) + ["estimate"] * len(plan.cells)


def _dry_run_speed_ratios_and_report(out):
    summary = json.loads((out / "suite.json").read_text())
    cells = {(c["matrix"], c["adapter"], c["quant"]): c for c in summary["cells"]}
    ratios = {(r["matrix"], r["adapter"], r["quant"]): r["ratio"] for r in summary["speed"]}
    for matrix in ("tiny-sd", "tiny-llama"):
        quantized, plain = cells[(matrix, "lora", "nf4")], cells[(matrix, "lora", "none")]
        assert ratios[(matrix, "lora", "nf4")] == pytest.approx(
            quantized["median_step_seconds"] / plain["median_step_seconds"]
        )
    assert summary["calibration"]["cuda_context_bytes"] is None and "no CUDA" in summary["calibration"]["skipped"]
    assert summary["targets"] == []  # the issue's targets are for the real architectures
    text = (out / "suite.md").read_text()
    for matrix in suite.PLANS["dry"].matrices:
        assert f"### {matrix}" in text
    assert "| tiny-sd | lora | nf4 |" in text
    assert "CPU (" in text.splitlines()[0]


def _dry_run_brings_back_each_cells_logs_and_no_weights(out):
    with tarfile.open(out / "cells.tar.gz") as archive:
        names = archive.getnames()
    for matrix, adapter, quant in suite.PLANS["dry"].cells:
        assert f"{matrix}/cells/{adapter}-{quant}/log.txt" in names
        assert f"{matrix}/cells/{adapter}-{quant}/memory_report.json" in names
    assert not [name for name in names if name.endswith((".safetensors", ".bin", ".whl"))]


def test_dry_run_end_to_end(tmp_path):
    # One test, so that pytest-xdist runs the dry run once, not once per worker.
    out, work, completed = _dry_run(tmp_path)
    _dry_run_writes_at_most_8_files_that_come_back(out, completed)
    _dry_run_imports_the_carried_packages_from_the_installed_wheels(out, work)
    _dry_run_measures_every_planned_cell_with_its_estimate(out)
    _dry_run_speed_ratios_and_report(out)
    _dry_run_brings_back_each_cells_logs_and_no_weights(out)


def test_gpu_plan_covers_the_issue_and_its_flags_parse():
    from diffusers_lowmem import profile

    plan = suite.PLANS["gpu"]
    cells = set(plan.cells)
    for matrix in ("sd15", "llama2-7b"):
        for adapter in ("lora", "lokr", suite.QUANT_ONLY):
            assert {(matrix, adapter, quant) for quant in ("none", "8bit", "nf4")} <= cells
    assert ("sdxl", "lokr", "nf4") in cells
    assert len(cells) == len(plan.cells)  # no cell twice
    # The questions of the issue come first: nf4 and unquantized pairs, then SDXL, before the rest.
    assert plan.cells[:9] == (
        ("sd15", "lora", "none"),
        ("sd15", "lora", "nf4"),
        ("sd15", "lokr", "none"),
        ("sd15", "lokr", "nf4"),
        ("llama2-7b", "lora", "none"),
        ("llama2-7b", "lora", "nf4"),
        ("llama2-7b", "lokr", "none"),
        ("llama2-7b", "lokr", "nf4"),
        ("sdxl", "lokr", "nf4"),
    )
    for name, matrix in plan.matrices.items():
        args = suite._profile_args(matrix, ["lora", "lokr", suite.QUANT_ONLY], ["none", "nf4"], Path("/tmp/unused"))
        assert (args.architecture, args.mixed_precision, args.batch_size) == (name, "bf16", 1)
        assert args.gradient_checkpointing
        argv = profile.trainer_argv(args, "lokr", "nf4", Path("/tmp/data"), Path("/tmp/cell"))
        size_flag = "--block_size" if matrix.task == "causal-lm" else "--resolution"
        assert argv[argv.index(size_flag) + 1] == {"sd15": "512", "sdxl": "1024", "llama2-7b": "512"}[name]
    assert plan.matrices["sdxl"].flags[:4] == (
        "--resolution",
        "1024",
        "--cache_latents",
        "--cache_text_encoder_outputs",
    )
    assert ("--seq_len", "512") == plan.matrices["llama2-7b"].flags[:2]


def test_tree_and_carried_wheels_fit_a_device_call():
    size = suite.carry_size(REPO / ".whl")
    if size["wheels"]:  # fetched here: the real number
        assert size["total_bytes"] < 64 * MIB, size
    # Without them, the tree must leave room for the wheels as measured (fetch_wheels.sh, CPython 3.11-3.13).
    assert size["tree_bytes"] + suite.MEASURED_WHEEL_BYTES < 64 * MIB, size["tree_bytes"]


def test_report_joins_estimates_and_checks_targets(tmp_path):
    cell = {"kind": "cell", "matrix": "sd15", "status": "ok", "peak_reserved": GIB}
    records = [
        cell | {"adapter": "lora", "quant": "none", "peak_allocated": 3 * GIB, "median_step_seconds": 0.2},
        cell | {"adapter": "lora", "quant": "nf4", "peak_allocated": int(1.2 * GIB), "median_step_seconds": 0.36},
        {"kind": "estimate", "matrix": "sd15", "adapter": "lora", "quant": "nf4", "estimate_status": "ok"}
        | {"estimate_peak_bytes": GIB},
        {"kind": "estimate", "matrix": "sd15", "adapter": "lora", "quant": "none", "estimate_status": "n/a"}
        | {"estimate_reason": "this trainer has no --estimate_memory yet"},
    ]
    text = "\n".join(json.dumps(r) for r in records) + '\n{"kind": "cell", "matr'  # the last line cut by a kill
    (tmp_path / "results.jsonl").write_text(text)
    cells = {(c["adapter"], c["quant"]): c for c in suite.read_results(tmp_path / "results.jsonl")}
    assert cells[("lora", "nf4")]["measured_over_estimate"] == pytest.approx(1.2)
    assert cells[("lora", "none")]["measured_over_estimate"] is None
    assert cells[("lora", "none")]["estimate_reason"] == "this trainer has no --estimate_memory yet"
    speed = suite.speed_ratios(list(cells.values()))
    assert speed == [{"matrix": "sd15", "adapter": "lora", "quant": "nf4", "ratio": pytest.approx(1.8), "target": 1.5}]
    targets = {t["target"]: t for t in suite.target_checks(list(cells.values()), speed)}
    assert targets["SD 1.5 512 px nf4 + lora: peak allocated <= 1.5 GiB"]["met"] is True
    assert targets["sd15 lora: nf4 step time <= 1.5x unquantized"]["met"] is False
    assert targets["sd15 lora/nf4: measured peak within 5 % of the estimate"]["met"] is False
    assert targets["Llama-2-7B seq 512 nf4 + lora: peak allocated <= 4.5 GiB"]["met"] is None  # not measured
    # The cell worth a CUDA memory snapshot: the one furthest (> 5 %) from its estimate.
    assert suite.snapshot_candidate(list(cells.values()))["quant"] == "nf4"
    assert suite.snapshot_candidate([cells[("lora", "none")]]) is None
    summary = suite.write_report("gpu", tmp_path, tmp_path / "no-work", elapsed=12.0)
    markdown = (tmp_path / "suite.md").read_text()
    assert "| lora / nf4 | ok | 1.20 | 1.00 |" in markdown and "| 1.200 |" in markdown
    assert "| sd15 | lora | nf4 | 1.80x | <= 1.5x |" in markdown
    assert json.loads((tmp_path / "suite.json").read_text())["targets"] == json.loads(json.dumps(summary.targets))


@pytest.mark.parametrize("argv", [[], ["--dry-run"], ["OUT", "--gpu"]])
def test_run_sh_refuses_bad_arguments(tmp_path, argv):
    argv = [str(tmp_path / a) if a == "OUT" else a for a in argv]
    completed = subprocess.run(["bash", str(RUN_SH), *argv], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "usage" in completed.stderr or "unknown flag --gpu" in completed.stderr


def test_gpu_plan_without_wheels_stops_at_once_and_says_what_to_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_SUITE_WHEELS=str(tmp_path / "none"))
    env["GPU_SUITE_WORK"] = str(tmp_path / "work")
    completed = subprocess.run(
        ["bash", str(RUN_SH), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 1
    assert "run benchmarks/gpu/fetch_wheels.sh first" in completed.stdout + completed.stderr
    assert "# GPU suite (gpu plan)" in (tmp_path / "out" / "suite.md").read_text()
    assert not (tmp_path / "out" / "results.jsonl").exists()
