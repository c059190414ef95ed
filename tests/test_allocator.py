"""The allocator setting: expandable segments unless the user set one, and what the memory report says."""

import json
import subprocess
import sys

import pytest
import torch

from diffusers_lowmem import allocator


@pytest.fixture
def no_allocator_settings(monkeypatch):
    for name in allocator.ALLOC_CONF_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_set_by_us", None)


def test_sets_expandable_segments_when_unset(no_allocator_settings):
    import os

    assert allocator.allocator_settings() == {"variable": None, "value": None, "set_by": None}
    settings = allocator.configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert settings == {
        "variable": "PYTORCH_CUDA_ALLOC_CONF",
        "value": "expandable_segments:True",
        "set_by": "diffusers_lowmem",
    }
    assert allocator.report_entry() == {"allocator": settings}


@pytest.mark.parametrize("variable", allocator.ALLOC_CONF_VARIABLES)
def test_a_users_setting_is_kept(variable, no_allocator_settings, monkeypatch):
    import os

    monkeypatch.setenv(variable, "max_split_size_mb:64")
    settings = allocator.configure_allocator()
    assert settings == {"variable": variable, "value": "max_split_size_mb:64", "set_by": "user"}
    assert [name for name in allocator.ALLOC_CONF_VARIABLES if name in os.environ] == [variable]


LARGE_SEGMENTS_AFTER_THREE_ALLOCATIONS = (
    "import json, os, torch; from diffusers_lowmem import allocator; allocator.configure_allocator();"
    "tensors = [torch.empty(40 << 20, dtype=torch.uint8, device='cuda') for _ in range(3)];"
    "print(json.dumps([allocator.allocator_settings()['value'],"
    " sum(s['segment_type'] == 'large' for s in torch.cuda.memory_snapshot())]))"
)


def large_segments(env) -> tuple[str, int]:
    output = subprocess.run(
        [sys.executable, "-c", LARGE_SEGMENTS_AFTER_THREE_ALLOCATIONS], env=env, capture_output=True, text=True
    )
    assert output.returncode == 0, output.stderr
    return tuple(json.loads(output.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_allocates_expandable_segments(no_allocator_settings):
    """In fresh processes: configured before CUDA starts, three 40 MiB tensors share one growing segment; with the
    user's `expandable_segments:False` each gets its own."""
    import os

    environment = {key: value for key, value in os.environ.items() if key not in allocator.ALLOC_CONF_VARIABLES}
    assert large_segments(environment) == ("expandable_segments:True", 1)
    assert large_segments({**environment, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}) == (
        "expandable_segments:False",
        3,
    )
