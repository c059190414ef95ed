"""What `--loss_chunk_size` and `--offload_activations` save and cost, side by side in one run.

1. Logit bytes: the peak of live logit-sized tensors (last dimension = the vocabulary: logits, their fp32 copy,
   log-softmax, their gradients) during one forward + backward, upstream's loss against the chunked loss, at the real
   vocabulary and hidden sizes of Llama-3-8B and Llama-2-7B in bf16. Counted by a `TorchDispatchMode` that sees every
   tensor an operator makes and follows its storage until it is freed (no CUDA needed: the model runs on fake tensors,
   one decoder layer, so the counts are exact and take seconds).
2. Offloaded bytes: what `--offload_activations` moves to the host per step with gradient checkpointing on the same
   stand-in (each layer's input, the final hidden states, the chunked loss's saved inputs).
3. Step time on this CPU: forward + backward + AdamW of a LoRA on a small Llama (vocabulary 32,000) and the tiny
   UNet, each variant repeated and interleaved; the offload variants copy host tensors too (`copy_host_tensors`), so
   the copies a GPU run makes to the host and back are timed (on a CPU the trainer's offload has nothing to move).

Run (about a minute on 2 cores):

    OMP_NUM_THREADS=1 python benchmarks/offload_and_chunked_loss.py \\
        --output benchmarks/results/offload-and-chunked-loss-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_lowmem import activation_offload, adapters, chunked_loss, tiny

GIB = 1 << 30
MIB = 1 << 20
# (name, vocabulary, hidden size, attention heads, key/value heads) of the published configs.
ARCHITECTURES = [("Llama-3-8B", 128256, 4096, 32, 8), ("Llama-2-7B", 32000, 4096, 32, 32)]
SHAPES = [(2, 2048), (1, 4096), (1, 512)]
CHUNK_SIZES = [128, 256, 512, 1024]


class LiveLogitBytes(TorchDispatchMode):
    """The peak bytes of live storages made by operators whose output's last dimension is `vocab_size`."""

    def __init__(self, vocab_size: int, exclude: list[torch.Tensor]):
        super().__init__()
        self.vocab_size = vocab_size
        self.excluded = {StorageWeakRef(tensor.untyped_storage()).cdata for tensor in exclude}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.vocab_size:
                storage = tensor.untyped_storage()
                reference = StorageWeakRef(storage)
                if reference.cdata not in self.excluded:  # the head's weight and its transpose
                    self.live[reference.cdata] = (reference, storage.nbytes())
        self.live = {key: value for key, value in self.live.items() if not value[0].expired()}
        self.peak_bytes = max(self.peak_bytes, sum(size for _, size in self.live.values()))
        return output


def stand_in(vocab_size, hidden_size, heads, kv_heads, dtype=torch.bfloat16):
    """One decoder layer with the architecture's vocabulary, hidden size and heads (the logits do not depend on
    depth), a LoRA on its linear layers, gradient checkpointing on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    network = adapters.attach_adapter(model, adapters.AdapterConfig(algo="lora", rank=8), role="llm")
    assert {parameter.dtype for parameter in network.parameters()} == {torch.float32}  # as the trainer keeps them
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def logit_bytes_table() -> tuple[list[str], list[str]]:
    rows, offload_rows = [], []
    with FakeTensorMode(allow_non_fake_inputs=True):
        for name, vocab_size, hidden_size, heads, kv_heads in ARCHITECTURES:
            model = stand_in(vocab_size, hidden_size, heads, kv_heads)
            parameters = list(model.parameters())
            for batch_size, seq_len in SHAPES:
                input_ids = torch.randint(0, vocab_size, (batch_size, seq_len))
                batch = {"input_ids": input_ids, "labels": input_ids}
                peaks = {}
                for chunk_size in [0, *CHUNK_SIZES]:
                    loss_fn = chunked_loss.CausalLMLoss(chunk_size)
                    with LiveLogitBytes(vocab_size, parameters) as counter:
                        loss_fn(model, batch).backward()
                    peaks[chunk_size] = counter.peak_bytes
                    model.zero_grad(set_to_none=True)
                cells = " | ".join(f"{peaks[size] / GIB:.3f}" for size in CHUNK_SIZES)
                rows.append(f"| {name} | {batch_size} x {seq_len} | {peaks[0] / GIB:.3f} | {cells} |")
                with activation_offload.ActivationOffload(pin_memory=False, copy_host_tensors=True) as offload:
                    loss = chunked_loss.causal_lm_loss(model, batch, chunked_loss.DEFAULT_CHUNK_SIZE)
                loss.backward()
                model.zero_grad(set_to_none=True)
                per_layer = batch_size * seq_len * hidden_size * 2
                offload_rows.append(
                    f"| {name} | {batch_size} x {seq_len} | {offload.offloaded_tensors} | "
                    f"{offload.offloaded_bytes / MIB:.0f} | {per_layer / MIB:.0f} |"
                )
    return rows, offload_rows


def small_llama_step(batch_size=2, seq_len=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).train()
    network = adapters.attach_adapter(model, adapters.AdapterConfig(algo="lora", rank=8), role="llm")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    batch = {"input_ids": input_ids, "labels": input_ids}

    def step(chunk_size: int, offload: bool):
        loss_fn = chunked_loss.CausalLMLoss(chunk_size)
        with activation_offload.offload_activations(offload, pin_memory=False, copy_host_tensors=True):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def tiny_unet_step():
    torch.manual_seed(0)
    pipeline = tiny.build_tiny_sd_pipeline(seed=0)
    unet = pipeline.unet.train()
    network = adapters.attach_adapter(unet, adapters.AdapterConfig(algo="lora", rank=8), role="unet")
    unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    latents = torch.randn(4, unet.config.in_channels, 32, 32)
    encoder_hidden_states = torch.randn(4, 77, unet.config.cross_attention_dim)
    timesteps = torch.randint(0, 1000, (4,))

    def step(chunk_size: int, offload: bool):
        with activation_offload.offload_activations(offload, pin_memory=False, copy_host_tensors=True):
            prediction = unet(latents, timesteps, encoder_hidden_states).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), latents)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_variants(step, variants, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, the variants interleaved so drift hits them alike."""
    for _, chunk_size, offload in variants:  # warm-up
        step(chunk_size, offload)
    seconds = {name: [] for name, _, _ in variants}
    for _ in range(repeats):
        for name, chunk_size, offload in variants:
            started = time.perf_counter()
            step(chunk_size, offload)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in seconds.items()}


