"""A worker's endless stream of training batches: the same batches for the same seed, however
they are made.

In-memory data (digits, npz, text, tokens) is indexed directly, one gather per batch. An image
folder decodes and resizes every image, which inside the training step would starve a GPU;
there a `torch.utils.data.DataLoader` decodes the next batches in worker processes while the
step runs. Its batch sampler draws the index batches from the worker's seeded `BatchStream`
in the training process, and a DataLoader yields batches in its sampler's order, so the batches
do not depend on the number of loader workers.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from lte_ray.augment import random_shift
from lte_ray.datasets import BatchStream, DataBundle, FolderDataset, batch_stream

Batch = tuple[torch.Tensor, torch.Tensor]


class _IndexBatches:
    """The DataLoader's batch sampler: the stream's index batches, forever."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.stream.next().tolist()


class _FolderItems(Dataset):
    """One decoded (image, label) per index of a `FolderDataset`."""

    def __init__(self, folder: FolderDataset):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.folder.folder[self.folder.indices[i]]


def training_batches(data: DataBundle, batch_size: int, seed: int, workers: int = 0,
                     pin_memory: bool = False, shift: int = 0) -> Iterator[Batch]:
    """Endless (x, y) batches of `data.train` drawn by a stream seeded with `seed`. Image folders
    load through a DataLoader with `workers` processes (0: in this process), in pinned memory
    when `pin_memory` (for asynchronous copies to a GPU). `shift` > 0: each image moves by its
    own random offset of up to that many pixels (`data.augment_shift`, images only)."""
    stream = batch_stream(data, batch_size, seed)
    if isinstance(data.train, FolderDataset):
        loader = DataLoader(_FolderItems(data.train), batch_sampler=_IndexBatches(stream), num_workers=workers,
                            pin_memory=pin_memory, persistent_workers=workers > 0,
                            # its own generator: making an iterator must not draw from torch's global RNG
                            generator=torch.Generator().manual_seed(seed))
        batches: Iterator[Batch] = iter(loader)
    else:
        batches = (data.train.batch(stream.next()) for _ in itertools.count())
    if not shift:
        return batches
    moves = torch.Generator().manual_seed(seed + 1)  # not the stream's: the batches drawn stay the same

    def shifted() -> Iterator[Batch]:
        for x, y in batches:
            moved = random_shift(x, shift, moves)  # a new tensor: pinned again if the loader's batch was
            yield (moved.pin_memory() if x.is_pinned() else moved), y

    return shifted()
