"""What both trainers share around the loop: RNG per step, data order per epoch, checkpoints, optimizers, dtypes.

Exact resumption is a design goal: a run resumed from a checkpoint must end with the same adapter as an
uninterrupted one. Upstream scripts drift because the randomness of step `k` depends on everything drawn before it
(dataloader iterator seeds, augmentations, noise). Here every random draw of a step is a function of
`(seed, step)` only: the data order of an epoch comes from `(seed, epoch)` (`EpochShuffleSampler`), and the global
RNGs are re-seeded from `(seed, step)` before each step (`seed_step`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusers_lowmem import memory

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
TRAINING_STATE_NAME = "training_state.json"
TRAINING_SUMMARY_NAME = "training_summary.json"
_PARTIAL_SUFFIX = ".partial"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def quant_storage_dtype(accelerator, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype NF4 weights are packed in: that of the rest of the model under FSDP (which flattens one dtype per
    unit, as QLoRA with FSDP needs), else bitsandbytes' default `uint8`. The bytes stored are the same."""
    from accelerate.utils import DistributedType

    return weight_dtype if accelerator.distributed_type == DistributedType.FSDP else torch.uint8


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """The dtype of frozen weights under `--mixed_precision` (trainable adapters always stay in float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def resolve_seed(seed: int | None) -> int:
    """Returns `seed`, or a fresh random one (logged) so that even unseeded runs can be resumed exactly."""
    if seed is not None:
        return seed
    seed = random.SystemRandom().randrange(2**31)
    logger.info(f"No --seed given; using seed {seed} (stored in checkpoints for exact resumption).")
    return seed


def seed_step(seed: int, step: int) -> None:
    """Re-seeds Python, NumPy and torch (all devices) from `(seed, step)`, so step `step` draws the same numbers
    whether the run was interrupted before it or not."""
    step_seed = (seed * 1_000_003 + step) % (2**32)
    random.seed(step_seed)
    np.random.seed(step_seed)
    torch.manual_seed(step_seed)


class PerSampleSeedDataset(torch.utils.data.Dataset):
    """Fetches sample `i` of epoch `e` under RNG seeds derived from `(seed, e, i)` only.

    Augmentations (random crop, flip, caption choice) then do not depend on when a sample is fetched: accelerate's
    loaders prefetch a batch ahead and synchronise RNG states when an iterator starts, and a resumed run fetches
    from the middle of an epoch. The global RNG states are restored afterwards.
    """

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch * 100_003 + int(index)) % (2**32)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            try:
                return self.dataset[int(index)]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """Shuffles `num_samples` indices with a permutation that depends only on `(seed, epoch)`.

    Call `set_epoch` before iterating an epoch. Unlike `RandomSampler`, nothing here reads the global RNG, so the
    order of an epoch is the same in a resumed run.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def num_update_steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer updates in one epoch of `num_batches` batches (a trailing partial accumulation counts as one)."""
    return math.ceil(num_batches / gradient_accumulation_steps)


def batches_per_process(
    num_batches: int,
    num_processes: int,
    split_batches: bool = False,
    drop_last: bool = False,
    even_batches: bool = True,
) -> int:
    """The batches of one epoch that each process iterates once accelerate has sharded a loader of `num_batches`.

    accelerate's `BatchSamplerShard` deals whole batches out to the processes in turn; with `even_batches` (its
    default) the last round is completed by batches from the start, so every process sees
    `ceil(num_batches / num_processes)`; `drop_last` drops the incomplete round instead; `split_batches` splits each
    batch across the processes and keeps their number.

    Args:
        num_batches: `len(dataloader)` before `accelerator.prepare`.
        num_processes: `accelerator.num_processes`.
        split_batches: `accelerator.split_batches`.
        drop_last: The loader's `drop_last`.
        even_batches: `accelerator.even_batches`.

    Raises:
        ValueError: Without `even_batches`, when the processes would see different numbers of batches (their
            optimizer steps would no longer match).
    """
    if split_batches or num_processes == 1:
        return num_batches
    if num_batches % num_processes == 0 or drop_last:
        return num_batches // num_processes
    if not even_batches:
        raise ValueError(
            f"{num_batches} batches do not divide among {num_processes} processes and even_batches is off: the"
            " processes would take different numbers of optimizer steps. Keep accelerate's even_batches=True."
        )
    return math.ceil(num_batches / num_processes)


@dataclass(frozen=True)
class TrainingSchedule:
    """Every count that follows from the training data loader, computed once for the loader as each process will
    iterate it after `accelerator.prepare` (sharded across the processes).

    The steps per epoch, the number of optimizer steps and epochs, the learning-rate schedule's length and warm-up,
    the position to resume at and the run summary all come from here, so that they agree with each other and with
    what the loop does under any number of processes and gradient accumulation.

    Attributes:
        num_processes: Data-parallel processes.
        batches_per_epoch: Batches each process iterates per epoch.
        gradient_accumulation_steps: Batches per optimizer step.
        updates_per_epoch: Optimizer steps per epoch (a trailing partial accumulation is one: accelerate syncs
            gradients at the end of the loader).
        max_train_steps: Optimizer steps of the whole run.
        num_train_epochs: Epochs the loop starts (the last one may stop early at `max_train_steps`).
        num_warmup_steps: Learning-rate warm-up, in optimizer steps.
        scheduler_steps_per_update: How often accelerate's prepared scheduler steps per optimizer step:
            `num_processes` (it assumes the loader's batch grew with the processes), 1 with `split_batches`.
    """

    num_processes: int
    batches_per_epoch: int
    gradient_accumulation_steps: int
    updates_per_epoch: int
    max_train_steps: int
    num_train_epochs: int
    num_warmup_steps: int
    scheduler_steps_per_update: int

    @classmethod
    def compute(
        cls,
        num_batches: int,
        num_processes: int = 1,
        gradient_accumulation_steps: int = 1,
        num_train_epochs: int | None = None,
        max_train_steps: int | None = None,
        num_warmup_steps: int = 0,
        split_batches: bool = False,
        drop_last: bool = False,
        even_batches: bool = True,
    ) -> TrainingSchedule:
        """The schedule of a loader of `num_batches` batches (before sharding) trained by `num_processes`.

        Args:
            num_batches: `len(dataloader)` before `accelerator.prepare`.
            num_processes: `accelerator.num_processes`.
            gradient_accumulation_steps: `--gradient_accumulation_steps`.
            num_train_epochs: `--num_train_epochs`; ignored when `max_train_steps` is given.
            max_train_steps: `--max_train_steps`, or None to train `num_train_epochs` whole epochs.
            num_warmup_steps: `--lr_warmup_steps` / `--num_warmup_steps`, in optimizer steps.
            split_batches: `accelerator.split_batches` (see `batches_per_process`).
            drop_last: The loader's `drop_last`.
            even_batches: `accelerator.even_batches`.

        Raises:
            ValueError: If the loader yields no batch, or neither `num_train_epochs` nor `max_train_steps` is given.
        """
        if num_batches < 1:
            raise ValueError(
                "The training data yields no batch: add data, or lower --train_batch_size / "
                "--per_device_train_batch_size."
            )
        if max_train_steps is None and num_train_epochs is None:
            raise ValueError("Pass --num_train_epochs or --max_train_steps.")
        batches_per_epoch = batches_per_process(num_batches, num_processes, split_batches, drop_last, even_batches)
        updates_per_epoch = num_update_steps_per_epoch(batches_per_epoch, gradient_accumulation_steps)
        if max_train_steps is None:
            max_train_steps = num_train_epochs * updates_per_epoch
        return cls(
            num_processes=num_processes,
            batches_per_epoch=batches_per_epoch,
            gradient_accumulation_steps=gradient_accumulation_steps,
            updates_per_epoch=updates_per_epoch,
            max_train_steps=max_train_steps,
            num_train_epochs=math.ceil(max_train_steps / updates_per_epoch),
            num_warmup_steps=num_warmup_steps,
            scheduler_steps_per_update=1 if split_batches else num_processes,
        )

    @classmethod
    def for_dataloader(cls, dataloader, accelerator, **counts) -> TrainingSchedule:
        """`compute` for `dataloader` (not yet prepared) as `accelerator` will shard it.

        Args:
            dataloader: The training `DataLoader`, before `accelerator.prepare`.
            accelerator: The run's `Accelerator`.
            **counts: `gradient_accumulation_steps`, `num_train_epochs`, `max_train_steps`, `num_warmup_steps`.
        """
        return cls.compute(
            len(dataloader),
            num_processes=accelerator.num_processes,
            split_batches=accelerator.split_batches,
            drop_last=bool(getattr(dataloader, "drop_last", False)),
            even_batches=accelerator.even_batches,
            **counts,
        )

    def check_prepared(self, prepared_dataloader) -> None:
        """Checks that the prepared loader yields the batches per epoch this schedule was computed for.

        Raises:
            RuntimeError: If accelerate sharded the loader otherwise (every count would be wrong).
        """
        if len(prepared_dataloader) != self.batches_per_epoch:
            raise RuntimeError(
                f"The prepared training loader yields {len(prepared_dataloader)} batches per process and epoch; the"
                f" schedule was computed for {self.batches_per_epoch} ({self})."
            )

    @property
    def total_scheduler_steps(self) -> int:
        """The learning-rate schedule's length in scheduler steps: it ends exactly at the last optimizer step."""
        return self.max_train_steps * self.scheduler_steps_per_update

    @property
    def warmup_scheduler_steps(self) -> int:
        """The warm-up in scheduler steps."""
        return self.num_warmup_steps * self.scheduler_steps_per_update

    def create_lr_scheduler(self, name: str, optimizer):
        """diffusers' `get_scheduler(name)` over this schedule, to be passed to `accelerator.prepare` (whose
        scheduler then steps `scheduler_steps_per_update` times per optimizer step)."""
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            str(name),
            optimizer=optimizer,
            num_warmup_steps=self.warmup_scheduler_steps,
            num_training_steps=self.total_scheduler_steps,
        )

    def resume_position(self, global_step: int) -> tuple[int, int]:
        """Where a run resumed after `global_step` optimizer steps continues.

        Returns:
            `(epoch, batches_to_skip)`: the epoch to start at and the batches of it already trained.
        """
        epoch, updates_into_epoch = divmod(global_step, self.updates_per_epoch)
        return epoch, updates_into_epoch * self.gradient_accumulation_steps

    def total_batch_size(self, per_device_batch_size: int) -> int:
        """Samples per optimizer step over all processes and accumulated batches."""
        return per_device_batch_size * self.num_processes * self.gradient_accumulation_steps


