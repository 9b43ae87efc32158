"""Merge rules: small pure functions over dicts of tensors (the coordinator only calls them).

A head's delta for one layer is shipped as factors (U, V), D = U @ V = s (B A - B_prev A_prev).
Merging over the set S of heads that reported: W <- W + (1/|S|) sum_i U_i V_i. Replica
parameters that heads trained locally are averaged (FedAvg).
"""

from __future__ import annotations

import torch
from torch import nn

from lte_ray.core.lora import lte_layers

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # main-weight key -> (U, V)


def head_delta(model: nn.Module) -> Factors:
    return {f"{name}.weight": layer.delta_factors() for name, layer in lte_layers(model).items()}


def apply_deltas(weights: dict[str, torch.Tensor], deltas: list[Factors]) -> dict[str, torch.Tensor]:
    """W + mean_i U_i V_i for every key the deltas name; new tensors, inputs untouched."""
    if not deltas:
        return dict(weights)
    out = dict(weights)
    n = len(deltas)
    for key in deltas[0]:
        w = weights[key]
        # One matmul over the concatenated factors = the sum of the heads' deltas.
        u = torch.cat([d[key][0].to(w.device, w.dtype) for d in deltas], dim=1)
        v = torch.cat([d[key][1].to(w.device, w.dtype) for d in deltas], dim=0)
        out[key] = torch.addmm(w, u, v, alpha=1.0 / n)
    return out


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of same-keyed tensor dicts (empty list -> empty dict)."""
    if not states:
        return {}
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def merge_round(state: dict[str, torch.Tensor], deltas: list[Factors],
                replicas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One merge: main weights get the mean delta; trained replica parameters their mean."""
    merged = apply_deltas(state, deltas)
    for k, v in average([r for r in replicas if r]).items():
        merged[k] = v.to(state[k].device, state[k].dtype)
    return merged


def factors_nbytes(factors: Factors) -> int:
    return sum(u.nbytes + v.nbytes for u, v in factors.values())
