"""Tests of `diffusers_lowmem.tiny`: the tiny pipelines, language models and data sets load, run and are reproducible."""

import hashlib
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusers_lowmem import tiny

PROMPT = "a red circle"


def _file_digests(root):
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _count_modules(model, module_type):
    return sum(isinstance(module, module_type) for module in model.modules())


# --------------------------------------------------------------------------------------------------------------------
# Pipelines.
# --------------------------------------------------------------------------------------------------------------------


def test_sd_pipeline_loads_and_generates_32px_images(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    assert pipeline.safety_checker is None
    assert pipeline.vae_scale_factor == tiny.TINY_VAE_SCALE_FACTOR == 2
    assert pipeline.unet.config.sample_size == tiny.TINY_LATENT_SIZE == 16
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size == 32

    # The default size is the training resolution: latent 16 x VAE factor 2.
    images = pipeline(
        [PROMPT, "a blue square"],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images

    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()
    assert 0.0 <= images.min() <= images.max() <= 1.0


def test_sdxl_pipeline_loads_and_generates_32px_images(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    unet_config = pipeline.unet.config
    assert isinstance(pipeline.text_encoder_2, CLIPTextModelWithProjection)
    assert unet_config.addition_embed_type == "text_time"
    assert unet_config.cross_attention_dim == 32 + 32
    assert unet_config.projection_class_embeddings_input_dim == 6 * 8 + 32

    images = pipeline(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images

    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("pipeline_name", ["sd", "sdxl"])
def test_unet_has_attention_linears_and_resnet_convs(tiny_dir, pipeline_name):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir / pipeline_name, subfolder="unet")
    module_names = {name.rsplit(".", 1)[-1] for name, _ in unet.named_modules()}

    assert _count_modules(unet, torch.nn.Linear) >= 10
    assert _count_modules(unet, torch.nn.Conv2d) >= 10
    # The modules the diffusers LoRA scripts target.
    assert {"to_q", "to_k", "to_v", "conv1", "conv2"} <= module_names


def test_vae_latents_are_16px_centred_and_unit_scaled(tiny_sd_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd_path, subfolder="vae")
    images = [np.asarray(image, dtype=np.float32) for image, _ in tiny.shape_images(8, seed=123)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0

    with torch.no_grad():
        latent_dist = vae.encode(pixels).latent_dist
    latents = latent_dist.sample(generator=torch.Generator().manual_seed(0)) * vae.config.scaling_factor

    assert latents.shape == (8, 4, 16, 16)
    assert latent_dist.std.max().item() < 1e-3
    assert latents.mean(dim=(0, 2, 3)).abs().max().item() < 0.3
    assert 0.7 < latents.std().item() < 1.3


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers.
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("subfolder", ["sd/tokenizer", "sdxl/tokenizer", "sdxl/tokenizer_2"])
def test_clip_tokenizer_encodes_caption_words_as_single_tokens(tiny_dir, subfolder):
    from transformers import CLIPTextConfig, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / subfolder)
    encoder_folder = tiny_dir / subfolder.replace("tokenizer", "text_encoder")
    vocab_size = CLIPTextConfig.from_pretrained(encoder_folder).vocab_size

    input_ids = tokenizer("A red circle").input_ids
    padded = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids

    assert len(tokenizer) == vocab_size == tiny.CLIP_VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens(input_ids) == [
        "<|startoftext|>",
        "a</w>",
        "red</w>",
        "circle</w>",
        "<|endoftext|>",
    ]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (vocab_size - 2, vocab_size - 1)
    assert max(input_ids) < vocab_size
    assert tokenizer.decode(input_ids, skip_special_tokens=True) == PROMPT
    assert len(padded) == tokenizer.model_max_length == 77


def test_clip_tokenizer_files_follow_openai_layout(tiny_sd_path):
    vocab = json.loads((tiny_sd_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (tiny_sd_path / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()

    assert len(vocab) == tiny.CLIP_VOCAB_SIZE == 512 + (len(merge_lines) - 1) + 2
    assert merge_lines[0] == "#version: 0.2"
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    for word in tiny.VOCABULARY_WORDS:
        assert word + "</w>" in vocab


def test_learn_bpe_merges_orders_by_frequency_then_lexicographically():
    merges = tiny.learn_bpe_merges({("l", "o", "w"): 5, ("l", "o", "w", "e", "r"): 2, ("n", "e", "w"): 1})

    assert merges == [("l", "o"), ("lo", "w"), ("e", "r"), ("low", "er"), ("e", "w"), ("n", "ew")]


@pytest.mark.parametrize(
    "family, fixture_name, vocab_size, model_type",
    [
        ("llama", "tiny_llama_path", tiny.LLAMA_VOCAB_SIZE, "llama"),
        ("gpt2", "tiny_gpt2_path", tiny.GPT2_VOCAB_SIZE, "gpt2"),
    ],
)
def test_causal_lm_loads_tokenizes_and_gives_finite_loss(request, family, fixture_name, vocab_size, model_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = request.getfixturevalue(fixture_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    sentences = ["the small cat sees the red ball.", "anna has three blue cups."]

    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(**batch, labels=batch.input_ids)

    assert model.config.model_type == model_type
    assert len(tokenizer) == model.config.vocab_size == vocab_size
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert batch.input_ids.max().item() < vocab_size
    assert tokenizer.decode(batch.input_ids[0], skip_special_tokens=True) == sentences[0]
    assert output.logits.shape == (2, batch.input_ids.shape[1], vocab_size)
    # Random weights of standard deviation 0.02 predict nearly uniformly: the loss is about ln(vocabulary size).
    assert math.isfinite(output.loss.item())
    assert abs(output.loss.item() - math.log(vocab_size)) < 0.5


@pytest.mark.parametrize("fixture_name", ["tiny_llama_path", "tiny_gpt2_path"])
def test_lm_tokenizer_gives_one_token_per_corpus_word(request, tiny_text_path, fixture_name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture_name))
    lines = (tiny_text_path / "train.txt").read_text(encoding="utf-8").splitlines()[:50]

    for line in lines:
        tokens = tokenizer(line, add_special_tokens=False).input_ids
        # Each word, with its leading space, is one token; the full stop is one more.
        assert len(tokens) == len(line.split()) + 1, line


def _token_blocks(tokenizer, text_file, block_size=64):
    token_ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    num_blocks = len(token_ids) // block_size
    return torch.tensor(token_ids[: num_blocks * block_size]).view(num_blocks, block_size)


def _perplexity(model, blocks):
    with torch.no_grad():
        return math.exp(model(blocks, labels=blocks).loss.item())


@pytest.mark.parametrize("fixture_name", ["tiny_llama_path", "tiny_gpt2_path"])
def test_lm_lowers_validation_perplexity_tenfold_in_50_steps(request, tiny_text_path, fixture_name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = request.getfixturevalue(fixture_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    train_blocks = _token_blocks(tokenizer, tiny_text_path / "train.txt")
    validation_blocks = _token_blocks(tokenizer, tiny_text_path / "validation.txt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)

    perplexity_before = _perplexity(model, validation_blocks)
    for _ in range(50):
        batch = train_blocks[torch.randint(0, len(train_blocks), (8,), generator=generator)]
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    perplexity_after = _perplexity(model, validation_blocks)

    print(f"{model.config.model_type} validation perplexity {perplexity_before:.1f} -> {perplexity_after:.2f}")
    assert perplexity_before > 300
    assert perplexity_after < perplexity_before / 10


def test_llama_is_grouped_query_and_gpt2_uses_conv1d(tiny_llama_path, tiny_gpt2_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)

    assert llama.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    assert llama.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    assert _count_modules(gpt2, Conv1D) == 4 * 2


# --------------------------------------------------------------------------------------------------------------------
# Data sets.
# --------------------------------------------------------------------------------------------------------------------


def _shape_colour(image):
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = pixels[0, 0]
    shape_mask = np.abs(pixels - background).max(axis=-1) > 60
    mean_colour = pixels[shape_mask].mean(axis=0)
    return min(tiny.SHAPE_COLOURS, key=lambda name: np.linalg.norm(mean_colour - np.array(tiny.SHAPE_COLOURS[name])))


def test_image_folder_loads_and_captions_name_the_drawn_colour(tiny_images_path, tmp_path):
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(tiny_images_path), split="train", cache_dir=tmp_path)

    assert set(dataset.column_names) == {"image", "text"}
    assert dataset.num_rows == 8
    captions = dataset["text"]
    assert len(set(captions)) == 8
    for row in dataset:
        assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
        _, colour, shape = row["text"].split()
        assert shape in tiny.SHAPES
        assert _shape_colour(row["image"]) == colour, row["text"]
    # Eight images hold every colour twice.
    assert sorted(caption.split()[1] for caption in captions) == sorted(2 * list(tiny.SHAPE_COLOURS))


def test_image_folder_rewrite_removes_stale_images(tmp_path):
    tiny.write_image_caption_folder(tmp_path, num_images=5, size=16, seed=1)
    tiny.write_image_caption_folder(tmp_path, num_images=3, size=16, seed=1)

    metadata = (tmp_path / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["0000.png", "0001.png", "0002.png"]
    assert [json.loads(line)["file_name"] for line in metadata] == ["0000.png", "0001.png", "0002.png"]


def test_text_corpus_has_hundreds_of_lines_from_the_vocabulary(tiny_text_path):
    train_lines = (tiny_text_path / "train.txt").read_text(encoding="utf-8").splitlines()
    validation_lines = (tiny_text_path / "validation.txt").read_text(encoding="utf-8").splitlines()
    corpus_words = {word.rstrip(".") for line in train_lines + validation_lines for word in line.split()}

    assert len(train_lines) == 600 and len(validation_lines) == 100
    assert all(line.endswith(".") for line in train_lines + validation_lines)
    assert corpus_words <= set(tiny.VOCABULARY_WORDS)
    # Repetitive enough to learn quickly: the 600 lines repeat a vocabulary of a few dozen words.
    assert 40 <= len(corpus_words) <= len(tiny.VOCABULARY_WORDS)
    assert len(set(train_lines)) < len(train_lines)


# --------------------------------------------------------------------------------------------------------------------
# Reproducibility, API and command line.
# --------------------------------------------------------------------------------------------------------------------


def test_write_all_is_byte_identical_for_a_seed_and_differs_for_another(tiny_dir, tmp_path):
    started = time.perf_counter()
    written = tiny.write_all(tmp_path / "seed0", seed=0)
    elapsed = time.perf_counter() - started
    print(f"write_all wrote {len(written)} tiny artifacts in {elapsed:.2f} s")
    tiny.write_all(tmp_path / "seed1", only=["sd", "llama", "images"], seed=1)

    first_digests = _file_digests(tiny_dir)
    again_digests = _file_digests(tmp_path / "seed0")
    other_digests = _file_digests(tmp_path / "seed1")

    assert written == {name: tmp_path / "seed0" / name for name in tiny.ARTIFACTS}
    assert again_digests == first_digests
    assert sum(name.endswith(".safetensors") for name in first_digests) == 9
    for name in ("sd/unet/diffusion_pytorch_model.safetensors", "llama/model.safetensors", "images/0000.png"):
        assert other_digests[name] != first_digests[name], name
    # Tokenizers do not depend on the seed.
    assert other_digests["sd/tokenizer/tokenizer.json"] == first_digests["sd/tokenizer/tokenizer.json"]


def test_configs_are_the_written_architectures(tiny_dir):
    unet_config = json.loads((tiny_dir / "sd" / "unet" / "config.json").read_text())
    sdxl_unet_config = json.loads((tiny_dir / "sdxl" / "unet" / "config.json").read_text())
    llama_config = json.loads((tiny_dir / "llama" / "config.json").read_text())
    gpt2_config = json.loads((tiny_dir / "gpt2" / "config.json").read_text())

    for key, value in tiny.TINY_UNET_CONFIG.items():
        assert unet_config[key] == (list(value) if isinstance(value, tuple) else value), key
    for key, value in tiny.TINY_SDXL_UNET_CONFIG.items():
        assert sdxl_unet_config[key] == (list(value) if isinstance(value, tuple) else value), key
    assert {key: llama_config[key] for key in ("hidden_size", "num_key_value_heads", "vocab_size")} == {
        "hidden_size": 64,
        "num_key_value_heads": 2,
        "vocab_size": tiny.LLAMA_VOCAB_SIZE,
    }
    assert (gpt2_config["n_embd"], gpt2_config["n_layer"], gpt2_config["vocab_size"]) == (64, 2, tiny.GPT2_VOCAB_SIZE)


def test_write_all_rejects_unknown_artifacts(tmp_path):
    with pytest.raises(ValueError, match="flux"):
        tiny.write_all(tmp_path, only=["sd", "flux"])


def test_cli_writes_only_the_chosen_artifacts(tmp_path):
    written = tiny.cli([str(tmp_path), "--only", "images,text", "--num_images", "3", "--seed", "7"])

    assert written == {"images": tmp_path / "images", "text": tmp_path / "text"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "text"]
    assert len(list((tmp_path / "images").glob("*.png"))) == 3


def test_cli_rejects_unknown_artifacts(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny.cli([str(tmp_path), "--only", "sd,flux"])

    assert "flux" in capsys.readouterr().err


def test_module_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "diffusers_lowmem.tiny", "--help"], capture_output=True, text=True, check=True
    )

    for option in ("--only", "--num_images", "--seed", "out_dir"):
        assert option in result.stdout
