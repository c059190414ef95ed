"""`training.TrainingSchedule`: every count derived from the data loader, for the loader as accelerate shards it.

The batches per process are checked against accelerate's own sharded loaders; the optimizer steps, epochs and
resume positions against a replay of the training loop over those loaders; the learning rate against diffusers'
schedulers stepped as accelerate's prepared scheduler steps them. Runs with two real processes are in
`test_distributed.py`.
"""

import itertools
import logging
import math

import pytest
import torch
from accelerate.data_loader import prepare_data_loader

from diffusers_lowmem import training

PEAK_LR = 1e-3


def sharded_lengths(num_samples, batch_size, num_processes, drop_last=False, split_batches=False):
    """`len()` of accelerate's loader on every process, for a loader of `num_samples` samples."""
    loader = torch.utils.data.DataLoader(
        list(range(num_samples)),
        sampler=training.EpochShuffleSampler(num_samples, seed=0),
        batch_size=batch_size,
        drop_last=drop_last,
    )
    return [
        len(
            prepare_data_loader(
                loader,
                num_processes=num_processes,
                process_index=index,
                split_batches=split_batches,
                put_on_device=False,
            )
        )
        for index in range(num_processes)
    ]


@pytest.mark.parametrize("num_samples", [1, 2, 3, 7, 8, 9, 187])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("num_processes", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_per_process_is_what_accelerate_gives_each_process(num_samples, batch_size, num_processes, drop_last):
    num_batches = num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)
    if num_batches == 0:
        pytest.skip("no batch at all")
    lengths = sharded_lengths(num_samples, batch_size, num_processes, drop_last)
    assert len(set(lengths)) == 1  # even_batches: every process takes the same number of steps
    assert training.batches_per_process(num_batches, num_processes, drop_last=drop_last) == lengths[0]


@pytest.mark.parametrize("num_samples,num_processes", [(8, 2), (9, 2), (7, 4)])
def test_split_batches_keep_the_number_of_batches(num_samples, num_processes):
    batch_size = num_processes  # split_batches needs a batch size that divides among the processes
    lengths = sharded_lengths(num_samples, batch_size, num_processes, split_batches=True)
    num_batches = math.ceil(num_samples / batch_size)
    assert training.batches_per_process(num_batches, num_processes, split_batches=True) == lengths[0] == num_batches
    schedule = training.TrainingSchedule.compute(num_batches, num_processes, num_train_epochs=1, split_batches=True)
    assert schedule.scheduler_steps_per_update == 1  # accelerate then steps the scheduler once per update


def test_the_issue_example_eight_images_two_processes_two_epochs():
    # torchrun --nproc_per_node 2, 8 images, batch 1, --num_train_epochs 2: each process sees 4 images per epoch.
    schedule = training.TrainingSchedule.compute(8, num_processes=2, num_train_epochs=2)
    assert (schedule.batches_per_epoch, schedule.updates_per_epoch) == (4, 4)
    assert (schedule.max_train_steps, schedule.num_train_epochs) == (8, 2)
    assert (schedule.total_scheduler_steps, schedule.scheduler_steps_per_update) == (16, 2)


def replay(schedule: training.TrainingSchedule, first_epoch=0, resume_batch=0, global_step=0):
    """The recipes' loop over one process's batches, with accelerate's accumulation rule (gradients sync every
    `gradient_accumulation_steps` batches and at the end of the loader).

    Returns:
        `(position after each optimizer step as (global_step, epoch, next batch), epochs entered)`.
    """
    positions, epochs_entered = [], []
    for epoch in range(first_epoch, schedule.num_train_epochs):
        if global_step >= schedule.max_train_steps:
            break
        epochs_entered.append(epoch)
        start = resume_batch if epoch == first_epoch else 0
        for batch_index in range(start, schedule.batches_per_epoch):
            accumulated = batch_index - start + 1
            end_of_loader = batch_index == schedule.batches_per_epoch - 1
            if accumulated % schedule.gradient_accumulation_steps and not end_of_loader:
                continue
            global_step += 1
            positions.append((global_step, epoch, batch_index + 1))
            if global_step >= schedule.max_train_steps:
                break
    return positions, epochs_entered


SCHEDULE_CASES = [
    # (batches before sharding, processes, accumulation, --num_train_epochs, --max_train_steps, warm-up)
    *itertools.product([1, 5, 8, 9, 24], [1, 2, 3], [1, 2, 3], [1, 2, 3], [None], [0, 1]),
    *itertools.product([5, 8, 9, 24], [1, 2], [1, 3], [1], [1, 3, 4, 7, 20], [0, 2]),
]


