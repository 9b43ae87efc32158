"""Files a run leaves on disk, written atomically (temp file + rename): a crash never leaves a
half-written summary or weights file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=float)
            f.write("\n")

    _atomic(Path(path), write)


def save_weights(path: str | os.PathLike[str], state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(output_dir: str | os.PathLike[str], state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Main weights + replica params, with round, counters, config and MLflow run id in the
    file's metadata: weights and metadata are replaced together, by one rename."""
    path = Path(output_dir) / CHECKPOINT
    save_weights(path, state, metadata={"lte_ray": json.dumps(meta, default=float)})
    return path


def checkpoint_meta(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint's metadata without reading its tensors; None if there is no checkpoint."""
    from safetensors import safe_open

    path = Path(output_dir) / CHECKPOINT
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["lte_ray"])


def load_checkpoint(output_dir: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = Path(output_dir) / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["lte_ray"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, meta
