"""Which dataset indices each process reads at each micro-batch: a pure function of the seed.

Split out of the training loop so the loop reads top to bottom; resume relies on it being pure.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


class DataOrder:
    """Which dataset indices each process reads at each micro-batch: a pure function of the seed.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``, so the data position is one
    integer (micro-batches consumed) and a resumed run reads exactly what the original would.
    With ``block_ids`` (Pick-a-Pic row groups) the permutation shuffles the blocks and then the
    pairs inside each block, so an epoch reads every row group once instead of once per pair.
    """

    def __init__(self, dataset_size: int, seed: int, block_ids: Tensor | None = None):
        self.dataset_size = dataset_size
        self.seed = seed
        self.block_ids = None if block_ids is None else torch.as_tensor(block_ids, dtype=torch.long)
        self._cached: tuple[int, Tensor] | None = None

    def epoch_order(self, epoch: int) -> Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            if self.block_ids is None:
                order = torch.randperm(self.dataset_size, generator=generator)
            else:
                num_blocks = int(self.block_ids.max()) + 1
                block_rank = torch.randperm(num_blocks, generator=generator)[self.block_ids]
                within = torch.rand(self.dataset_size, generator=generator, dtype=torch.float64)
                order = torch.argsort(block_rank.double() + within)
            self._cached = (epoch, order)
        return self._cached[1]

    def batch(self, micro_batch: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of process ``rank``'s share of global micro-batch ``micro_batch``."""
        start = (micro_batch * world + rank) * batch_size
        indices = []
        for position in range(start, start + batch_size):
            epoch, offset = divmod(position, self.dataset_size)
            indices.append(int(self.epoch_order(epoch)[offset]))
        return indices


class ResumableBatchSampler(torch.utils.data.Sampler):
    def __init__(self, order: DataOrder, batch_size: int, start: int, rank: int, world: int):
        self.order, self.batch_size, self.start, self.rank, self.world = order, batch_size, start, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        micro_batch = self.start
        while True:
            yield self.order.batch(micro_batch, self.batch_size, self.rank, self.world)
            micro_batch += 1
