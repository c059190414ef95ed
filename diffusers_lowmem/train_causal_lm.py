"""Fine-tune a causal language model with LyCORIS adapters on a (optionally) quantized frozen base.

A drop-in replacement for transformers' `examples/pytorch/language-modeling/run_clm_no_trainer.py`: every upstream
flag works the same, plus `--adapter {lora,loha,lokr,locon}`, `--quant {8bit,nf4}`, `--gradient_checkpointing`,
`--optimizer` (8-bit, paged and Lion optimizers; `--use_8bit_adam`) and memory options. Run it as

    accelerate launch -m diffusers_lowmem.train_causal_lm --model_name_or_path PATH \\
        --train_file train.txt --validation_file validation.txt --adapter lora --quant nf4 --output_dir OUT

OUT then holds `lycoris_weights.safetensors` (all four algorithms; `diffusers_lowmem.load_adapter(model, OUT)`), a
peft adapter where peft can represent it (`peft.PeftModel.from_pretrained(model, OUT)`), the tokenizer,
`all_results.json` (perplexity, eval loss), `training_summary.json` and the memory report.

The recipe reads top to bottom like the upstream script; each step is a call into a component.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from diffusers_lowmem import (
    activation_offload,
    adapters,
    allocator,
    chunked_loss,
    data,
    estimate,
    evaluation,
    memory,
    peft_format,
    quantization,
    training,
)
from diffusers_lowmem import args as arg_groups

logger = get_logger(__name__, log_level="INFO")

ARCHITECTURE_PREFIX = arg_groups.ARCHITECTURE_PREFIX
ALL_RESULTS_NAME = "all_results.json"
TRACKER_PROJECT_NAME = "clm_no_trainer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line; every error is raised here, before any model is loaded."""
    parser = arg_groups.causal_lm_parser()
    args = parser.parse_args(argv)
    arg_groups.validate_causal_lm_args(args, parser)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Steps of the recipe
# ----------------------------------------------------------------------------------------------------------------


def setup_accelerator(args) -> Accelerator:
    """The run's Accelerator: trackers only with `--with_tracking`, as upstream; TensorBoard under `--logging_dir`."""
    project_config = None
    if args.output_dir is not None:
        logging_dir = Path(args.output_dir, args.logging_dir)
        project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_config=project_config,
    )
    training.configure_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    return accelerator


def load_raw_datasets(args):
    """The train and validation text, as upstream (hub dataset or txt/csv/json files), before any model is loaded."""
    return data.load_text_datasets(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_file=args.train_file,
        validation_file=args.validation_file,
        validation_split_percentage=args.validation_split_percentage,
        cache_dir=None,
        keep_linebreaks=not args.no_keep_linebreaks,
        trust_remote_code=args.trust_remote_code,
    )


def load_tokenizer(args):
    """`--tokenizer_name` or the model's tokenizer; a synthetic one of the right vocabulary for `architecture:NAME`."""
    if args.model_name_or_path.startswith(ARCHITECTURE_PREFIX) and args.tokenizer_name is None:
        from diffusers_lowmem import architectures

        return architectures.build_tokenizer(args.model_name_or_path[len(ARCHITECTURE_PREFIX) :])
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        args.tokenizer_name or args.model_name_or_path,
        use_fast=not args.use_slow_tokenizer,
        trust_remote_code=args.trust_remote_code,
    )


def load_model_config(args):
    """The model's config alone (`config.json`, no weights): its limits (positions) shape the data before loading."""
    if args.model_name_or_path.startswith(ARCHITECTURE_PREFIX):
        from diffusers_lowmem import architectures

        return architectures.load_config(args.model_name_or_path[len(ARCHITECTURE_PREFIX) :], "model")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        args.config_name or args.model_name_or_path, trust_remote_code=args.trust_remote_code
    )


