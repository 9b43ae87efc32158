"""Datasets (in memory, an image folder read lazily, token windows over an array or a memory-mapped
token file), the bundle a run loads, and per-head batch streams.

Every head draws its own mini-batches from its own seeded `BatchStream`, so a run is
reproducible whatever process a head lives in. `lte_ray.data` loads these from the sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lte_ray.core.protocol import Task
from lte_ray.errors import UserError


class DataError(UserError):
    """The data the user pointed at cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data."""

    task: Task
    num_classes: int = 0
    in_chans: int = 0
    img_size: int = 0
    vocab_size: int = 0


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class ArrayDataset:
    """Images (N, C, H, W) float32 and integer labels, in memory."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


class FolderDataset:
    """A torchvision ImageFolder (or a subset of one), read lazily."""

    def __init__(self, folder, indices: list[int]):
        self.folder, self.indices = folder, indices

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.folder[self.indices[i]] for i in idx.tolist()]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


class TextDataset:
    """Token windows: item i is tokens[i : i+context] -> tokens[i+1 : i+context+1].

    `tokens` is a 1-D numpy array of unsigned ints in the smallest dtype of the vocabulary: in
    memory, or an np.memmap of a token file (`lte_ray.tokens`), which every process on a node
    shares; only the windows of a batch are copied, as int64 tensors."""

    def __init__(self, tokens: np.ndarray, context: int):
        if len(tokens) <= context + 1:
            raise DataError(f"data.path: text too short ({len(tokens)} tokens) for model.context={context}")
        self.tokens, self.context = tokens, context
        self._window = np.arange(context + 1)

    def __len__(self) -> int:
        return len(self.tokens) - self.context - 1

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = idx.cpu().numpy()[:, None] + self._window
        windows = torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))
        return windows[:, :-1], windows[:, 1:]

    def eval_indices(self, max_windows: int = 256) -> torch.Tensor:
        """Non-overlapping windows, evenly spread, for a deterministic evaluation."""
        starts = torch.arange(0, len(self), self.context)
        if len(starts) > max_windows:
            starts = starts[torch.linspace(0, len(starts) - 1, max_windows).long()]
        return starts


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    spec: DataSpec
    vocab: list[str] | None = None  # char-level text: index -> character


class BatchStream:
    """An endless stream of index batches with its own generator: epochs of random
    permutations for images, random offsets for text (as nanoGPT does)."""

    def __init__(self, n: int, batch_size: int, seed: int, with_replacement: bool = False):
        self.n, self.batch_size, self.with_replacement = n, batch_size, with_replacement
        self.gen = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if self.with_replacement:
            return torch.randint(self.n, (self.batch_size,), generator=self.gen)
        while len(self._perm) < self.batch_size:
            self._perm = torch.cat([self._perm, torch.randperm(self.n, generator=self.gen)])
        idx, self._perm = self._perm[: self.batch_size], self._perm[self.batch_size:]
        return idx


def batch_stream(data: DataBundle, batch_size: int, seed: int) -> BatchStream:
    return BatchStream(len(data.train), batch_size, seed, with_replacement=data.spec.task == "lm")
