"""Deterministic held-out evaluation: the same examples, noise and timesteps in every run.

Two runs that differ only in adapter, quantization or optimizer then measure their fit on exactly the same
problem, so their held-out losses compare directly. Nothing here depends on the run's `--seed`, and the global RNG
states are never touched (the training loop's reproducibility does not change when evaluation is switched on).

    train_rows, held_out_rows = held_out_split(len(dataset), 0.1)
    eval_set = DiffusionEvalSet.build(items, batch_size=4, num_train_timesteps=1000)
    loss = diffusion_held_out_loss(eval_set, predict, noise_scheduler)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

EVAL_SEED = 0  # the split, the noise and the caption choice; fixed, so every run evaluates the same problem
NUM_EVAL_TIMESTEPS = 8  # each held-out image is noised at this many timesteps, spread over the whole schedule


def held_out_split(num_examples: int, fraction: float, seed: int = EVAL_SEED) -> tuple[list[int], list[int]]:
    """Splits `range(num_examples)` into training and held-out indices by a fixed permutation.

    Args:
        num_examples: Size of the dataset.
        fraction: Share held out, in (0, 1); rounded up to whole examples.
        seed: Seed of the permutation; the default keeps the split the same whatever the run's seed.

    Returns:
        `(train_indices, held_out_indices)`, each sorted.

    Raises:
        ValueError: The fraction is outside (0, 1), or the dataset is too small to keep an example on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction {fraction} must be in (0, 1)")
    held_out_count = math.ceil(num_examples * fraction)
    if held_out_count >= num_examples:
        raise ValueError(
            f"holding out {fraction:.0%} of {num_examples} example(s) leaves none to train on; use a smaller fraction"
        )
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held_out_count:]), sorted(order[:held_out_count])


def eval_timesteps(num_train_timesteps: int, count: int = NUM_EVAL_TIMESTEPS) -> torch.Tensor:
    """`count` timesteps at the midpoints of equal strata of `[0, num_train_timesteps)`: every noise level, no draw."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()


@dataclass
class DiffusionEvalSet:
    """Held-out batches with their latents, and the noise that each gets at each evaluation timestep.

    Attributes:
        batches: Collated batches; each holds `latents` (fp32, on the CPU) and whatever the conditioning needs
            (token ids, or cached text-encoder outputs, SDXL's size conditioning).
        noise: One tensor per batch, `(len(timesteps), *latents.shape)`, fixed for the life of the set.
        timesteps: The evaluation timesteps, shared by every example.
    """

    batches: list[dict]
    noise: list[torch.Tensor]
    timesteps: torch.Tensor

    @classmethod
    def build(
        cls,
        items: Sequence[dict],
        batch_size: int,
        num_train_timesteps: int,
        collate_fn: Callable[[list[dict]], dict],
        num_timesteps: int = NUM_EVAL_TIMESTEPS,
        seed: int = EVAL_SEED,
    ) -> DiffusionEvalSet:
        """Batches `items` (each with `latents`) in order and draws their noise once from a generator of its own.

        Args:
            items: Held-out examples, each a dict with a `latents` tensor.
            batch_size: Examples per evaluation batch.
            num_train_timesteps: Length of the noise schedule.
            collate_fn: Stacks a list of items into a batch.
            num_timesteps: Evaluation timesteps per example.
            seed: Seed of the noise.
        """
        if not items:
            raise ValueError("a held-out evaluation needs at least one example")
        generator = torch.Generator().manual_seed(seed)
        batches, noise = [], []
        for start in range(0, len(items), batch_size):
            batch = collate_fn(list(items[start : start + batch_size]))
            batch["latents"] = batch["latents"].float()
            batches.append(batch)
            shape = (num_timesteps, *batch["latents"].shape)
            noise.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        return cls(batches, noise, eval_timesteps(num_train_timesteps, num_timesteps))

    @property
    def num_examples(self) -> int:
        return sum(len(batch["latents"]) for batch in self.batches)


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unknown prediction type {prediction_type}")


@torch.no_grad()
def diffusion_held_out_loss(
    eval_set: DiffusionEvalSet,
    predict: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor],
    noise_scheduler,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """Mean squared error of the model's prediction over every held-out example and evaluation timestep.

    The plain objective, unweighted: no SNR weighting and no noise offset, whatever the training uses, so that the
    number means the same in every run.

    Args:
        eval_set: The held-out examples and their fixed noise.
        predict: `predict(batch, noisy_latents, timesteps)` -> the model's prediction, shaped like the latents.
        noise_scheduler: The training noise scheduler (its `add_noise`, prediction type and velocity).
        device: Where the latents go for the model.
        dtype: The dtype of the latents the model receives (the training's weight dtype).

    Returns:
        The loss, averaged over examples and timesteps with equal weight.
    """
    total, count = 0.0, 0
    for batch, batch_noise in zip(eval_set.batches, eval_set.noise):
        latents = batch["latents"].to(device)
        for noise, timestep in zip(batch_noise, eval_set.timesteps):
            noise = noise.to(device)
            timesteps = timestep.repeat(len(latents)).to(device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            target = diffusion_target(noise_scheduler, latents, noise, timesteps)
            prediction = predict(batch, noisy_latents.to(dtype), timesteps)
            per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
            total += per_example.sum().item()
            count += len(per_example)
    return total / count


# ----------------------------------------------------------------------------------------------------------------
# What quantization alone costs
# ----------------------------------------------------------------------------------------------------------------


def unquantized_loss(models: Sequence[torch.nn.Module], device, compute_loss: Callable[[], float]) -> float | None:
    """`compute_loss()` with the unquantized `models` on `device`, for `eval/quantization_loss_delta`.

    The models visit the device once and go back to the CPU unchanged (their dtype is the one they were loaded in).
    Call it before memory tracking starts, so that the visit is not part of the run's peak.

    Returns:
        The loss, or None, with a warning, when the models do not fit on the device.
    """
    try:
        for model in models:
            model.to(device)
        return compute_loss()
    except torch.OutOfMemoryError:
        logger.warning("The unquantized base does not fit on the device: no eval/quantization_loss_delta this run.")
        return None
    finally:
        for model in models:
            model.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def quantization_scalars(quantized_loss: float, unquantized: float | None, reports: dict) -> dict[str, float]:
    """What quantization alone cost, as tracker scalars: the held-out loss of the quantized base and (when measured)
    of the unquantized one, their difference `eval/quantization_loss_delta`, and each model's mean relative weight
    error (`eval/quantization_weight_error/<role>`) from its quantization report (None for an unquantized model)."""
    scalars = {"eval/quantized_base_loss": quantized_loss}
    if unquantized is not None:
        scalars["eval/unquantized_base_loss"] = unquantized
        scalars["eval/quantization_loss_delta"] = quantized_loss - unquantized
    for role, report in reports.items():
        if report is not None and report.mean_relative_error is not None:
            scalars[f"eval/quantization_weight_error/{role}"] = report.mean_relative_error
    return scalars


def summary_fields(scalars: dict[str, float]) -> dict[str, float]:
    """Tracker scalars as `training_summary.json` keys: the `eval/` prefix dropped."""
    return {key.removeprefix("eval/"): value for key, value in scalars.items()}
