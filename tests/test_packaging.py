"""The package as pip builds it: every config and module in the wheel, and no setuptools warning on the way.

The wheel is built from a copy of the sources in a temporary folder, so the working tree gets no `build/` or
`*.egg-info` from it, and with the installed setuptools (`--no-build-isolation`), so nothing is downloaded.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffusers_lowmem"
# What setuptools prints for the faults this test guards against: license classifiers instead of an SPDX expression,
# and a data folder that is not a declared package ("Package would be ignored", "absent from the `packages`").
SETUPTOOLS_WARNINGS = ("Deprecat", "License classifiers", "would be ignored", "absent from the `packages`")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    """`(wheel path, build output)` of `pip wheel --no-deps --no-build-isolation` on a copy of the sources."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheel_dir = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(wheel_dir)]
    result = subprocess.run([*command, "."], cwd=source, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    (wheel,) = wheel_dir.glob("diffusers_lowmem-*.whl")
    return wheel, output


def test_wheel_holds_every_config_and_module(built_wheel):
    wheel, _ = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(path.name for path in (PACKAGE / "configs").iterdir() if path.is_file())
    assert len(configs) >= 35  # every published architecture's components, and the tiny ones
    missing = [name for name in configs if f"diffusers_lowmem/configs/{name}" not in names]
    assert missing == []
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert [name for name in modules if f"diffusers_lowmem/{name}" not in names] == []
    assert not any("__pycache__" in name for name in names)


def test_wheel_metadata_has_an_spdx_license_and_no_license_classifier(built_wheel):
    wheel, _ = built_wheel
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    assert not any(line.startswith("Classifier: License ::") for line in headers)


def test_build_prints_no_setuptools_warning(built_wheel):
    _, output = built_wheel
    found = [line for line in output.splitlines() if any(warning in line for warning in SETUPTOOLS_WARNINGS)]
    assert found == []
