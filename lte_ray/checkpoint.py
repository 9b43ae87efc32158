"""Files a run leaves on disk, written atomically (temp file, fsync, rename, fsync of the folder):
a crash or power loss never leaves a half-written summary or weights file behind.

The coordinator's checkpoint keeps one generation back: before `checkpoint.safetensors` is
replaced, the current one is renamed to `checkpoint.prev.safetensors`. Reading takes the newest
checkpoint that reads completely (header, metadata, every tensor): the latest, else the previous
one with a warning; when neither reads, a one-line `UserError` names why each did not.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from lte_ray.errors import UserError

log = logging.getLogger("lte_ray.checkpoint")

CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
META_KEY = "lte_ray"
# What resuming reads from the metadata (`run.Run`, `runtime.coordinator`).
REQUIRED_META = ("round", "next_head_id", "counters", "samples_seen", "wall_seconds")


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write: Callable[[str], None], previous: Path | None = None) -> None:
    """Write `path` through `write(tmp)`. With `previous`, an existing `path` is renamed to it first.

    The new data is on disk (fsynced) before any rename, so whichever renames a crash lets through,
    every name holds a complete file: killed before the renames, the old files stand (and a stray
    temp file); between the two renames, only `previous` exists, holding the old latest, which
    readers fall back to; after both, the new latest and the old one as `previous`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # data before the rename, or a crash could leave the new name on empty blocks
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # the renames themselves are durable only once the folder is synced
        _fsync(path.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=float)
            f.write("\n")

    _atomic(Path(path), write)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_weights(path: str | os.PathLike[str], state: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    tensors = _cpu(state)
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_checkpoint(output_dir: str | os.PathLike[str], state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Main weights + replica params, with round, counters, config and MLflow run id in the
    file's metadata: weights and metadata are replaced together, by one rename. The checkpoint
    it replaces becomes `checkpoint.prev.safetensors`."""
    out = Path(output_dir)
    path, tensors = out / CHECKPOINT, _cpu(state)
    metadata = {META_KEY: json.dumps(meta, default=float)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), previous=out / PREVIOUS)
    return path


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]  # empty when read with keep_tensors=False (they were still all read)


class _Unreadable(Exception):
    """Why one checkpoint file cannot be used (one line)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read(path: Path, keep_tensors: bool) -> Checkpoint:
    from safetensors import safe_open

    try:
        if path.stat().st_size == 0:
            raise _Unreadable("empty (0 bytes)")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            if raw is None:
                raise _Unreadable(f"no {META_KEY!r} metadata")
            try:
                meta = json.loads(raw)
            except ValueError as e:
                raise _Unreadable(f"metadata is not JSON ({_one_line(e)})") from None
            if not isinstance(meta, dict):
                raise _Unreadable("metadata is not a JSON object")
            missing = [k for k in REQUIRED_META if k not in meta]
            if missing:
                raise _Unreadable(f"metadata lacks {', '.join(missing)}")
            if not isinstance(meta["round"], int) or isinstance(meta["round"], bool) or meta["round"] < 0:
                raise _Unreadable(f"metadata round {meta['round']!r} is not a round number")
            state: dict[str, torch.Tensor] = {}
            for k in f.keys():  # every tensor must load; without keep_tensors, one at a time
                tensor = f.get_tensor(k)
                if keep_tensors:
                    state[k] = tensor
    except _Unreadable:
        raise
    except FileNotFoundError:
        raise _Unreadable("missing") from None
    except Exception as e:  # the reader's errors (SafetensorError, OSError, ...) become the reason
        raise _Unreadable(_one_line(e)) from None
    return Checkpoint(path, meta, state)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # missing, or renamed away by a save since
        return 0


_warned: set[tuple[str, int, str]] = set()  # the driver reads the same fallback more than once


def readable_checkpoint(output_dir: str | os.PathLike[str], *, keep_tensors: bool = True) -> Checkpoint | None:
    """The newest checkpoint in `output_dir` that reads completely: the latest, else the previous
    one (with a warning naming why the latest did not read). None when there is no checkpoint
    file at all; a one-line `UserError` when there is one but none reads."""
    out = Path(output_dir)
    reasons: list[tuple[str, str]] = []
    for name in (CHECKPOINT, PREVIOUS):
        try:
            ck = _read(out / name, keep_tensors)
        except _Unreadable as e:
            reasons.append((name, str(e)))
            continue
        if reasons:
            latest = out / CHECKPOINT
            key = (str(latest), _mtime(latest), reasons[0][1])
            if key not in _warned:
                _warned.add(key)
                log.warning("checkpoint: %s is unreadable (%s); using %s (round %d)", latest, reasons[0][1],
                            ck.path.name, ck.meta["round"])
        return ck
    if all(why == "missing" for _, why in reasons):
        return None
    raise UserError(f"no readable checkpoint in {out} ({'; '.join(f'{n}: {why}' for n, why in reasons)})")


def checkpoint_meta(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The newest readable checkpoint's metadata (see `readable_checkpoint`); None if there is no
    checkpoint. Its tensors are read too, to pick the same file `load_checkpoint` picks."""
    ck = readable_checkpoint(output_dir, keep_tensors=False)
    return ck.meta if ck else None


def load_checkpoint(output_dir: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The newest readable checkpoint's tensors and metadata (see `readable_checkpoint`)."""
    ck = readable_checkpoint(output_dir)
    if ck is None:
        raise UserError(f"no checkpoint in {output_dir}")
    return ck.state, ck.meta
