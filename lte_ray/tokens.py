"""Compact token data for the GPT: `lte-ray data prepare` writes it, the `tokens` source maps it.

nanoGPT's prepare.py layout: DIR/train.bin and DIR/val.bin are raw token arrays in the smallest
unsigned dtype the vocabulary fits, the validation split being the tail of the corpus; DIR/meta.json
says what they hold; with BPE, DIR/tokenizer.json is the Hugging Face byte-level BPE tokenizer
that made them. Training opens the .bin files with np.memmap(mode="r"): the heads of a node all
read the same page-cache pages of the file instead of each holding a copy of the corpus.

The byte and char encodings here are also those of the in-memory `text` sources (`lte_ray.data`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lte_ray.datasets import DataError
from lte_ray.errors import UserError

TOKENIZERS = ("byte", "char", "bpe")
DTYPES = ("uint8", "uint16", "uint32")
DEFAULT_BPE_VOCAB = 1024
_LINES_PER_BATCH = 8192  # lines per encode_batch call: big enough to keep every core busy


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of the vocabulary."""
    for name in DTYPES:
        if vocab_size <= np.iinfo(name).max + 1:
            return np.dtype(name)
    raise UserError(f"vocab_size: {vocab_size} does not fit in 32-bit token ids")


def read_corpus(files: list[str]) -> bytes:
    """The files' bytes, one newline between files."""
    return b"\n".join(Path(f).read_bytes() for f in files)


def byte_tokens(raw: bytes) -> np.ndarray:
    """One uint8 token per byte (a read-only view of `raw`, no copy)."""
    return np.frombuffer(raw, dtype=np.uint8)


def char_tokens(text: str) -> tuple[np.ndarray, list[str]]:
    """One token per character, and the vocabulary: the distinct characters in code point order
    (the order of `sorted(set(text))`), so ids match the older list-based encoding."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(points, return_inverse=True)
    return ids.astype(token_dtype(len(alphabet))), [chr(c) for c in alphabet]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the empirical token distribution: the eval loss of a model that ignores
    context, which a trained language model must beat."""
    counts = np.bincount(tokens, minlength=vocab_size)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


# ---- byte-level BPE (Hugging Face tokenizers, imported only here) ----------------------------

def _hf():
    try:
        import tokenizers
    except ImportError:
        raise UserError("--tokenizer bpe: needs the Hugging Face tokenizers package (pip install tokenizers)") from None
    return tokenizers


def train_bpe(lines: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) trained on `lines`; `vocab_size`
    counts its 256 byte symbols too."""
    hf = _hf()
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    batches = (lines[i:i + _LINES_PER_BATCH] for i in range(0, len(lines), _LINES_PER_BATCH))
    tok.train_from_iterator(batches, trainer, length=len(lines))
    return tok


def load_tokenizer(path: str):
    """A saved Hugging Face tokenizer (tokenizer.json), or a one-line UserError."""
    hf = _hf()
    if not os.path.isfile(path):
        raise UserError(f"--tokenizer-file: {path!r} does not exist")
    try:
        tok = hf.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exceptions with multi-line messages
        reason = (str(e).strip().splitlines() or ["unreadable"])[0]
        raise UserError(f"--tokenizer-file: {path!r} is not a Hugging Face tokenizer: {reason}") from None
    if tok.get_vocab_size() < 1:
        raise UserError(f"--tokenizer-file: {path!r} has an empty vocabulary")
    return tok


def bpe_tokens(tok, lines: list[str]) -> np.ndarray:
    """`lines` (which concatenate to the text) encoded batch by batch; the ids concatenate too."""
    dtype = token_dtype(tok.get_vocab_size())
    parts = []
    for i in range(0, len(lines), _LINES_PER_BATCH):
        encoded = tok.encode_batch_fast(lines[i:i + _LINES_PER_BATCH], add_special_tokens=False)
        parts += [np.asarray(e.ids, dtype=dtype) for e in encoded if e.ids]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


# ---- prepare: text files -> DIR/{train,val}.bin + meta.json ----------------------------------

def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_args(files: list[str], output: str, tokenizer: str, vocab_size: int | None,
                tokenizer_file: str | None, val_fraction: float, force: bool) -> None:
    """Every user mistake that can be found before reading the corpus, as a one-line UserError."""
    if tokenizer not in TOKENIZERS:
        raise UserError(f"--tokenizer: must be one of {', '.join(TOKENIZERS)} (got {tokenizer!r})")
    if tokenizer != "bpe" and (vocab_size is not None or tokenizer_file):
        raise UserError(f"--{'vocab-size' if vocab_size is not None else 'tokenizer-file'}: only for --tokenizer bpe")
    if vocab_size is not None and tokenizer_file:
        raise UserError("--vocab-size: the vocabulary comes from --tokenizer-file; give one or the other")
    if vocab_size is not None and vocab_size <= 256:
        raise UserError(f"--vocab-size: byte-level BPE needs more than its 256 byte symbols (got {vocab_size})")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction: must be between 0 and 1 (got {val_fraction})")
    if not files:
        raise UserError("--input: no text files found")
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"--input: {f!r} {'is not a file' if os.path.exists(f) else 'does not exist'}")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output: {output!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--output: {output!r} exists and is not empty (--force replaces it)")


def _encode(raw: bytes, tokenizer: str, vocab_size: int | None, tok: Any,
            log: Callable[[str], None]) -> tuple[np.ndarray, dict[str, Any], Any]:
    """The corpus as one token array, what meta.json says about its vocabulary, and the BPE tokenizer."""
    if tokenizer == "byte":
        return byte_tokens(raw), {"vocab_size": 256}, None
    text = raw.decode("utf-8", errors="replace")
    if tokenizer == "char":
        tokens, vocab = char_tokens(text)
        return tokens, {"vocab_size": len(vocab), "vocab": vocab}, None
    lines = text.splitlines(keepends=True)  # they concatenate back to the text exactly
    if tok is None:
        vocab_size = vocab_size or DEFAULT_BPE_VOCAB
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size:,}) on {len(lines):,} lines")
        tok = train_bpe(lines, vocab_size)
        if tok.get_vocab_size() < vocab_size:
            log(f"the corpus allowed only {tok.get_vocab_size():,} tokens")
    log(f"encoding {len(lines):,} lines")
    return bpe_tokens(tok, lines), {"vocab_size": tok.get_vocab_size(), "tokenizer_file": "tokenizer.json"}, tok


def prepare(files: list[str], output: str, tokenizer: str, *, vocab_size: int | None = None,
            tokenizer_file: str | None = None, val_fraction: float = 0.1, force: bool = False,
            log: Callable[[str], None] = _stderr, read: Callable[[list[str]], bytes] = read_corpus) -> dict[str, Any]:
    """Tokenize `files` into `output` (train.bin, val.bin, meta.json, tokenizer.json for BPE);
    returns the meta. The folder appears whole or not at all: it is written beside its place
    and renamed into it. `read`: how the files become text (a packaged corpus may hold it inside
    a source file, `lte_ray.corpora`)."""
    _check_args(files, output, tokenizer, vocab_size, tokenizer_file, val_fraction, force)
    tok = load_tokenizer(tokenizer_file) if tokenizer_file else None  # a bad file fails before any work
    raw = read(files)
    log(f"read {len(files)} file{'s' * (len(files) != 1)} ({len(raw):,} bytes)")
    if tok is not None:
        log(f"encoding with {tokenizer_file} (vocab {tok.get_vocab_size():,})")
    tokens, vocab_meta, tok = _encode(raw, tokenizer, vocab_size, tok, log)
    if len(tokens) < 2:
        raise UserError(f"--input: the text holds {len(tokens)} token(s); a train and a val split need 2 or more")
    n_val = min(len(tokens) - 1, max(1, int(len(tokens) * val_fraction)))
    train, val = tokens[:-n_val], tokens[-n_val:]  # contiguous tail: no window spans both splits
    dtype = token_dtype(vocab_meta["vocab_size"])
    meta = {"format": "lte-ray tokens", "tokenizer": tokenizer, **vocab_meta, "dtype": dtype.name,
            "sources": [os.path.abspath(f) for f in files], "source_bytes": len(raw),
            "tokens": {"train": len(train), "val": len(val)}, "val_fraction": val_fraction,
            "unigram_entropy_nats": unigram_entropy(train, vocab_meta["vocab_size"])}
    out = Path(output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "new")
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the renamed folder
    try:
        train.astype(dtype, copy=False).tofile(tmp / "train.bin")
        val.astype(dtype, copy=False).tofile(tmp / "val.bin")
        if tok is not None:
            tok.save(str(tmp / "tokenizer.json"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`, replacing what is there (checked by `_check_args`)."""
    if out.exists():
        old = _sibling(out, "old")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