def load_model(args, weight_dtype: torch.dtype, tokenizer, with_weights: bool = True):
    """The causal LM on the CPU in `weight_dtype` (on the meta device for `architecture:NAME`).

    `--model_name_or_path architecture:NAME` builds a real architecture (e.g. `llama2-7b`) with random weights on
    the meta device, for memory profiling without a download; it gets its weights on the way to the device.
    Without `with_weights` (the memory estimate) any model is built that way, from its config alone.
    """
    if args.model_name_or_path.startswith(ARCHITECTURE_PREFIX):
        from diffusers_lowmem import architectures

        return architectures.build_on_meta(args.model_name_or_path[len(ARCHITECTURE_PREFIX) :], "model")

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        args.config_name or args.model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    if with_weights:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path,
            config=config,
            torch_dtype=weight_dtype,
            low_cpu_mem_usage=True,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        from accelerate import init_empty_weights

        from diffusers_lowmem import architectures

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                config, torch_dtype=weight_dtype, trust_remote_code=args.trust_remote_code
            )
        architectures.tie_weights_(model)  # as `from_pretrained` does (tie_word_embeddings)
    # As upstream: a tokenizer with more tokens than the embedding gets rows for them (frozen, like the rest).
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        logger.warning(
            f"The tokenizer has {len(tokenizer)} tokens and the embedding {embedding_size} rows: resizing. The new "
            "rows are random and stay frozen; only the adapter is trained."
        )
        model.resize_token_embeddings(len(tokenizer))
    return model


def place_frozen_model(model, args, weight_dtype: torch.dtype, device, quant_storage: torch.dtype = torch.uint8):
    """Freezes `model` and moves it to `device`: with `--quant`, quantized layer by layer on the way (the
    full-precision model is never on the device as a whole); else materialised (meta) and moved.

    Only meta tensors get `weight_dtype` here: a loaded model already has it, and its float32 buffers (rotary
    frequencies) and `_keep_in_fp32_modules` stay as transformers loaded them. Embeddings, norms and the LM head are
    not upcast (no `prepare_model_for_kbit_training`).

    Returns:
        The quantization report, or None without `--quant`.
    """
    model.requires_grad_(False)
    if args.quant:
        return quantization.quantize_model(
            model,
            args.quant,
            compute_dtype=weight_dtype,
            skip=quantization.DEFAULT_SKIP_CAUSAL_LM if args.quant_skip is None else args.quant_skip,
            device=device,
            compute_errors=bool(args.eval_steps),  # the per-layer weight error, beside the eval loss
            cast_rest=False,
            quant_storage=quant_storage,
        )
    quantization.materialize_meta_(model, device, weight_dtype)
    estimate.module_to_(model, device)
    return None


def attach_adapter(args, model):
    """A LyCORIS network on every attention and MLP linear layer, in fp32, registered as a child of `model` (so
    DDP, autocast and accelerate's hooks see it through the model)."""
    config = arg_groups.adapter_config_from_args(args)
    try:
        network = adapters.attach_adapter(model, config, role="llm")
    except ValueError as error:  # --target_modules that match no layer: the message says what to pass
        raise SystemExit(f"Bad adapter targets: {error}") from error
    estimate.module_to_(network, dtype=torch.float32)  # trainable adapters stay fp32 under fp16/bf16 mixed precision
    return network


def forward_loss(args, loss_fn, model, batch) -> torch.Tensor:
    """The training forward: `loss_fn(model, batch)` (`--loss_chunk_size`), its saved activations in host memory
    with `--offload_activations`."""
    with activation_offload.offload_activations(args.offload_activations):
        return loss_fn(model, batch)


def backward_and_step(accelerator, loss, optimizer, lr_scheduler) -> torch.Tensor:
    """Backward, the optimizer and schedule step (applied by accelerate on sync steps only; `lr_scheduler` None: no
    schedule, as in the memory estimate).

    Returns:
        The loss detached: keep that, not `loss`. The graph goes now, not at the next forward: bitsandbytes' 8-bit
        matmul keeps its inputs on its autograd node, which backward does not free.
    """
    accelerator.backward(loss)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.detach()


def create_optimizer(args, network, device) -> tuple[list, torch.optim.Optimizer]:
    """The adapter's parameters and their `--optimizer`, as upstream (the adapter has no bias or norm weights to
    exempt from weight decay; betas and eps: the optimizer's defaults, as upstream's AdamW)."""
    trainable = training.trainable_parameters(network)
    optimizer = training.create_optimizer(
        [{"params": trainable, "weight_decay": args.weight_decay}],
        args.optimizer,
        args.learning_rate,
        args.weight_decay,
        device=device,
    )
    return trainable, optimizer


