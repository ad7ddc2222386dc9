"""Batches that keep groups of related items together (hard negatives in every batch)."""
from __future__ import annotations

import random
from typing import Dict, Iterator, List, Sequence

from torch.utils.data import Sampler


class GroupedBatchSampler(Sampler[List[int]]):
    """Each epoch: shuffle the groups, shuffle inside each group, lay the groups end to end
    and cut fixed-size batches (the last partial batch is dropped). Items of a group (e.g. a
    minimal-pair family of images with all their captions) thus share batches, so in-batch
    negatives include their look-alikes. Deterministic in ``seed``; a new order each epoch.
    With ``num_replicas > 1`` rank ``r`` takes every ``num_replicas``-th batch.
    """

    def __init__(self, groups: Sequence, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        by_group: Dict = {}
        for index, group in enumerate(groups):
            by_group.setdefault(group, []).append(index)
        self.groups = list(by_group.values())
        self.batch_size = int(batch_size)
        self.seed, self.epoch = int(seed), 0
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.total = sum(len(g) for g in self.groups)

    def __len__(self) -> int:
        return (self.total // self.batch_size) // self.num_replicas

    def __iter__(self) -> Iterator[List[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = [list(g) for g in self.groups]
        rng.shuffle(order)
        flat: List[int] = []
        for group in order:
            rng.shuffle(group)
            flat.extend(group)
        batches = [flat[i : i + self.batch_size] for i in range(0, len(flat) - self.batch_size + 1, self.batch_size)]
        yield from batches[self.rank :: self.num_replicas][: len(self)]