def _sibling(out: Path, kind: str) -> Path:
    """A fresh hidden name beside `out` (same file system, so renames are atomic)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def summary(output: str, meta: dict[str, Any]) -> str:
    """The one line `lte-ray data prepare` ends with."""
    written = sum(f.stat().st_size for f in Path(output).iterdir() if f.is_file())
    n = meta["tokens"]
    return (f"{output}: train {n['train']:,} tokens, val {n['val']:,} tokens; {meta['tokenizer']} vocab "
            f"{meta['vocab_size']:,} as {meta['dtype']}; unigram entropy {meta['unigram_entropy_nats']:.3f} nats; "
            f"{written:,} bytes written")


# ---- open: DIR -> two read-only memmaps ------------------------------------------------------

@dataclass(frozen=True)
class TokenFiles:
    train: np.ndarray  # np.memmap(mode="r"): file pages, shared by every process that maps them
    val: np.ndarray
    meta: dict[str, Any]


def open_tokens(path: str | list[str] | None) -> TokenFiles:
    """The token folder `path` (of `prepare`), memory-mapped read-only; a one-line DataError if it
    is not one or its meta.json does not match its .bin files."""
    if isinstance(path, list):
        if len(path) != 1:
            raise DataError(f"data.path: data.name=tokens reads one token folder (got {len(path)} paths)")
        path = path[0]
    folder = Path(path or "")
    how = "make one with `lte-ray data prepare`"
    if not (folder / "meta.json").is_file():
        raise DataError(f"data.path: {str(folder)!r} is not a token folder (no meta.json); {how}")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        vocab_size, dtype = int(meta["vocab_size"]), str(meta["dtype"])
        counts = {split: int(meta["tokens"][split]) for split in ("train", "val")}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"data.path: {str(folder / 'meta.json')!r} is not a valid token meta.json ({e!r})") from None
    if dtype not in DTYPES or vocab_size < 1 or vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"data.path: meta.json's dtype {dtype!r} cannot hold vocab_size {vocab_size}")
    arrays = {}
    for split, n in counts.items():
        f = folder / f"{split}.bin"
        if not f.is_file():
            raise DataError(f"data.path: {str(folder)!r} has no {split}.bin; {how}")
        size, want = f.stat().st_size, n * np.dtype(dtype).itemsize
        if size != want or n < 1:
            raise DataError(f"data.path: {str(f)!r} holds {size:,} bytes, but meta.json says {n:,} {dtype} tokens "
                            f"({want:,} bytes)")
        arrays[split] = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
    return TokenFiles(arrays["train"], arrays["val"], meta)