def enable_gradient_checkpointing(args, model) -> None:
    """Recompute each decoder layer in backward. Non-reentrant checkpointing propagates gradients to the adapter
    parameters inside a layer without the layer's input requiring grad, so `enable_input_require_grads` (needed
    only by reentrant checkpointing) is not called."""
    if not args.gradient_checkpointing:
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_lm_datasets(args, raw_datasets, tokenizer, model_config, accelerator):
    """Tokenized text grouped into `--block_size` blocks, labels = inputs (as upstream); the block never longer than
    the model's positions (read from `model_config`, so this runs before the weights load).

    Raises:
        ValueError: If a split has fewer tokens than one block, or (for `architecture:NAME`, whose embedding is not
            resized to the tokenizer as a loaded model's is) the tokenizer has more tokens than the embedding rows.
    """
    if args.model_name_or_path.startswith(ARCHITECTURE_PREFIX):
        data.check_vocabulary(tokenizer, model_config)
    block_size = data.resolve_block_size(tokenizer, args.block_size, data.max_positions(model_config))
    with accelerator.main_process_first():
        lm_datasets = data.tokenize_and_group(
            raw_datasets,
            tokenizer,
            block_size,
            num_proc=args.preprocessing_num_workers,
            overwrite_cache=args.overwrite_cache,
        )
    for split in ("train", "validation"):
        if len(lm_datasets[split]) == 0:
            raise ValueError(
                f"The {split} split has fewer than --block_size {block_size} tokens, so it makes no block: lower "
                "--block_size or add text."
            )
    return lm_datasets, block_size


def build_dataloaders(args, lm_datasets, seed: int):
    """A train loader whose order depends only on (seed, epoch), and the evaluation loader (in order)."""
    train_dataloader = torch.utils.data.DataLoader(
        lm_datasets["train"],
        sampler=training.EpochShuffleSampler(len(lm_datasets["train"]), seed),
        collate_fn=data.causal_lm_collate,
        batch_size=args.per_device_train_batch_size,
    )
    eval_dataloader = torch.utils.data.DataLoader(
        lm_datasets["validation"], collate_fn=data.causal_lm_collate, batch_size=args.per_device_eval_batch_size
    )
    return train_dataloader, eval_dataloader


def perplexity_of(eval_loss: float) -> float:
    """`exp(eval_loss)`, `inf` on overflow, as upstream."""
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return float("inf")


@torch.no_grad()
def evaluate(
    model, eval_dataloader, accelerator, per_device_eval_batch_size: int, loss_fn=chunked_loss.plain_loss
) -> tuple[float, float]:
    """Upstream's evaluation: the mean over batches of the batch loss (`loss_fn(model, batch)`; the trainer passes
    its `--loss_chunk_size` loss, which never holds the full logits), gathered over processes.

    Returns:
        `(eval_loss, perplexity)`.
    """
    model.eval()
    losses = []
    for batch in eval_dataloader:
        loss = loss_fn(model, batch).detach().float()
        losses.append(accelerator.gather_for_metrics(loss.repeat(per_device_eval_batch_size)))
    eval_loss = torch.cat(losses).mean().item()
    return eval_loss, perplexity_of(eval_loss)


@torch.no_grad()
def mean_eval_loss(model, eval_dataloader, device, loss_fn=chunked_loss.plain_loss) -> float:
    """The mean loss over every block of an unprepared (unsharded) eval loader, each batch weighted by its size: the
    number upstream's `evaluate` gives, computed by one process alone."""
    model.eval()
    total, count = 0.0, 0
    for batch in eval_dataloader:
        size = len(batch["input_ids"])
        total += loss_fn(model, {key: value.to(device) for key, value in batch.items()}).item() * size
        count += size
    return total / count


