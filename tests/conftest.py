"""Session-wide fixtures: the tiny models and data sets of `diffusers_lowmem.tiny`, written once per test session."""

import os

import pytest

# Set before any test module imports `huggingface_hub`, which reads them once: nothing may be downloaded, and the
# tokenizers' thread pool must not be forked by data loader workers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Folder holding every tiny artifact (seed 0, 8 images), one subfolder each: sd, sdxl, llama, gpt2, images, text."""
    from diffusers_lowmem.tiny import write_all

    out_dir = tmp_path_factory.mktemp("tiny")
    write_all(out_dir, seed=0)
    return out_dir


@pytest.fixture(scope="session")
def tiny_sd_path(tiny_dir):
    """Tiny Stable Diffusion pipeline folder, for `StableDiffusionPipeline.from_pretrained`."""
    return tiny_dir / "sd"


@pytest.fixture(scope="session")
def tiny_sdxl_path(tiny_dir):
    """Tiny Stable Diffusion XL pipeline folder, for `StableDiffusionXLPipeline.from_pretrained`."""
    return tiny_dir / "sdxl"


@pytest.fixture(scope="session")
def tiny_llama_path(tiny_dir):
    """Tiny Llama model and tokenizer folder, for `AutoModelForCausalLM` and `AutoTokenizer`."""
    return tiny_dir / "llama"


@pytest.fixture(scope="session")
def tiny_gpt2_path(tiny_dir):
    """Tiny GPT-2 model and tokenizer folder, for `AutoModelForCausalLM` and `AutoTokenizer`."""
    return tiny_dir / "gpt2"


@pytest.fixture(scope="session")
def tiny_images_path(tiny_dir):
    """`imagefolder` data set of 8 captioned 32 px shape images (columns `image` and `text`)."""
    return tiny_dir / "images"


@pytest.fixture(scope="session")
def tiny_text_path(tiny_dir):
    """Folder with `train.txt` (600 lines) and `validation.txt` (100 lines)."""
    return tiny_dir / "text"
