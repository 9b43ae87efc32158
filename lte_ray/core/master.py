"""The coordinator's side of LTE: fp32 master weights, the broadcast, the merge, evaluation.

Used in-process by `core.simulate` and inside the Ray coordinator actor alike, so both run
the same math.
"""

from __future__ import annotations

import dataclasses

import torch

from lte_ray.config import Config
from lte_ray.core import lora, merge, quant
from lte_ray.core.protocol import Broadcast, HeadResult
from lte_ray.core.task import evaluate
from lte_ray.datasets import DataBundle
from lte_ray.errors import UserError
from lte_ray.models import build_model


class MasterWeights:
    def __init__(self, cfg: Config, data: DataBundle, device: torch.device | str = "cpu"):
        self.cfg, self.data, self.device = cfg, data, torch.device(device)
        torch.manual_seed(cfg.train.seed)  # the initial main weights are a function of the seed
        model = build_model(cfg.model, data.spec)
        self.quant_keys = lora.main_weight_keys(model, cfg.lte.targets)
        if not self.quant_keys:
            raise UserError(f"lte.targets: {cfg.lte.targets} match no nn.Linear layer of the model")
        # Master copy on CPU in fp32, whatever the heads compute in.
        self.state: dict[str, torch.Tensor] = _fp32_cpu(model.state_dict())
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
        rest = {k: v for k, v in self.state.items() if k not in self.quant_keys}
        return dataclasses.replace(broadcast, plain={**broadcast.plain, **rest}, full=True)

    def merge(self, results: list[HeadResult]) -> None:
        self.state = merge.merge_round(self.state, [r.factors for r in results], [r.replicas for r in results])

    def evaluate(self) -> dict[str, float]:
        self.eval_model.load_state_dict(self.state)
        return evaluate(self.eval_model, self.data.test, self.data.spec.task, self.device)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state) ^ set(state)
        if missing:
            raise KeyError(f"state does not fit the model: {sorted(missing)[:3]}")
        self.state = _fp32_cpu(state)


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in state.items()}