def record_evaluation(
    history: list, model, eval_dataloader, accelerator, args, step: int, loss_fn=chunked_loss.plain_loss
) -> None:
    """`--eval_steps`: evaluates, logs `eval/loss` and `eval/perplexity` at `step` and keeps them for the summary."""
    eval_loss, perplexity = evaluate(model, eval_dataloader, accelerator, args.per_device_eval_batch_size, loss_fn)
    history.append([step, eval_loss, perplexity])
    accelerator.log({"eval/loss": eval_loss, "eval/perplexity": perplexity}, step=step)
    logger.info(f"step {step}: perplexity: {perplexity} eval_loss: {eval_loss}")


def checkpoint_every(args) -> int | str | None:
    """`--checkpointing_steps` as upstream reads it: an int of steps, `"epoch"`, or None."""
    value = args.checkpointing_steps
    if value is not None and value.isdigit():
        return int(value)
    return value


def save_adapter_weights(args, network, output_dir) -> Path:
    """The adapter in LyCORIS/kohya format, loadable with `diffusers_lowmem.load_adapter(model, output_dir)`."""
    return adapters.save_adapter(
        Path(output_dir) / adapters.LYCORIS_WEIGHT_NAME,
        {"llm": network},
        arg_groups.adapter_config_from_args(args),
        metadata={"base_model": args.model_name_or_path, "quant": args.quant or "none"},
    )


