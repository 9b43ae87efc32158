"""The coordinator's side of LTE: fp32 master weights, the broadcast, reading the heads'
uploads (`core.upload.FactorStore`), the merge, evaluation.

Used in-process by `core.simulate` and inside the Ray coordinator actor alike, so both run
the same math. The master weights live on the coordinator's device: its GPU when it has one, so
the merge and the broadcast's quantization run there.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lte_ray.config import Config
from lte_ray.core import lora, merge, quant, robust
from lte_ray.core.optim import decoupled_decay
from lte_ray.core.protocol import Broadcast, Factors, HeadResult
from lte_ray.core.task import evaluate
from lte_ray.core.upload import FactorStore, Pair, problem
from lte_ray.datasets import DataBundle
from lte_ray.models import build_model


@dataclass
class Decoded:
    """A head's upload read back: its factors (B, A) and its delta as (U, V), per key."""

    result: HeadResult
    pairs: dict[str, Pair]
    deltas: Factors
    clipped: str | None = None  # what robust aggregation clipped (`ray.outliers=clip`), if anything


class Accepted(NamedTuple):
    """A round's screened uploads."""

    accepted: list[Decoded]
    rejected: dict[int, str]  # head id -> why
    non_finite: set[int]  # head ids rejected for NaN/Inf: their factors cannot be trusted any more


class MasterWeights:
    def __init__(self, cfg: Config, data: DataBundle, device: torch.device | str = "cpu"):
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        torch.manual_seed(cfg.train.seed)  # the initial main weights are a function of the seed
        model = build_model(cfg.model, data.spec)
        self.quant_keys = lora.main_weight_keys(model, cfg.lte.targets, cfg.lte.output_as_replica)
        if not self.quant_keys:
            raise lora.no_target_error(cfg.lte.targets)
        # Master copy in fp32, whatever the heads compute in. Never changed in place (a merge makes
        # new tensors), so a reference to `state` is a snapshot that evaluation and checkpointing
        # can read while the next round runs.
        self.state: dict[str, torch.Tensor] = _fp32(model.state_dict(), self.device)
        self.shapes = {k: (self.state[k].shape[0], self.state[k].shape[1]) for k in self.quant_keys}
        self.store = FactorStore(cfg.scaling, cfg.lte.mode == "resetless")
        # Whole-head norms of the heads accepted in the last rounds, by kind: part of the median bound's reference.
        self.recent_norms: dict[str, deque[list[float]]] = {}
        self.eval_model = model.to(self.device)

    def broadcast(self, full: bool = False) -> Broadcast:
        """What heads receive at the start of a round: Q(W), plus the replica parameters when
        they are averaged (they change) or when `full` (a head's first round; frozen replicas
        never change, so they travel only then)."""
        if full or self.cfg.lte.replicas == "average":
            return quant.pack(self.state, self.quant_keys, self.cfg.lte.quant)
        main = {k: self.state[k] for k in self.quant_keys}
        return quant.pack(main, self.quant_keys, self.cfg.lte.quant, full=False)

    def with_replicas(self, broadcast: Broadcast) -> Broadcast:
        """`broadcast` completed for a head's first round: the same Q(W), plus every other tensor
        in fp32 (no second quantization of the same weights)."""
        if broadcast.full:
            return broadcast
        rest = {k: v.cpu() for k, v in self.state.items() if k not in self.quant_keys}  # messages hold CPU tensors
        return dataclasses.replace(broadcast, plain={**broadcast.plain, **rest}, full=True)

    def problem(self, result: HeadResult) -> str | None:
        """Why a head's result cannot be read (see `upload.problem`, `merge.replica_problem`), or None."""
        lte = self.cfg.lte
        return (problem(result.upload, self.shapes, self.cfg.lora_rank, lte.mode == "resetless",
                        self.store.base_round(result.head_id))
                or merge.replica_problem(result.replicas, self.state, self.quant_keys))

    def accept(self, results: list[HeadResult], fresh: set[int] | frozenset[int] = frozenset()) -> Accepted:
        """Read checked results back and screen them (`core.robust`: bounds relative to the weights
        and to the round's median head; `fresh`: ids of fresh heads, clipped rather than rejected
        over the median bound); the accepted ones (clipped where so) have their factors kept for
        the heads' next uploads."""
        decoded = []
        for r in results:
            pairs, deltas = self.store.read(r.head_id, r.upload)  # kept on the CPU; the deltas go where W is
            on_device = {k: (u.to(self.device), v.to(self.device)) for k, (u, v) in deltas.items()}
            decoded.append(Decoded(r, pairs, on_device))
        ray_cfg = self.cfg.ray
        recent = {kind: [t for past in rounds for t in past] for kind, rounds in self.recent_norms.items()}
        verdict = robust.screen(self.state, [d.deltas for d in decoded], [d.result.replicas for d in decoded],
                                ray_cfg.max_delta_ratio, ray_cfg.max_median_ratio, clip=ray_cfg.outliers == "clip",
                                fresh={i for i, d in enumerate(decoded) if d.result.head_id in fresh}, recent=recent)
        for kind, totals in verdict.totals.items():  # the next rounds' median takes the heads accepted now
            self.recent_norms.setdefault(kind, deque(maxlen=robust.RECENT_ROUNDS)).append(
                [t for i, t in totals.items() if i not in verdict.rejected and i not in verdict.clipped
                 and math.isfinite(t)])
        for i, d in enumerate(decoded):
            if i in verdict.rejected:
                self.store.forget(d.result.head_id)  # its next upload sends everything again
                continue
            # The head keeps the factors it sent, clipped or not: the store must hold what the head holds.
            self.store.accept(d.result.head_id, d.result.round, d.pairs)
            if i in verdict.clipped:
                d.clipped = verdict.clipped[i]
                d.deltas = robust.clip_delta(d.deltas, verdict.delta_scales.get(i, {}))
                d.result.replicas = robust.clip_replicas(d.result.replicas, self.state,
                                                         verdict.replica_scales.get(i, {}))
        return Accepted([d for i, d in enumerate(decoded) if i not in verdict.rejected],
                        {decoded[i].result.head_id: why for i, why in verdict.rejected.items()},
                        {decoded[i].result.head_id for i in verdict.non_finite})

    def merge(self, accepted: list[Decoded], round_idx: int) -> None:
        """Round `round_idx`'s merge: the main weights decayed (`lte.decay_main`), then the heads'
        mean delta added; replicas averaged (the heads' own AdamW decayed them)."""
        state = self.state
        if self.cfg.train.weight_decay and self.cfg.lte.decay_main:
            keep = decoupled_decay(self.cfg, round_idx)
            state = {k: v * keep if k in self.quant_keys else v for k, v in state.items()}
        self.state = merge.merge_round(state, [d.deltas for d in accepted], [d.result.replicas for d in accepted])

    def evaluate(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The held-out metrics of `state` (default: the current weights). Not thread-safe: one
        evaluation at a time."""
        self.eval_model.load_state_dict(state if state is not None else self.state)
        return evaluate(self.eval_model, self.data.test, self.data.spec.task, self.device)

    def cpu_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.state.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) ^ set(state)
        if missing:
            raise KeyError(f"state does not fit the model: {sorted(missing)[:3]}")
        self.state = _fp32(state, self.device)


def _fp32(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).to(device).clone()
            for k, v in state.items()}
