"""HeadWorker: one Ray actor per LoRA head, wrapping `core.head.Head`.

Scheduled with `num_gpus=ray.gpus_per_head` (fractional: 0.25 puts four heads on one GPU) and
`num_cpus=ray.cpus_per_head`. A head computes on exactly the GPU Ray assigned it, and fails with
a one-line error if CUDA cannot be used there (no silent fall-back to the CPU). A head without a
GPU never touches one: Ray no longer hides GPUs from actors with num_gpus=0, so the head sets
CUDA_VISIBLE_DEVICES="" itself before anything initializes CUDA.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import ray
import torch

from lte_ray.config import Config
from lte_ray.core import lora
from lte_ray.core.head import Head
from lte_ray.core.protocol import Broadcast, HeadResult
from lte_ray.errors import UserError

CORRUPTIONS = ("nan", "shape", "type", "poison", "nan-factors")
POISON_SCALE = -10.0  # "poison": every B factor scaled (and its sign flipped) before the upload


class HeadWorker:
    def __init__(self, cfg: Config, head_id: int, torch_threads: int = 1):
        torch.set_num_threads(max(1, torch_threads))
        self._corrupt: str | None = None
        self._corrupt_always = False
        self._slowdown = 1.0
        # A head that cannot be built (bad data path on this node, say) reports why from info(),
        # as a task error carrying the original exception, instead of dying with a traceback string.
        try:
            # The driver's resolved config: nothing is validated again. The head's CPUs beyond the
            # first decode image-folder batches ahead (DataLoader workers).
            self.head = Head(cfg, head_id, device=head_device(cfg.train.device, head_id),
                             loader_workers=max(0, math.floor(cfg.ray.cpus_per_head) - 1))
            self._init_error: Exception | None = None
        except Exception as e:  # noqa: BLE001 (re-raised by info)
            self._init_error = e

    def info(self) -> dict[str, Any]:
        if self._init_error is not None:
            raise self._init_error
        return {"head_id": self.head.head_id, "pid": os.getpid(), "device": str(self.head.device),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def train_round(self, round_idx: int, broadcast: Broadcast, base_round: int | None = None,
                    fresh: bool = False) -> HeadResult:
        # `broadcast` arrives resolved from the round's single ObjectRef (one ray.put per round).
        start = time.perf_counter()
        kind = self._corrupt
        if not self._corrupt_always:
            self._corrupt = None
        self.head.tamper = TAMPER.get(kind or "")
        result = self.head.train_round(round_idx, broadcast, base_round, fresh)
        if kind and kind not in TAMPER:
            result = _corrupted(result, kind)
        if self._slowdown > 1:  # a straggler: slow hardware, a shared GPU, a bad link
            time.sleep((self._slowdown - 1) * (time.perf_counter() - start))
        return result

    def corrupt_next(self, kind: str, every_round: bool = False) -> None:
        """Fault injection for tests and drills: the next upload (or, with `every_round`, every one)
        carries NaN, wrong shapes, is not an upload at all, is poisoned (B scaled by -10), or the
        head's own factors go NaN (a diverged head: it stays NaN until restarted fresh)."""
        if kind not in CORRUPTIONS:
            raise ValueError(f"kind must be one of {CORRUPTIONS}")
        self._corrupt, self._corrupt_always = kind, every_round

    def slow_down(self, factor: float) -> None:
        """Fault injection: each round takes `factor` times as long."""
        self._slowdown = max(1.0, factor)


def _poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in lora.lte_layers(model).values():
            layer.lora_B.mul_(POISON_SCALE)


def _diverge(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in lora.lte_layers(model).values():
            layer.lora_B.fill_(float("nan"))


TAMPER = {"poison": _poison, "nan-factors": _diverge}  # faults in the head's own factors, before its upload


def _corrupted(result: HeadResult, kind: str) -> HeadResult:
    if kind == "type":  # not an upload at all
        result.upload = (1, 2, 3)  # type: ignore[assignment]
        return result
    key = next(iter(result.upload.b))
    e = result.upload.b[key]
    if kind == "nan":
        e.data = torch.full_like(e.data, float("nan")) if e.data.is_floating_point() else e.data
        if e.absmax is not None:
            e.absmax = torch.full_like(e.absmax, float("nan"))
    else:
        e.shape = [e.shape[0] - 1, *e.shape[1:]]
    return result


def head_device(requested: str, head_id: int) -> torch.device:
    """The device of a head in this actor: the GPU Ray assigned it (as CUDA sees it), or the CPU.
    Without a GPU from Ray, CUDA is hidden first, so `auto` means the CPU."""
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if requested == "cuda":
            raise UserError(f"head {head_id}: train.device is cuda but Ray gave it no GPU; set ray.gpus_per_head")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"head {head_id}: Ray assigned GPU {','.join(gpu_ids)} but CUDA is not usable here "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); fix the node's driver or "
                        "set train.device=cpu")
    return assigned_cuda_device(gpu_ids)


def assigned_cuda_device(gpu_ids: list[str]) -> torch.device:
    """The CUDA device of the first GPU Ray assigned. Ray narrows CUDA_VISIBLE_DEVICES to the
    assigned GPUs, so that is cuda:0; where it did not (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES),
    the assigned id is found in the visible list, or is the CUDA index itself."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return torch.device("cuda", int(gpu_ids[0]) if gpu_ids[0].isdigit() else 0)
    visible = [v.strip() for v in env.split(",") if v.strip()]
    return torch.device("cuda", visible.index(gpu_ids[0]) if gpu_ids[0] in visible else 0)


def torch_threads(cpus: float) -> int:
    return max(1, math.floor(cpus))


def head_actor(cfg: Config, head_id: int, **options: Any):
    """Create a HeadWorker actor with the config's resources (plus any Ray actor options)."""
    opts = {"num_cpus": cfg.ray.cpus_per_head, "num_gpus": cfg.ray.gpus_per_head, "max_restarts": 0, **options}
    actor_cls = ray.remote(HeadWorker)
    return actor_cls.options(**opts).remote(cfg, head_id, torch_threads(cfg.ray.cpus_per_head))