def save_outputs(args, accelerator, network, model, tokenizer, results: dict, conv1d_modules) -> dict:
    """Adapter (LyCORIS and, where representable, peft), tokenizer and `all_results.json`, as upstream's final save."""
    output_dir = Path(args.output_dir)
    weights_path = save_adapter_weights(args, network, output_dir)
    peft_path = peft_format.save_peft_adapter(
        output_dir,
        network,
        arg_groups.adapter_config_from_args(args),
        accelerator.unwrap_model(model),
        base_model_name_or_path=args.model_name_or_path,
        conv1d_modules=conv1d_modules,
    )
    tokenizer.save_pretrained(output_dir)
    training.write_json(output_dir / ALL_RESULTS_NAME, results)
    logger.info(
        f"Saved adapter weights to {weights_path}" + (f" and a peft adapter to {peft_path}" if peft_path else "")
    )
    return {"weights": weights_path, "peft": peft_path}


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    """Trains and returns a summary (global step, final loss, perplexity, output paths); with
    `--estimate_memory`, only estimates the run's memory and returns the estimate."""
    allocator.configure_allocator()  # expandable segments unless the user set the allocator: before CUDA starts
    if args.estimate_memory is not None:
        return estimate_memory(args)
    accelerator = setup_accelerator(args)
    # Data first, as upstream: a bad file fails before the model is loaded or anything is written. The blocks are
    # cut here too, their size bounded by the model's positions read from its config (no weights yet).
    tokenizer = load_tokenizer(args)
    try:
        raw_datasets = load_raw_datasets(args)
        model_config = load_model_config(args)
        lm_datasets, block_size = build_lm_datasets(args, raw_datasets, tokenizer, model_config, accelerator)
    except ValueError as error:
        raise SystemExit(f"Bad training data: {error}") from error
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    checkpoint_root = args.output_dir or "."  # upstream writes checkpoints to the working directory without one
    seed = training.resolve_seed(args.seed)
    resume_path = training.resolve_resume_checkpoint(checkpoint_root, args.resume_from_checkpoint)
    if resume_path is not None and args.seed is None:
        seed = training.read_training_state(resume_path).get("seed", seed)
    training.seed_step(seed, -2)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)

    loss_fn = chunked_loss.CausalLMLoss(args.loss_chunk_size)  # the logits a chunk at a time (0: upstream's)
    model = load_model(args, weight_dtype, tokenizer)
    conv1d_modules = quantization.conv1d_to_linear_(model)  # GPT-2's Conv1D projections become nn.Linear
    model.config.use_cache = False  # no KV cache in training (and none with gradient checkpointing)
    train_dataloader, eval_dataloader = build_dataloaders(args, lm_datasets, seed)
    # --eval_steps with --quant: the eval loss of the base before quantization, for eval/quantization_loss_delta.
    unquantized_eval_loss = None
    if args.eval_steps and args.quant and not args.model_name_or_path.startswith(ARCHITECTURE_PREFIX):
        unquantized_eval_loss = evaluation.unquantized_loss(
            [model], accelerator.device, lambda: mean_eval_loss(model, eval_dataloader, accelerator.device, loss_fn)
        )
    # From here on the tracker's peak covers the run (the unquantized base's visit above is not part of it).
    tracker = memory.MemoryTracker(
        accelerator.device,
        accelerator,
        args.output_dir,
        log_every=args.memory_log_steps,
        count_tensor_steps=estimate.ESTIMATE_STEPS,  # off CUDA: counted tensor bytes over what the estimate replays
    )

    # Place the frozen base: quantized layer by layer on the way to the device with --quant.
    quant_storage = training.quant_storage_dtype(accelerator, weight_dtype)
    quant_report = place_frozen_model(model, args, weight_dtype, accelerator.device, quant_storage)
    tracker.watch(models=[model])
    tracker.milestone("after_model_load")

    network = attach_adapter(args, model)
    enable_gradient_checkpointing(args, model)
    tracker.watch(models=[model])
    tracker.milestone("after_adapter")

    trainable, optimizer = create_optimizer(args, network, accelerator.device)
    # Steps, epochs, the LR schedule and the resume position: from the loader as each process will iterate it.
    schedule = training.TrainingSchedule.for_dataloader(
        train_dataloader,
        accelerator,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_train_epochs=args.num_train_epochs,
        max_train_steps=args.max_train_steps,
        num_warmup_steps=args.num_warmup_steps,
    )
    lr_scheduler = schedule.create_lr_scheduler(args.lr_scheduler_type, optimizer)

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    schedule.check_prepared(train_dataloader)
    training.register_adapter_checkpoint_hooks(
        accelerator,
        save_adapter_to=lambda directory: save_adapter_weights(args, network, directory),
        load_adapter_from=lambda directory: adapters.load_adapter_weights(
            {"llm": network}, Path(directory) / adapters.LYCORIS_WEIGHT_NAME
        ),
    )
    tracker.watch(models=[model], optimizer=optimizer)
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT_NAME, config=training.tracker_config(args))

    # Resume.
    global_step, first_epoch, resume_batch = 0, 0, 0
    if resume_path is not None:
        state = training.load_checkpoint(accelerator, resume_path)
        global_step = state["global_step"]
        first_epoch, resume_batch = schedule.resume_position(global_step)
        logger.info(f"Resumed from {resume_path} at step {global_step} (epoch {first_epoch}).")

    training.log_run_summary(
        logger,
        num_examples=len(lm_datasets["train"]),
        batch_size=args.per_device_train_batch_size,
        schedule=schedule,
        block_size=block_size,
        adapter=args.adapter,
        quantization=args.quant or "none",
        trainable_parameters=f"{sum(p.numel() for p in trainable):,}",
    )

    checkpointing = checkpoint_every(args)
    progress_bar = tqdm(
        range(schedule.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    first_step_of_run = global_step + 1
    loss = torch.tensor(float("nan"))
    eval_loss, perplexity = float("nan"), float("nan")
    eval_history = []  # [step, eval loss, perplexity] of --eval_steps
    quantization_scalars = {}
    if args.eval_steps:
        record_evaluation(eval_history, model, eval_dataloader, accelerator, args, global_step, loss_fn)
        if global_step == 0 and args.quant:  # adapters start as the identity: this is the quantized base's loss
            quantization_scalars = evaluation.quantization_scalars(
                eval_history[0][1], unquantized_eval_loss, {"llm": quant_report}
            )
            accelerator.log(quantization_scalars, step=0)
    step_seconds, step_started = [], time.perf_counter()
    stopped_by = None
    with training.StopSignals() as stop_signals, training.out_of_memory_guard(tracker, args.output_dir, False):
        for epoch in range(first_epoch, schedule.num_train_epochs):
            if global_step >= schedule.max_train_steps or stopped_by:  # e.g. resumed from the last checkpoint
                break
            model.train()
            train_dataloader.set_epoch(epoch)
            batches = train_dataloader
            if epoch == first_epoch and resume_batch:
                batches = accelerator.skip_first_batches(train_dataloader, resume_batch)
            total_loss = torch.zeros((), device=accelerator.device)
            for batch_index, batch in enumerate(batches, start=resume_batch if epoch == first_epoch else 0):
                # Dropout of this micro-batch depends on (seed, epoch, batch) only, so a resumed run draws the same.
                training.seed_step(seed, epoch * schedule.batches_per_epoch + batch_index)
                with accelerator.accumulate(model):
                    loss = forward_loss(args, loss_fn, model, batch)
                    if not training.loss_is_finite(loss, accelerator):
                        if not args.skip_nonfinite_loss:
                            raise training.nonfinite_loss_error(loss, global_step, checkpoint_root)
                        logger.warning(f"Skipping a batch of step {global_step + 1}: the loss is {loss.item()}.")
                        optimizer.zero_grad()
                        continue
                    total_loss += loss.detach().float()
                    loss = backward_and_step(accelerator, loss, optimizer, lr_scheduler)
                    if accelerator.sync_gradients and global_step + 1 == first_step_of_run:
                        # Before zero_grad: gradients and the new optimizer state are both held here.
                        tracker.milestone("after_first_step", step=global_step + 1)
                    optimizer.zero_grad()

                if not accelerator.sync_gradients:
                    continue
                progress_bar.update(1)
                global_step += 1
                step_seconds.append(training.elapsed_since(step_started, accelerator.device))
                step_started = time.perf_counter()
                tracker.log_step(global_step)
                step_loss, learning_rate = loss.detach().item(), lr_scheduler.get_last_lr()[0]
                accelerator.log({"step_loss": step_loss, "lr": learning_rate}, step=global_step)
                progress_bar.set_postfix(loss=step_loss, lr=learning_rate)
                if args.eval_steps and global_step % args.eval_steps == 0:
                    record_evaluation(eval_history, model, eval_dataloader, accelerator, args, global_step, loss_fn)
                    model.train()
                if isinstance(checkpointing, int) and global_step % checkpointing == 0:
                    training.save_checkpoint(
                        accelerator,
                        checkpoint_root,
                        global_step,
                        {"seed": seed},
                        args.checkpoints_total_limit,
                        trainable,
                    )
                if stop_signals.requested(accelerator):
                    stopped_by = stop_signals.received or "a stop signal on another process"
                if global_step >= schedule.max_train_steps or stopped_by:
                    break
            if stopped_by:
                break

            eval_loss, perplexity = evaluate(
                model, eval_dataloader, accelerator, args.per_device_eval_batch_size, loss_fn
            )
            logger.info(f"epoch {epoch}: perplexity: {perplexity} eval_loss: {eval_loss}")
            accelerator.log(
                {
                    "perplexity": perplexity,
                    "eval_loss": eval_loss,
                    "train_loss": total_loss.item() / schedule.batches_per_epoch,
                    "epoch": epoch,
                    "step": global_step,
                },
                step=global_step,
            )
            if checkpointing == arg_groups.CHECKPOINT_EVERY_EPOCH:
                training.save_checkpoint(
                    accelerator, checkpoint_root, global_step, {"seed": seed}, args.checkpoints_total_limit, trainable
                )

    if stopped_by:
        path = training.stop_with_checkpoint(
            accelerator,
            tracker,
            checkpoint_root,
            global_step,
            {"seed": seed},
            args.checkpoints_total_limit,
            stopped_by,
            trainable=trainable,
        )
        return {"global_step": global_step, "stopped_by": stopped_by, "checkpoint": path, "weights": None}

    if args.eval_steps and eval_history[-1][0] != global_step:
        record_evaluation(eval_history, model, eval_dataloader, accelerator, args, global_step, loss_fn)
    if math.isnan(eval_loss):
        # No epoch ran (`--max_train_steps 0`, or resumed at the end): the results still give the model's perplexity.
        eval_loss, perplexity = evaluate(model, eval_dataloader, accelerator, args.per_device_eval_batch_size, loss_fn)

    # Save: the adapter (LyCORIS and peft formats), tokenizer, results and the memory report.
    accelerator.wait_for_everyone()
    training.verify_identical_across_processes(accelerator, trainable)
    training.check_finite_weights(trainable, global_step, checkpoint_root)
    results = {"perplexity": perplexity, "eval_loss": eval_loss}
    summary = {
        "global_step": global_step,
        "loss": float(loss.detach().item()),
        **results,
        "weights": None,
        "peft": None,
    }
    if accelerator.is_main_process and args.output_dir is not None:
        quant_summary = {"llm": quant_report.to_dict()} if quant_report is not None else {}
        summary.update(save_outputs(args, accelerator, network, model, tokenizer, results, conv1d_modules))
        report_extra = {"quantization": quant_summary} if quant_summary else {}
        tracker.write_report(args.output_dir, extra={**report_extra, **allocator.report_entry()})
        training.write_json(
            Path(args.output_dir) / training.TRAINING_SUMMARY_NAME,
            {
                "global_step": global_step,
                "final_loss": summary["loss"],
                "step_seconds": step_seconds,
                **results,
                "eval_history": eval_history,
                **evaluation.summary_fields(quantization_scalars),
                "quantization": quant_summary,
            },
        )
        logger.info("Memory:\n" + tracker.summary_table())
        if args.push_to_hub:
            training.push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.logging_dir)
    training.end_training(accelerator)
    return summary


def measure_frozen_base(args: argparse.Namespace) -> dict:
    """The "quantization only" row of the memory study: load and quantize the frozen base, run one forward pass of
    `--per_device_train_batch_size` x `--block_size` random tokens, and write the memory report, with no adapter
    and no optimizer."""
    accelerator = setup_accelerator(args)
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    tracker = memory.MemoryTracker(accelerator.device, accelerator, args.output_dir, log_every=1, count_tensor_steps=1)
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT_NAME, config=training.tracker_config(args))
    tokenizer = load_tokenizer(args)
    model = load_model(args, weight_dtype, tokenizer)
    quantization.conv1d_to_linear_(model)
    place_frozen_model(model, args, weight_dtype, accelerator.device)
    model.config.use_cache = False
    tracker.watch(models=[model])
    tracker.milestone("after_model_load")
    block_size = data.resolve_block_size(
        tokenizer, args.block_size, max_position_embeddings=getattr(model.config, "max_position_embeddings", None)
    )
    generator = torch.Generator().manual_seed(training.resolve_seed(args.seed))
    vocab_size = model.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(0, vocab_size, (args.per_device_train_batch_size, block_size), generator=generator)
    with torch.no_grad(), accelerator.autocast():
        model(input_ids=input_ids.to(accelerator.device))
    tracker.milestone("after_first_step", step=1)
    tracker.log_step(1)
    if accelerator.is_main_process and args.output_dir is not None:
        tracker.write_report(args.output_dir)
    training.end_training(accelerator)
    return tracker.report()