def head_share(vocab_size, hidden_size, layers, intermediate_size, kv_size) -> float:
    """The output embedding's share of a forward pass's matrix-product FLOPs per token (attention scores aside):
    what recomputing it per chunk adds, relative to one forward."""
    layer_flops = 2 * hidden_size * (2 * hidden_size + 2 * kv_size + 3 * intermediate_size)
    head_flops = 2 * hidden_size * vocab_size
    return head_flops / (layers * layer_flops + head_flops)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help="Write the markdown report here.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed steps per variant (after one warm-up).")
    args = parser.parse_args(argv)

    import transformers

    load_before = os.getloadavg()[0]
    logit_rows, offload_rows = logit_bytes_table()
    llama_variants = [
        ("upstream loss (--loss_chunk_size 0)", 0, False),
        (f"--loss_chunk_size {chunked_loss.DEFAULT_CHUNK_SIZE}", chunked_loss.DEFAULT_CHUNK_SIZE, False),
        ("--loss_chunk_size 0 --offload_activations", 0, True),
        (f"--loss_chunk_size {chunked_loss.DEFAULT_CHUNK_SIZE} --offload_activations", 256, True),
    ]
    llama_times = time_variants(small_llama_step(), llama_variants, args.repeats)
    unet_variants = [("plain", 0, False), ("--offload_activations", 0, True)]
    unet_times = time_variants(tiny_unet_step(), unet_variants, args.repeats)

    load_after = os.getloadavg()[0]
    stand_in_share = head_share(32000, 256, 4, 688, 128)
    llama3_share = head_share(128256, 4096, 32, 14336, 1024)

    def time_rows(times):
        baseline = next(iter(times.values()))
        return [f"| {name} | {value * 1000:.0f} | {value / baseline:.2f}x |" for name, value in times.items()]

    chunk_header = " | ".join(f"{size} tokens" for size in CHUNK_SIZES)
    lines = [
        "# --loss_chunk_size and --offload_activations: bytes saved, step time",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} thread(s), no GPU. torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/offload_and_chunked_loss.py --output "
        "benchmarks/results/offload-and-chunked-loss-cpu.md`",
        "",
        "## Peak live logit-sized tensors, one forward + backward (GiB, bf16 model, fp32 loss)",
        "",
        "Tensors whose last dimension is the vocabulary (logits, their fp32 copy, log-softmax, gradients), counted "
        "on fake tensors as operators make and free them; the real vocabulary, hidden size and heads, one decoder "
        "layer (the logits do not depend on depth), LoRA rank 8, gradient checkpointing. Upstream's loss "
        "(`model(**batch).loss`) against `--loss_chunk_size TOKENS`.",
        "",
        f"| model | batch x tokens | upstream loss | {chunk_header} |",
        "| --- | --- | --- | " + " | ".join("---" for _ in CHUNK_SIZES) + " |",
        *logit_rows,
        "",
        "## What --offload_activations moves per step (same stand-in, gradient checkpointing, default chunked loss)",
        "",
        "Every layer's input is kept through the saved-tensor hooks by non-reentrant checkpointing, so it is moved; "
        "so are the final hidden states the chunked loss keeps. One decoder layer here: a real model moves one "
        "layer input (bf16, column 5) per layer more.",
        "",
        "| model | batch x tokens | tensors moved | MiB moved | one layer input (MiB) |",
        "| --- | --- | --- | --- | --- |",
        *offload_rows,
        "",
        f"## Step time on this CPU (median of {args.repeats}, forward + backward + AdamW)",
        "",
        "Llama stand-in: vocabulary 32,000, hidden 256, 4 layers, batch 2 x 256 tokens, LoRA rank 8, gradient "
        "checkpointing, fp32. The offload variants copy every saved activation >= 1 MiB to a new host buffer and "
        "back (what a GPU run copies over PCIe; on a CPU the trainer itself has nothing to move).",
        "",
        f"Load average {load_before:.1f} before and {load_after:.1f} after the timings on {os.cpu_count()} cores: "
        "other jobs shared the machine, so differences of about 10 % are within the noise; each variant ran "
        "interleaved with the others to share it alike.",
        "",
        "| variant | ms / step | vs first |",
        "| --- | --- | --- |",
        *time_rows(llama_times),
        "",
        f"The chunked loss recomputes the output embedding once more per step. Here the head is "
        f"{stand_in_share:.0%} of a forward's matrix-product FLOPs (a 32,000-token head on a 256-wide, 4-layer "
        f"model), so that recomputation shows; in Llama-3-8B it is {llama3_share:.1%} of one forward, and a step "
        "with gradient checkpointing costs about three forwards or more, so about 2 %.",
        "",
        "Tiny UNet (`diffusers_lowmem.tiny`), batch 4 x 32 x 32 latents, LoRA rank 8, gradient checkpointing:",
        "",
        "| variant | ms / step | vs first |",
        "| --- | --- | --- |",
        *time_rows(unet_times),
        "",
    ]
    report = "\n".join(lines)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
