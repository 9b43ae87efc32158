"""Merge rules: small pure functions over dicts of tensors (the coordinator only calls them).

A head's delta for one layer is shipped as factors (U, V), D = U @ V = s (B A - B_prev A_prev).
Merging over the set S of heads that reported: W <- W + (1/|S|) sum_i U_i V_i. Replica
parameters that heads trained locally are averaged (FedAvg).
"""

from __future__ import annotations

import torch
from torch import nn

from lte_ray.core.lora import lte_layers
from lte_ray.core.protocol import Factors


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


def delta_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """|U V|_F without forming U V: sqrt(sum((U^T U) * (V V^T))), O(r^2 (m + n))."""
    u, v = u.double(), v.double()
    return float(((u.T @ u) * (v @ v.T)).sum().clamp_min(0).sqrt())


def check_result(factors: Factors, replicas: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                 main_keys: list[str], max_delta_ratio: float | None = None) -> str | None:
    """Why a head's upload must be rejected (wrong keys or shapes, NaN/Inf, a delta far larger
    than the weights), or None if it is fit to merge."""
    if set(factors) != set(main_keys):
        return f"factors for {len(factors)} layers, expected {len(main_keys)}"
    for key, (u, v) in factors.items():
        w = state[key]
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != w.shape[0] or v.shape[1] != w.shape[1] \
                or u.shape[1] != v.shape[0]:
            return f"{key}: factors {tuple(u.shape)} x {tuple(v.shape)} do not fit weight {tuple(w.shape)}"
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            return f"{key}: factors hold NaN or Inf"
        if max_delta_ratio is not None:
            ratio = delta_norm(u, v) / max(float(w.norm()), 1e-12)
            if ratio > max_delta_ratio:
                return f"{key}: delta norm is {ratio:.3g}x the weight norm (bound {max_delta_ratio:g})"
    for key, t in replicas.items():
        if key not in state or key in main_keys or t.shape != state[key].shape:
            return f"replica {key}: unknown or wrong shape {tuple(t.shape)}"
        if not torch.isfinite(t).all():
            return f"replica {key}: holds NaN or Inf"
    return None
