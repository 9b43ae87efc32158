"""Merge rules: small pure functions over dicts of tensors (the coordinator only calls them).

A head's delta for one layer is a pair of factors (U, V), D = U @ V = s (B A - B_prev A_prev)
(`lora.delta_uv`; `core.upload` rebuilds them from what a head sent). Merging over the set S of
heads that reported: W <- W + (1/|S|) sum_i U_i V_i, one product per layer over all heads' factors.
Replica parameters that heads trained locally are averaged (FedAvg).
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
    """|U V|_F of one head, in fp64: the reference `delta_norms` is checked against."""
    u, v = u.double(), v.double()
    return float(((u.T @ u) * (v @ v.T)).sum().clamp_min(0).sqrt())


def delta_norms(deltas: list[Factors], key: str) -> torch.Tensor:
    """|U_i V_i|_F of every head's delta for `key`, without forming any U_i V_i: from the heads'
    k x k Gram matrices, |U V|^2 = sum((U^T U) * (V V^T)), batched over heads, in fp32 (`delta_uv`
    keeps the terms the size of the delta, so fp32 is enough), O(N k^2 (m + n))."""
    u = torch.stack([d[key][0] for d in deltas])
    v = torch.stack([d[key][1] for d in deltas])
    gram = torch.bmm(u.transpose(1, 2), u) * torch.bmm(v, v.transpose(1, 2))
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def over_bound(weights: dict[str, torch.Tensor], deltas: list[Factors], max_ratio: float) -> dict[int, str]:
    """Index -> why, for the deltas whose norm exceeds `max_ratio` x the weight's for any key.
    Each weight's norm is taken once a round, not once a head."""
    out: dict[int, str] = {}
    if not deltas:
        return out
    for key in deltas[0]:
        ratios = delta_norms(deltas, key) / max(float(weights[key].norm()), 1e-12)
        for i in torch.nonzero(~(ratios <= max_ratio)).flatten().tolist():  # NaN counts as over
            out.setdefault(i, f"{key}: delta norm is {float(ratios[i]):.3g}x the weight norm (bound {max_ratio:g})")
    return out


def replica_problem(replicas: object, state: dict[str, torch.Tensor], main_keys: list[str]) -> str | None:
    """Why a head's replica parameters cannot be averaged in (unknown keys, shapes, NaN/Inf), or None."""
    if not isinstance(replicas, dict):
        return f"replicas are a {type(replicas).__name__}, not a dict"
    for key, t in replicas.items():
        if key not in state or key in main_keys or not isinstance(t, torch.Tensor) or t.shape != state[key].shape \
                or t.dtype != state[key].dtype:
            return f"replica {key}: unknown, or the wrong shape or dtype"
        if not torch.isfinite(t).all():
            return f"replica {key}: holds NaN or Inf"
    return None
