"""Robust aggregation: which heads' updates a merge takes as sent, clipped, or not at all.

A head's delta for a main weight W (`merge.delta_norms`, from its factors) must stay within
  * `max_delta_ratio` x |W|_F: an absolute sanity bound, and
  * `max_median_ratio` x the median delta norm of the round's heads for that weight: a bound
    that follows the training (deltas shrink as the learning rate decays, so a fixed ratio to |W|
    lets a head that is 10x its peers through late in a run).
Replica parameters a head trained (norms, biases, embeddings with `lte.replicas=average`) are
bounded the same way, on their change |R - P|_F, against max(|P|_F, sqrt(numel)) (biases start
at zero, so |P| alone would allow no change at all) and the heads' median change.

The median needs at least `MIN_HEADS_FOR_MEDIAN` heads to say anything about one of them: with
two, "the median" is one of the two. Non-finite updates are always rejected (they cannot be
clipped). Over a bound, `outliers=reject` drops the head from the round; `clip` scales its update
for that tensor down to the bound (the head still counts, with a bounded vote).

A fresh head (its first upload since it started from new factors: a joiner, a replacement, a
head restarted after a rejection) over the *median* bound is clipped whatever `outliers` says.
Its first deltas are legitimately far larger than settled heads' (measured on digits: 5x the
median when starting a third into the run, 60x at two thirds), so rejecting it would refuse it
for good; clipped, its vote is bounded like anyone's. The bound relative to |W| rejects it as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lte_ray.core.merge import delta_norms
from lte_ray.core.protocol import Factors

MIN_HEADS_FOR_MEDIAN = 3


@dataclass
class Screening:
    """The verdict on a round's updates, by the heads' index in the list screened."""

    rejected: dict[int, str] = field(default_factory=dict)  # index -> why
    non_finite: set[int] = field(default_factory=set)  # rejected for NaN/Inf: restart them from fresh factors
    clipped: dict[int, str] = field(default_factory=dict)  # index -> what was clipped
    delta_scales: dict[int, dict[str, float]] = field(default_factory=dict)  # index -> key -> factor < 1
    replica_scales: dict[int, dict[str, float]] = field(default_factory=dict)


def _bounds(norms: torch.Tensor, ref_norm: float, max_ratio: float | None,
            median_ratio: float | None) -> tuple[float, float]:
    """The largest norms allowed for this tensor this round: relative to the weight, and also
    relative to the round's median head (inf where a bound is off)."""
    absolute = math.inf if max_ratio is None else max_ratio * ref_norm
    relative = math.inf
    finite = norms[torch.isfinite(norms)]
    if median_ratio is not None and finite.numel() >= MIN_HEADS_FOR_MEDIAN:
        median = float(finite.median())
        if median > 0:
            relative = median_ratio * median
    return absolute, min(absolute, relative)


def _judge(out: Screening, scales: dict[int, dict[str, float]], key: str, what: str, heads: list[int],
           norms: torch.Tensor, bounds: tuple[float, float], ref_norm: float, clip: bool, fresh: set[int]) -> None:
    """Reject or clip the heads (indices `heads`, norms `norms`) over the bounds for `key`."""
    absolute, bound = bounds
    for i, n in zip(heads, norms.tolist()):
        if i in out.rejected or n <= bound:
            continue
        if not math.isfinite(n):
            out.rejected[i] = f"{key}: {what} holds NaN or Inf"
            out.non_finite.add(i)
        elif clip or (i in fresh and n <= absolute):
            scales.setdefault(i, {})[key] = bound / n
            out.clipped.setdefault(i, f"{key}: {what} norm {n:.3g} clipped to {bound:.3g}"
                                   + (" (a fresh head)" if i in fresh and not clip else ""))
        else:
            out.rejected[i] = (f"{key}: {what} norm is {n:.3g} ({n / max(ref_norm, 1e-12):.3g}x the weight's), "
                               f"over this round's bound {bound:.3g}")


def screen(weights: dict[str, torch.Tensor], deltas: list[Factors], replicas: list[dict[str, torch.Tensor]],
           max_ratio: float | None, median_ratio: float | None, clip: bool = False,
           fresh: set[int] | frozenset[int] = frozenset()) -> Screening:
    """Judge every head's deltas and replica updates against the round's bounds (see the module
    doc). `fresh`: the indices of fresh heads' uploads."""
    out = Screening()
    if not deltas:
        return out
    every = list(range(len(deltas)))
    for key in deltas[0]:
        norms = delta_norms(deltas, key).double().cpu()
        ref = float(weights[key].norm())
        bounds = _bounds(norms, ref, max_ratio, median_ratio)
        _judge(out, out.delta_scales, key, "delta", every, norms, bounds, ref, clip, set(fresh))
    for key in sorted({k for r in replicas for k in r}):
        have = [i for i, r in enumerate(replicas) if key in r]
        p = weights[key].float()
        norms = torch.tensor([float((replicas[i][key].to(p.device, torch.float32) - p).norm()) for i in have],
                             dtype=torch.float64)
        ref = max(float(p.norm()), math.sqrt(p.numel()))
        bounds = _bounds(norms, ref, max_ratio, median_ratio)
        _judge(out, out.replica_scales, key, "replica change", have, norms, bounds, ref, clip, set(fresh))
    for i in out.rejected:  # a rejected head is not also clipped
        out.clipped.pop(i, None)
        out.delta_scales.pop(i, None)
        out.replica_scales.pop(i, None)
    return out


def clip_delta(delta: Factors, scales: dict[str, float]) -> Factors:
    """The delta with U scaled per key (U V scales with U)."""
    return {k: ((u * scales[k], v) if k in scales else (u, v)) for k, (u, v) in delta.items()}


def clip_replicas(replicas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                  scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Replica parameters moved only `scale` of the way from the current weights."""
    out = dict(replicas)
    for k, s in scales.items():
        p = weights[k].to(replicas[k].device, replicas[k].dtype)
        out[k] = p + (replicas[k] - p) * s
    return out