# ----------------------------------------------------------------------------------------------------------------
# --estimate_memory: the steps above, on fake tensors
# ----------------------------------------------------------------------------------------------------------------


def estimate_batch(args, vocab_size: int, block_size: int, device) -> dict:
    """A training batch of the shapes the flags give (`--per_device_train_batch_size` x block size): `input_ids`
    and `labels` (int64). The collator's all-ones `attention_mask` is left out: transformers skips an all-ones mask
    for plain causal attention, but cannot see that it is all ones on fake tensors and would build a 4-d one."""
    shape = (args.per_device_train_batch_size, block_size)
    input_ids = torch.randint(0, vocab_size, shape, device=device)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def replay_on_fake_tensors(args) -> dict:
    """Runs this recipe's setup and `estimate.ESTIMATE_STEPS` optimizer steps on fake tensors and returns the
    estimate report (see `estimate.build_report`). Reads the model's config and tokenizer files, no weights, no data.
    """
    accelerator = setup_accelerator(args)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    device = accelerator.device
    tokenizer = load_tokenizer(args)
    block_size = data.resolve_block_size(tokenizer, args.block_size, data.max_positions(load_model_config(args)))
    # The setup steps of `main`, in its order; no unquantized evaluation, no per-layer weight errors.
    args = copy.copy(args)
    args.eval_steps = None
    with estimate.fake_run(device.type) as counter:
        with estimate.real_tensors():  # the skeleton on the meta device: weights come with placing it
            model = load_model(args, weight_dtype, tokenizer, with_weights=False)
        counter.adopt(model.buffers())  # real buffers made with it (rotary tables) are on the device too
        quantization.conv1d_to_linear_(model)
        model.config.use_cache = False
        counter.phase = "quantize" if args.quant else "load"
        place_frozen_model(model, args, weight_dtype, device, training.quant_storage_dtype(accelerator, weight_dtype))
        counter.phase = "adapter"
        network = attach_adapter(args, model)
        enable_gradient_checkpointing(args, model)
        _, optimizer = create_optimizer(args, network, device)
        # Already on the device (as in `main`); moving fake parameters again would fail in `nn.Module.to`.
        model, optimizer = accelerator.prepare(model, optimizer, device_placement=[False, False])
        counter.name_modules({"llm": model})
        batch = estimate_batch(args, model.get_input_embeddings().weight.shape[0], block_size, device)
        model.train()
        loss_fn = chunked_loss.CausalLMLoss(args.loss_chunk_size)
        breakdown = None
        for _ in range(estimate.ESTIMATE_STEPS):
            counter.phase = "forward"
            loss = forward_loss(args, loss_fn, model, batch)
            loss = backward_and_step(accelerator, loss, optimizer, None)
            if breakdown is None:  # after the first step: gradients and the optimizer state are both held
                breakdown = memory.memory_breakdown([model], optimizer)
                counter.label_tensors({"llm": model}, optimizer)
            optimizer.zero_grad()
    accelerator.free_memory()
    return estimate.build_report(counter, breakdown, "train_causal_lm " + " ".join(sys.argv[1:]))


