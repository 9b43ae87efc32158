"""HeadWorker: one Ray actor per LoRA head, wrapping `core.head.Head`.

Scheduled with `num_gpus=ray.gpus_per_head` (fractional: 0.25 puts four heads on one GPU) and
`num_cpus=ray.cpus_per_head`. Inside, the device follows `torch.cuda.is_available()`: Ray sets
CUDA_VISIBLE_DEVICES for a GPU actor, so a head computes on its GPU where one exists and on
the CPU otherwise.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ray
import torch

from lte_ray.config import Config
from lte_ray.core.head import Head
from lte_ray.core.protocol import Broadcast, HeadResult

CORRUPTIONS = ("nan", "shape")


class HeadWorker:
    def __init__(self, cfg: Config, head_id: int, torch_threads: int = 1):
        torch.set_num_threads(max(1, torch_threads))
        self._corrupt: str | None = None
        # A head that cannot be built (bad data path on this node, say) reports why from info(),
        # as a task error carrying the original exception, instead of dying with a traceback string.
        try:
            # The driver's resolved config: nothing is validated again. The head's CPUs beyond the
            # first decode image-folder batches ahead (DataLoader workers).
            self.head = Head(cfg, head_id, loader_workers=max(0, math.floor(cfg.ray.cpus_per_head) - 1))
            self._init_error: Exception | None = None
        except Exception as e:  # noqa: BLE001 (re-raised by info)
            self._init_error = e

    def info(self) -> dict[str, Any]:
        if self._init_error is not None:
            raise self._init_error
        return {"head_id": self.head.head_id, "pid": os.getpid(), "device": str(self.head.device),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def train_round(self, round_idx: int, broadcast: Broadcast) -> HeadResult:
        # `broadcast` arrives resolved from the round's single ObjectRef (one ray.put per round).
        result = self.head.train_round(round_idx, broadcast)
        if self._corrupt:
            result, self._corrupt = _corrupted(result, self._corrupt), None
        return result

    def corrupt_next(self, kind: str) -> None:
        """Fault injection for tests and drills: the next upload carries NaN or wrong shapes."""
        if kind not in CORRUPTIONS:
            raise ValueError(f"kind must be one of {CORRUPTIONS}")
        self._corrupt = kind


def _corrupted(result: HeadResult, kind: str) -> HeadResult:
    key = next(iter(result.factors))
    u, v = result.factors[key]
    result.factors[key] = (torch.full_like(u, float("nan")), v) if kind == "nan" else (u[:-1], v)
    return result


def torch_threads(cpus: float) -> int:
    return max(1, math.floor(cpus))


def head_actor(cfg: Config, head_id: int, **options: Any):
    """Create a HeadWorker actor with the config's resources (plus any Ray actor options)."""
    opts = {"num_cpus": cfg.ray.cpus_per_head, "num_gpus": cfg.ray.gpus_per_head, "max_restarts": 0, **options}
    actor_cls = ray.remote(HeadWorker)
    return actor_cls.options(**opts).remote(cfg, head_id, torch_threads(cfg.ray.cpus_per_head))