def checkpoint_dir(output_dir: str | os.PathLike, global_step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{global_step}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first.

    A checkpoint is complete when its directory has its final name and holds `training_state.json` (written last);
    a save that was killed leaves a `.partial` directory, which is ignored.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / TRAINING_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: `latest` picks the newest complete one in `output_dir` (None if there is none:
    a fresh run starts); any other value must be an existing checkpoint directory.

    Raises:
        ValueError: If an explicit path does not exist or is not a complete checkpoint.
    """
    if not resume_from_checkpoint:
        earlier = list_checkpoints(output_dir)
        if earlier:
            logger.warning(
                f"{output_dir} already holds checkpoints of an earlier run ({earlier[0].name} ... {earlier[-1].name})."
                " This new run writes its own beside them (replacing any of the same step), and a later"
                " --resume_from_checkpoint latest picks the newest of either. To continue that run pass"
                " --resume_from_checkpoint latest; to start afresh use another --output_dir."
            )
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run.")
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / resume_from_checkpoint).is_dir():
        path = Path(output_dir) / resume_from_checkpoint  # upstream accepts a bare "checkpoint-N" name
    if not (path / TRAINING_STATE_NAME).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint directory "
            f"(expected {path / TRAINING_STATE_NAME}). Use 'latest' or one of: "
            f"{[str(p) for p in list_checkpoints(output_dir)] or 'none found'}."
        )
    return path


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Deletes the oldest complete checkpoints so that at most `total_limit` remain. Returns what was removed."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) - total_limit
    removed = checkpoints[: max(excess, 0)]
    if removed:
        logger.info(f"{len(checkpoints)} checkpoints exist; removing {len(removed)}: {[p.name for p in removed]}")
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_checkpoint(
    accelerator, output_dir, global_step: int, training_state: dict, total_limit=None, trainable=()
) -> Path:
    """Saves the accelerate state (adapter weights through the registered hooks, optimizer, scheduler, RNG) atomically.

    The state is written to `checkpoint-N.partial` and renamed to `checkpoint-N` only once `training_state.json` is
    in it, so a process killed mid-save leaves the previous checkpoints intact and no half-written one that
    `--resume_from_checkpoint latest` would pick. Old checkpoints beyond `total_limit` are deleted only after the
    new one is complete (upstream deletes them first, so a kill during the save can leave none).

    Args:
        trainable: The adapter parameters: a checkpoint holding NaN or inf is refused (`check_finite_weights`).

    Returns:
        The final checkpoint directory.
    """
    check_finite_weights(trainable, global_step, output_dir)
    final_dir = checkpoint_dir(output_dir, global_step)
    partial_dir = final_dir.with_name(final_dir.name + _PARTIAL_SUFFIX)
    if accelerator.is_main_process:
        shutil.rmtree(partial_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial_dir))
    # Every process writes its own RNG state into the directory: rename it only once all of them have.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = dict(training_state, global_step=global_step)
        (partial_dir / TRAINING_STATE_NAME).write_text(json.dumps(state, indent=2))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(partial_dir, final_dir)
        logger.info(f"Saved state to {final_dir}")
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final_dir


def push_to_hub(output_dir, hub_model_id: str | None, hub_token: str | None, logging_dir: str = "logs") -> str:
    """Uploads `output_dir` to the Hub as upstream's `--push_to_hub` does: without checkpoints and TensorBoard logs.

    Args:
        output_dir: The run's output directory.
        hub_model_id: The repository (`user/name`); None: the output directory's name under the token's user.
        hub_token: A token, or None for the one `huggingface-cli login` stored.
        logging_dir: The TensorBoard directory inside `output_dir`, left out.

    Returns:
        The repository id.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token)
    repo_id = api.create_repo(hub_model_id or Path(output_dir).absolute().name, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        ignore_patterns=[f"{CHECKPOINT_PREFIX}-*", f"*{_PARTIAL_SUFFIX}", f"{logging_dir}/*"],
    )
    logger.info(f"Uploaded {output_dir} to https://huggingface.co/{repo_id}")
    return repo_id