def replay_frozen_base_on_fake_tensors(args) -> dict:
    """`measure_frozen_base` on fake tensors (the memory study's "quantization only" row): the frozen base loaded
    and quantized, one forward pass without gradients, no adapter and no optimizer. Returns the estimate report."""
    accelerator = setup_accelerator(args)
    weight_dtype = training.weight_dtype_for(accelerator.mixed_precision)
    device = accelerator.device
    tokenizer = load_tokenizer(args)
    block_size = data.resolve_block_size(tokenizer, args.block_size, data.max_positions(load_model_config(args)))
    with estimate.fake_run(device.type) as counter:
        with estimate.real_tensors():
            model = load_model(args, weight_dtype, tokenizer, with_weights=False)
        counter.adopt(model.buffers())
        quantization.conv1d_to_linear_(model)
        model.config.use_cache = False
        counter.phase = "quantize" if args.quant else "load"
        place_frozen_model(model, args, weight_dtype, device)
        counter.name_modules({"llm": model})
        counter.label_tensors({"llm": model})
        batch = estimate_batch(args, model.get_input_embeddings().weight.shape[0], block_size, device)
        counter.phase = "forward"
        with torch.no_grad(), accelerator.autocast():
            model(input_ids=batch["input_ids"])
        breakdown = memory.memory_breakdown([model])
    return estimate.build_report(counter, breakdown, "train_causal_lm (frozen base) " + " ".join(sys.argv[1:]))


