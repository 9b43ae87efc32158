"""Robust aggregation: which heads' updates a merge takes as sent, clipped, or not at all.

Two bounds on what a head sends:
  * per tensor, `max_delta_ratio` x |W|_F for its delta of a main weight W (`merge.delta_norms`,
    from its factors): an absolute sanity bound;
  * per head, `max_median_ratio` x the round's median head for its whole delta (the norm over
    every main weight together): a bound that follows the training (deltas shrink as the learning
    rate decays, so a fixed ratio to |W| lets a head that is 10x its peers through late in a run).
    Over whole heads, not tensors: one tensor of an honest head is noisy (on digits, single
    tensors of honest heads reached 6x their median late in the run, whole heads 3.6x).
Replica parameters a head trained (norms, biases, embeddings with `lte.replicas=average`) are
bounded the same way, on their change |R - P|_F, against max(|P|_F, sqrt(numel)) (biases start
at zero, so |P| alone would allow no change at all) and the heads' median total change.

The median is over this round's heads and the heads accepted in the last `RECENT_ROUNDS` rounds
(kept by `MasterWeights`), so a round where only two heads report still has a reference: with two
heads alone, "the median" would be one of the two. It needs `MIN_HEADS_FOR_MEDIAN` norms in all.
Non-finite updates are always rejected (they cannot be clipped). Over a bound, `outliers=reject`
drops the head from the round; `clip` scales its update down to the bound (the head still
counts, with a bounded vote).

A young head (new to the run, for its first `runtime.membership.YOUNG_ROUNDS` accepted uploads)
over the *median* bound is clipped to the median head's norm whatever `outliers` says: a fresh
optimizer's deltas are far larger than settled heads' (on digits, a head joining at round 20 of
60 sent 3x the median head in its first round, then about as much as the others; one joining at
round 40 sent 32x, and still 8x sixteen rounds later). Refusing it would refuse an honest joiner;
clipped to the median, a poisoner among the young has no more say than a typical head, and once
it is no longer young it is refused. A head restarted from fresh factors after a NaN upload is
not young. The bound relative to |W| rejects young heads as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lte_ray.core.merge import delta_norms
from lte_ray.core.protocol import Factors

MIN_HEADS_FOR_MEDIAN = 3
RECENT_ROUNDS = 3  # rounds of accepted heads' norms the median also takes


@dataclass
class Screening:
    """The verdict on a round's updates, by the heads' index in the list screened."""

    rejected: dict[int, str] = field(default_factory=dict)  # index -> why
    non_finite: set[int] = field(default_factory=set)  # rejected for NaN/Inf: restart them from fresh factors
    clipped: dict[int, str] = field(default_factory=dict)  # index -> what was clipped
    delta_scales: dict[int, dict[str, float]] = field(default_factory=dict)  # index -> key -> factor < 1
    replica_scales: dict[int, dict[str, float]] = field(default_factory=dict)
    totals: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> index -> whole-head norm


@dataclass
class _Norms:
    """One kind of update (deltas or replica changes): per head, per key, its norm."""

    what: str
    scales: dict[int, dict[str, float]]
    by_head: dict[int, dict[str, float]] = field(default_factory=dict)

    def add(self, key: str, heads: list[int], norms: list[float]) -> None:
        for i, n in zip(heads, norms):
            self.by_head.setdefault(i, {})[key] = n


def _per_tensor(out: Screening, kind: _Norms, key: str, heads: list[int], norms: list[float], ref_norm: float,
                max_ratio: float | None, clip: bool) -> None:
    """NaN/Inf, and the bound relative to the tensor itself."""
    bound = math.inf if max_ratio is None else max_ratio * ref_norm
    for i, n in zip(heads, norms):
        if i in out.rejected or n <= bound:
            continue
        if not math.isfinite(n):
            out.rejected[i] = f"{key}: {kind.what} holds NaN or Inf"
            out.non_finite.add(i)
        elif clip:
            kind.scales.setdefault(i, {})[key] = bound / n
            out.clipped.setdefault(i, f"{key}: {kind.what} norm {n:.3g} clipped to {bound:.3g}")
        else:
            out.rejected[i] = (f"{key}: {kind.what} norm is {n:.3g} ({n / max(ref_norm, 1e-12):.3g}x the "
                               f"tensor's), over the bound {bound:.3g} (ray.max_delta_ratio)")


def _per_head(out: Screening, kind: _Norms, median_ratio: float | None, clip: bool, fresh: set[int],
              recent: list[float]) -> None:
    """The bound relative to the median head (this round's and the recent rounds' accepted ones),
    on each head's total over every key."""
    totals = {i: math.sqrt(sum(n * n for n in keys.values())) for i, keys in kind.by_head.items()
              if i not in out.rejected}
    out.totals[kind.what] = totals
    finite = [t for t in totals.values() if math.isfinite(t)] + list(recent)
    if median_ratio is None or len(finite) < MIN_HEADS_FOR_MEDIAN:
        return
    median = float(torch.tensor(finite, dtype=torch.float64).median())
    if median <= 0:  # nothing moved: no scale to judge against
        return
    bound = median_ratio * median
    for i, total in totals.items():
        if total <= bound:
            continue
        if clip or i in fresh:
            to = median if i in fresh and not clip else bound  # a young head: no more say than the median head
            scales = kind.scales.setdefault(i, {})
            for key in kind.by_head[i]:
                scales[key] = min(scales.get(key, 1.0), to / total)
            out.clipped[i] = (f"{kind.what} norm {total:.3g} ({total / median:.3g}x the median head's) clipped to "
                              f"{to:.3g}" + (" (a young head)" if i in fresh and not clip else ""))
        else:
            out.rejected[i] = (f"{kind.what} norm is {total:.3g}, {total / median:.3g}x the median head's, "
                               f"over the bound {median_ratio:g}x (ray.max_median_ratio)")


def screen(weights: dict[str, torch.Tensor], deltas: list[Factors], replicas: list[dict[str, torch.Tensor]],
           max_ratio: float | None, median_ratio: float | None, clip: bool = False,
           fresh: set[int] | frozenset[int] = frozenset(), recent: dict[str, list[float]] | None = None) -> Screening:
    """Judge every head's deltas and replica updates against the round's bounds (see the module
    doc). `fresh`: the indices of young heads; `recent`: by kind ("delta", "replica change"), the
    totals of heads accepted in the last rounds (`Screening.totals`), part of the median."""
    out = Screening()
    if not deltas:
        return out
    every = list(range(len(deltas)))
    kinds = (_Norms("delta", out.delta_scales), _Norms("replica change", out.replica_scales))
    for key in deltas[0]:
        norms = delta_norms(deltas, key).double().cpu().tolist()
        kinds[0].add(key, every, norms)
        _per_tensor(out, kinds[0], key, every, norms, float(weights[key].norm()), max_ratio, clip)
    for key in sorted({k for r in replicas for k in r}):
        have = [i for i, r in enumerate(replicas) if key in r]
        p = weights[key].float()
        norms = [float((replicas[i][key].to(p.device, torch.float32) - p).norm()) for i in have]
        kinds[1].add(key, have, norms)
        _per_tensor(out, kinds[1], key, have, norms, max(float(p.norm()), math.sqrt(p.numel())), max_ratio, clip)
    for kind in kinds:
        _per_head(out, kind, median_ratio, clip, set(fresh), (recent or {}).get(kind.what, []))
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
