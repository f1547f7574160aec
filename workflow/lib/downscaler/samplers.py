"""Which tiles each data-parallel rank reads: training batches and validation shards.

Both keep every data-parallel rank in step: each rank must run the same number of forwards, or
the collectives inside them (FSDP's all-gathers, ZeRO-3's parameter gathers) wait for a partner
that never comes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """This data-parallel rank's indices: global batches from a per-epoch permutation.

    The permutation depends only on (seed, epoch); global batch k is ``perm[k*B:(k+1)*B]`` and
    rank r takes its contiguous slice of ``B/dp`` samples (the slice ``parallel.shard_batch``
    would take), so every dp size sees the same global batches. ``set_position(epoch, batch)``
    makes the next iteration start after the batches already trained on (mid-epoch resume).
    The last incomplete global batch is dropped so every step has the same size.
    """

    def __init__(self, n: int, global_batch: int, dp_rank: int, dp_size: int, seed: int):
        if global_batch % dp_size:
            raise ValueError(f"config key train.batch_size={global_batch} must be divisible by "
                             f"the data-parallel degree {dp_size} (dp_replicate * dp_shard)")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.dp_rank, self.local_batch = dp_rank, global_batch // dp_size
        self.batches = n // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for k in range(self.start_batch, self.batches):
            start = k * self.global_batch + self.dp_rank * self.local_batch
            yield from perm[start:start + self.local_batch]

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.local_batch


class ValidationShard(Dataset):
    """Every ``dp_size``-th validation tile from ``dp_rank``, padded to the same count on every
    rank: ``ceil(n / dp_size)`` items, each ``(*sample, weight)`` where ``weight`` is 1 for a real
    tile and 0 for a padding copy of tile 0 (it runs the forward, so the collectives pair up, and
    counts for nothing). Any tile count works with any dp size.
    """

    def __init__(self, dataset: Dataset, dp_rank: int, dp_size: int) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("the validation tiles are empty; check split.val in the config")
        self.dataset = dataset
        self.indices = list(range(dp_rank, n, dp_size))
        self.length = math.ceil(n / dp_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple:
        real = i < len(self.indices)
        sample = self.dataset[self.indices[i] if real else 0]
        return (*sample, torch.tensor(1.0 if real else 0.0))