def memory_saving_variants(args) -> list[tuple[str, dict]]:
    """The flag changes `--estimate_memory GIB` tries when the command does not fit (each once; all together too)."""
    variants = []
    if args.quant != "nf4":
        variants.append(("--quant nf4", {"quant": "nf4"}))
    if not args.gradient_checkpointing:
        variants.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if not args.offload_activations:
        variants.append(("--offload_activations", {"offload_activations": True}))
    if args.optimizer == "adamw":
        variants.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if args.per_device_train_batch_size > 1:
        half = args.per_device_train_batch_size // 2
        variants.append((f"--per_device_train_batch_size {half}", {"per_device_train_batch_size": half}))
    if args.block_size is not None and args.block_size > 128:
        variants.append((f"--block_size {args.block_size // 2}", {"block_size": args.block_size // 2}))
    return variants


def estimate_memory(args: argparse.Namespace) -> dict:
    """`--estimate_memory [GIB]`: predicts the run's peak device memory without training, prints the table, writes
    `OUTPUT_DIR/memory_estimate.json` and returns the report (see `estimate.estimate_command`)."""
    return estimate.estimate_command(args, replay_on_fake_tensors, memory_saving_variants(args), args.output_dir)


def cli() -> None:
    main(parse_args(sys.argv[1:]))


if __name__ == "__main__":
    cli()