@pytest.mark.parametrize("num_batches,num_processes,accumulation,epochs,max_steps,warmup", SCHEDULE_CASES)
def test_the_loop_takes_exactly_the_scheduled_steps_and_epochs(
    num_batches, num_processes, accumulation, epochs, max_steps, warmup
):
    schedule = training.TrainingSchedule.compute(
        num_batches, num_processes, accumulation, num_train_epochs=epochs, max_train_steps=max_steps
    )
    positions, epochs_entered = replay(schedule)
    assert len(positions) == schedule.max_train_steps
    assert epochs_entered == list(range(schedule.num_train_epochs))  # every epoch started trains, none is empty
    if max_steps is None:
        assert schedule.max_train_steps == epochs * math.ceil(math.ceil(num_batches / num_processes) / accumulation)
        assert schedule.num_train_epochs == epochs
    else:
        assert schedule.max_train_steps == max_steps
    # Resumed after any step, the loop continues at the same batch and reaches the same end.
    for global_step, epoch, next_batch in positions[:-1]:
        first_epoch, resume_batch = schedule.resume_position(global_step)
        if next_batch == schedule.batches_per_epoch:  # the epoch was complete: the next one starts
            epoch, next_batch = epoch + 1, 0
        assert (first_epoch, resume_batch) == (epoch, next_batch)
        resumed, _ = replay(schedule, first_epoch, resume_batch, global_step)
        assert resumed == positions[global_step:]


def learning_rates(schedule: training.TrainingSchedule, name: str) -> list[float]:
    """The learning rate after each optimizer step, with the scheduler stepped as accelerate's prepared scheduler
    steps it: `scheduler_steps_per_update` times per optimizer step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK_LR)
    scheduler = schedule.create_lr_scheduler(name, optimizer)
    rates = []
    for _ in range(schedule.max_train_steps):
        optimizer.step()
        for _ in range(schedule.scheduler_steps_per_update):
            scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    return rates


@pytest.mark.parametrize("num_batches,num_processes,accumulation,epochs,max_steps,warmup", SCHEDULE_CASES[::3])
@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_the_decay_ends_at_the_last_step_and_the_warmup_at_its_step(
    num_batches, num_processes, accumulation, epochs, max_steps, warmup, name
):
    schedule = training.TrainingSchedule.compute(
        num_batches, num_processes, accumulation, epochs, max_steps, num_warmup_steps=warmup
    )
    rates = learning_rates(schedule, name)
    if warmup < schedule.max_train_steps:  # else the run ends within the warm-up
        assert rates[-1] == pytest.approx(0.0, abs=1e-12)
    if 0 < warmup < schedule.max_train_steps:
        assert rates[warmup - 1] == pytest.approx(PEAK_LR)
        assert max(rates) == pytest.approx(PEAK_LR)
    if warmup == 0 and name == "cosine":
        total = schedule.max_train_steps
        expected = [PEAK_LR * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(1, total + 1)]
        assert rates == pytest.approx(expected, abs=1e-12)


def test_constant_schedules_keep_the_peak():
    schedule = training.TrainingSchedule.compute(9, 2, 2, num_train_epochs=3, num_warmup_steps=2)
    assert learning_rates(schedule, "constant") == pytest.approx([PEAK_LR] * schedule.max_train_steps)
    warm = learning_rates(schedule, "constant_with_warmup")
    assert warm == pytest.approx([PEAK_LR / 2] + [PEAK_LR] * (schedule.max_train_steps - 1))


def test_max_train_steps_zero_trains_no_epoch():
    schedule = training.TrainingSchedule.compute(8, 2, num_train_epochs=3, max_train_steps=0)
    assert (schedule.max_train_steps, schedule.num_train_epochs) == (0, 0)


def test_for_dataloader_reads_the_accelerator_and_check_prepared_compares_lengths():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(list(range(9)), batch_size=2)
    schedule = training.TrainingSchedule.for_dataloader(
        loader, accelerator, gradient_accumulation_steps=2, num_train_epochs=2, num_warmup_steps=1
    )
    assert schedule == training.TrainingSchedule(
        num_processes=1,
        batches_per_epoch=5,
        gradient_accumulation_steps=2,
        updates_per_epoch=3,
        max_train_steps=6,
        num_train_epochs=2,
        num_warmup_steps=1,
        scheduler_steps_per_update=1,
    )
    schedule.check_prepared(accelerator.prepare(loader))
    with pytest.raises(RuntimeError, match="yields 3 batches per process and epoch; the schedule was computed for 5"):
        schedule.check_prepared(torch.utils.data.DataLoader(list(range(6)), batch_size=2))


def test_impossible_schedules_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="yields no batch.*--train_batch_size"):
        training.TrainingSchedule.compute(0, 2, num_train_epochs=1)
    with pytest.raises(ValueError, match="--num_train_epochs or --max_train_steps"):
        training.TrainingSchedule.compute(4, 2)
    with pytest.raises(ValueError, match="9 batches do not divide among 2 processes"):
        training.batches_per_process(9, 2, even_batches=False)
    assert training.batches_per_process(8, 2, even_batches=False) == 4


def test_run_summary_states_the_schedule(caplog):
    schedule = training.TrainingSchedule.compute(9, 2, 2, num_train_epochs=2)
    with caplog.at_level(logging.INFO):
        training.log_run_summary(logging.getLogger("summary"), num_examples=18, batch_size=2, schedule=schedule)
    lines = [record.getMessage().strip() for record in caplog.records]
    assert "Num Epochs = 2" in lines
    assert "Total optimization steps = 6" in lines
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in lines
    assert "Gradient Accumulation steps = 2" in lines
    assert "Batches per process and epoch = 5" in lines
    assert "Optimization steps per epoch = 3" in lines
