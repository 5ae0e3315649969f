"""Length-grouped batching (`train.group_by_length`): Trainer's own sampler, lengths from the preflight's counts."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from nvila_ft.data import preflight
from nvila_ft.train.recipe import TrainConfig
from nvila_ft.train.trainer import NvilaTrainer, SupervisedDataset


class NoEncoding:
    """A processor that must not be used: lengths come from `num_tokens`, nothing is encoded to measure them."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("a sample was encoded to measure its length")

    num_tokens = __call__


def trainer_for(lengths: list[int], batch: int, accum: int, grouped: bool) -> NvilaTrainer:
    samples = [{"id": i, "conversations": [], "num_tokens": n} for i, n in enumerate(lengths)]
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             use_cpu=True, report_to=[], seed=0,
                             train_sampling_strategy="group_by_length" if grouped else "random")
    return NvilaTrainer(model=nn.Linear(1, 1), args=args, train_dataset=SupervisedDataset(samples, NoEncoding()))


def padding(order: list[int], lengths: list[int], batch: int) -> int:
    """Pad tokens when batches of `batch` consecutive indices are padded to their longest sample."""
    total = 0
    for i in range(0, len(order), batch):
        chunk = [lengths[j] for j in order[i : i + batch]]
        total += max(chunk) * len(chunk) - sum(chunk)
    return total


def test_batches_group_similar_lengths_and_every_sample_is_seen_once():
    rng = random.Random(0)
    lengths = [rng.randint(300, 4096) for _ in range(403)]  # not a multiple of the batch
    torch.manual_seed(0)
    grouped = trainer_for(lengths, batch=4, accum=2, grouped=True)
    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # one epoch: each sample exactly once
    torch.manual_seed(0)
    shuffled = list(trainer_for(lengths, batch=4, accum=2, grouped=False)._get_train_sampler())
    assert sorted(shuffled) == list(range(len(lengths)))
    assert padding(order, lengths, 4) < 0.2 * padding(shuffled, lengths, 4)
    # The order is fixed by (seed, epoch), so a resumed run sees the same batches; another epoch, another order.
    assert list(trainer_for(lengths, batch=4, accum=2, grouped=True)._get_train_sampler()) == order
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(len(lengths)))


def test_dataset_lengths_are_the_preflight_counts():
    samples = [{"id": i, "conversations": [{"from": "human", "value": "Hi " * (i + 1)},
                                           {"from": "gpt", "value": "Yes."}]} for i in range(5)]
    report = preflight(samples, length_fn=lambda s: 10 * (s["id"] + 1), max_length=1000, progress=False)
    assert [s["num_tokens"] for s in report.ok] == [10, 20, 30, 40, 50]
    assert SupervisedDataset(report.ok, NoEncoding()).lengths == [10, 20, 30, 40, 50]


@pytest.mark.parametrize(("batch", "value", "expected"), [(1, None, False), (2, None, True), (4, False, False),
                                                            (1, True, True)])
def test_group_by_length_default_follows_the_batch_size(batch, value, expected):
    train = TrainConfig(per_device_train_batch_size=batch, group_by_length=value)
    assert train.resolved_group_by_length() is expected