def read_training_state(path: str | os.PathLike) -> dict:
    """The `training_state.json` of a checkpoint (global step, seed, ...)."""
    return json.loads((Path(path) / TRAINING_STATE_NAME).read_text())


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restores the accelerate state from `path` and returns its `training_state.json`."""
    accelerator.load_state(str(path))
    return read_training_state(path)


def register_adapter_checkpoint_hooks(accelerator, save_adapter_to, load_adapter_from) -> None:
    """Makes `accelerator.save_state` / `load_state` hold only the adapter weights, not the frozen base.

    Args:
        accelerator: The run's `Accelerator`.
        save_adapter_to: Called with the checkpoint directory on the main process; writes the adapter weights.
        load_adapter_from: Called with the checkpoint directory on every process; loads them back in place.
    """

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_adapter_to(output_dir)
        weights.clear()  # accelerate would otherwise write every prepared model's full state dict

    def load_model_hook(models, input_dir):
        models.clear()
        load_adapter_from(input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def log_run_summary(logger, num_examples: int, batch_size: int, schedule: TrainingSchedule, **extra) -> None:
    """The upstream '***** Running training *****' block, from the run's `TrainingSchedule`, plus our lines.

    Args:
        logger: The recipe's logger.
        num_examples: Training examples (images, token blocks) over all processes.
        batch_size: The batch size per device.
        schedule: The run's schedule.
        **extra: Further `key = value` lines (adapter, quantization, ...).
    """
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {num_examples}")
    logger.info(f"  Num Epochs = {schedule.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {batch_size}")
    logger.info(
        f"  Total train batch size (w. parallel, distributed & accumulation) = {schedule.total_batch_size(batch_size)}"
    )
    logger.info(f"  Gradient Accumulation steps = {schedule.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {schedule.max_train_steps}")
    logger.info(f"  Batches per process and epoch = {schedule.batches_per_epoch}")
    logger.info(f"  Optimization steps per epoch = {schedule.updates_per_epoch}")
    for key, value in extra.items():
        logger.info(f"  {key} = {value}")


# `--optimizer` names -> bitsandbytes optimizer classes (None: torch's AdamW). Paged optimizers keep their state in
# CUDA unified memory, which the driver pages to host RAM under pressure; they need a CUDA device.
OPTIMIZERS = {
    "adamw": None,
    "adamw8bit": "AdamW8bit",
    "paged_adamw8bit": "PagedAdamW8bit",
    "paged_adamw32bit": "PagedAdamW32bit",
    "lion8bit": "Lion8bit",
}
# What a paged optimizer becomes where nothing can be paged: the same update with its state in ordinary memory.
UNPAGED_OPTIMIZERS = {"PagedAdamW8bit": "AdamW8bit", "PagedAdamW32bit": "AdamW32bit"}


def optimizer_class_name(name: str, device: torch.device | str) -> str | None:
    """The bitsandbytes optimizer class that runs `--optimizer name` on `device` (None: torch's AdamW).

    A paged optimizer falls back, with one warning, to its unpaged twin off CUDA.

    Args:
        name: A key of `OPTIMIZERS`.
        device: Where the trained parameters live.
    """
    class_name = OPTIMIZERS[name]
    if class_name in UNPAGED_OPTIMIZERS and torch.device(device).type != "cuda":
        fallback = UNPAGED_OPTIMIZERS[class_name]
        logger.warning(
            f"--optimizer {name}: paging optimizer state needs CUDA unified memory, which {torch.device(device)} "
            f"does not have; using bitsandbytes' unpaged {fallback} (the same update and the same state bytes)."
        )
        return fallback
    return class_name


def create_optimizer(param_groups, name: str, learning_rate, weight_decay, betas=None, eps=None, device="cpu"):
    """The optimizer that `--optimizer name` asks for, over `param_groups`.

    Args:
        param_groups: Parameters or parameter groups, as torch optimizers take them.
        name: A key of `OPTIMIZERS` (`adamw8bit` is upstream's `--use_8bit_adam`).
        learning_rate: The default learning rate of the groups.
        weight_decay: Decoupled weight decay.
        betas: `(beta1, beta2)`, for Lion its interpolation and momentum; None keeps the optimizer's default.
        eps: Adam's epsilon (Lion has none); None keeps the optimizer's default.
        device: Where the parameters live; paged optimizers fall back to unpaged ones off CUDA.

    Returns:
        A torch or bitsandbytes optimizer.
    """
    options = {"lr": learning_rate, "weight_decay": weight_decay}
    if betas is not None:
        options["betas"] = tuple(betas)
    class_name = optimizer_class_name(name, device)
    if eps is not None and not (class_name or "").startswith("Lion"):
        options["eps"] = eps
    if class_name is None:
        return torch.optim.AdamW(param_groups, **options)
    import bitsandbytes as bnb

    return getattr(bnb.optim, class_name)(param_groups, **options)


def trainable_parameters(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require gradients, each once, over several modules."""
    seen, params = set(), []
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    return params


def find_nonfinite(tensors) -> bool:
    """True when any tensor holds NaN or inf."""
    return any(not torch.isfinite(t).all() for t in tensors)


def write_json(path: str | os.PathLike, values: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(values, indent=2, default=str))
    return path


def configure_logging(accelerator) -> None:
    """Upstream's logging set-up: INFO on the main process, errors only elsewhere, for us and the HF libraries."""
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        logging.getLogger("diffusers_lowmem").setLevel(logging.ERROR)
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def tracker_config(args) -> dict:
    """The run's arguments as tracker hyper-parameters (TensorBoard accepts only scalars and strings)."""
    config = {}
    for key, value in vars(args).items():
        if isinstance(value, (int, float, str, bool)):
            config[key] = value
        elif value is not None:
            config[key] = str(value)
    return config


def elapsed_since(started: float, device) -> float:
    """Seconds since `started` (a `time.perf_counter()` value), after the device's queued work has finished."""
    import time

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------------------------
# Reliability: stop signals, non-finite losses, out-of-memory
# --------------------------------------------------------------------------------------------------------------------


class StopSignals:
    """Turns SIGTERM and SIGINT into a request that the training loop honours at the next optimizer step.

    Use as a context manager around the loop; the previous handlers come back on exit. The loop saves a checkpoint
    and ends cleanly instead of dying mid-step (preemptible machines send SIGTERM before they kill).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        logger.warning(f"Received {self.received}: stopping after this step with a checkpoint.")

    def requested(self, accelerator) -> bool:
        """Whether any process received a stop signal (every process must call this at the same step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def loss_is_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (all processes skip or stop together)."""
    flag = torch.isfinite(loss.detach().float()).all().float().reshape(1)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def nonfinite_loss_error(loss: torch.Tensor, global_step: int, output_dir) -> NonFiniteLossError:
    """The error to raise for a non-finite loss at update `global_step + 1`."""
    checkpoints = list_checkpoints(output_dir)
    last_good = str(checkpoints[-1]) if checkpoints else "none yet"
    return NonFiniteLossError(
        f"The loss is {loss.detach().float().item()} at step {global_step + 1}. Last good checkpoint: {last_good}. "
        "Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or pass --skip_nonfinite_loss to skip "
        "such steps."
    )


def check_finite_weights(parameters, global_step: int, output_dir) -> None:
    """Refuses to save an adapter holding NaN or inf (a finite loss can still end in such an update).

    Raises:
        NonFiniteLossError: Naming the step and the last good checkpoint; nothing is saved.
    """
    if not find_nonfinite(parameter.detach() for parameter in parameters):
        return
    checkpoints = list_checkpoints(output_dir)
    last_good = str(checkpoints[-1]) if checkpoints else "none yet"
    raise NonFiniteLossError(
        f"The adapter weights hold NaN or inf after step {global_step}; they were not saved. Last good checkpoint:"
        f" {last_good}. Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or lower --max_grad_norm."
    )


def out_of_memory_message(peak_bytes: int | None, device, text_to_image: bool) -> str:
    """What to tell a user whose run ran out of device memory (host memory for a CPU run)."""
    peak = f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes else "unknown"
    measure = "peak allocated" if torch.device(device).type == "cuda" else "peak RSS"
    hints = ["--gradient_checkpointing", "--quant nf4", "a smaller --train_batch_size or --resolution"]
    if text_to_image:
        hints.append("--cache_latents")
    else:
        hints[2] = "a smaller --per_device_train_batch_size or --block_size"
    return (
        f"Out of memory on {device} ({measure} {peak}); memory_report.json holds the memory up to this point. "
        f"Try {', '.join(hints)}."
    )


def is_host_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's CPU allocator failing (a `RuntimeError`, where CUDA raises `OutOfMemoryError`)."""
    return "DefaultCPUAllocator: can't allocate memory" in str(error)


@contextmanager
def out_of_memory_guard(tracker, output_dir, text_to_image: bool):
    """Turns an out-of-memory error (CUDA, or the host's on a CPU run) into the memory report so far and a message
    that says what to try.

    Raises:
        SystemExit: With the message (exit status 1) after an out-of-memory error.
    """
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not is_host_out_of_memory(error):
            raise
        if torch.device(tracker.device).type == "cuda":
            peak = torch.cuda.max_memory_allocated(tracker.device)
            torch.cuda.empty_cache()
        else:
            peak = memory.host_memory()["peak_rss"]
        tracker.write_report(output_dir, extra={"out_of_memory": str(error).splitlines()[0]})
        message = out_of_memory_message(peak, tracker.device, text_to_image)
        logger.error(message)
        raise SystemExit(message) from error


def stop_with_checkpoint(
    accelerator, tracker, output_dir, global_step: int, training_state: dict, total_limit, by, trainable=()
):
    """Ends a run stopped by a signal: a checkpoint of the current step (unless one exists), the memory report, and
    a message that names the checkpoint. Call on every process.

    Returns:
        The checkpoint directory.
    """
    path = checkpoint_dir(output_dir, global_step)
    if path not in list_checkpoints(output_dir):
        path = save_checkpoint(accelerator, output_dir, global_step, training_state, total_limit, trainable)
    if accelerator.is_main_process:
        tracker.write_report(output_dir)
    logger.info(f"Stopped by {by} at step {global_step}; saved {path}. Continue with --resume_from_checkpoint latest.")
    end_training(accelerator)
    return path


def end_training(accelerator) -> None:
    """`accelerator.end_training()` once every process has got there. Call on every process.

    Its `destroy_process_group` can hang a process whose peers destroyed the group while it was still writing the
    main process's files (pytorch/pytorch#75097); a barrier first makes the processes tear the group down together.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()


def verify_identical_across_processes(accelerator, parameters) -> float:
    """Checks that the trained parameters are the same on every process (data-parallel replicas must not drift).

    Each process reduces its parameters to a float64 fingerprint (weighted sums that differ when any value
    differs in practice); the fingerprints are gathered and compared. Call on every process.

    Returns:
        The fingerprint.

    Raises:
        RuntimeError: If two processes hold different parameters.
    """
    fingerprint = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for index, parameter in enumerate(parameters):
        values = parameter.detach().to(torch.float64)
        fingerprint += (index + 1) * values.sum() + values.square().sum()
    gathered = accelerator.gather(fingerprint.reshape(1))
    if not torch.all(gathered == gathered[0]):
        raise RuntimeError(f"The adapters differ between processes after training (fingerprints {gathered.tolist()}).")
    if accelerator.num_processes > 1:
        logger.info(
            f"Adapter weights identical on all {accelerator.num_processes} processes ({fingerprint.item():.9e})."
        )
    return float(fingerprint.item())
