"""Robust aggregation (`core.robust`) and a head's fresh restart: bounds relative to the weights and
to the round's median head, for deltas and replica changes, reject or clip; a head whose factors
went NaN takes part again once the coordinator asks it to restart fresh."""

import math
from collections import deque

import pytest
import torch

from lte_ray.core import merge, robust
from lte_ray.core.head import Head
from lte_ray.core.lora import lte_layers
from lte_ray.core.master import MasterWeights
from lte_ray.data import load_data


def _delta(norm: float, g: torch.Generator, m: int = 32, n: int = 24, k: int = 4):
    """A rank-k delta (U, V) of Frobenius norm `norm`."""
    u, v = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    return u * (norm / float((u @ v).norm())), v


def _round(norms, w_norm=100.0):
    g = torch.Generator().manual_seed(0)
    weights = {"w": torch.full((32, 24), w_norm / math.sqrt(32 * 24))}
    return weights, [{"w": _delta(x, g)} for x in norms]


def test_a_head_far_above_its_peers_is_rejected_though_within_the_weight_bound():
    # |W| = 100: a delta of 490 is within 5x |W| (the only bound before), but 10x the median head
    weights, deltas = _round([45.0, 50.0, 55.0, 490.0])
    assert merge.over_bound(weights, deltas, 5.0) == {}  # the old check let it through
    verdict = robust.screen(weights, deltas, [{}] * 4, max_ratio=5.0, median_ratio=4.0)
    assert set(verdict.rejected) == {3} and "9.8x the median head's" in verdict.rejected[3]
    assert robust.screen(weights, deltas, [{}] * 4, max_ratio=5.0, median_ratio=None).rejected == {}


def test_a_young_head_over_the_median_bound_is_clipped_to_the_median_not_refused():
    """A fresh optimizer's first deltas are far larger than settled heads' (see `core.robust`):
    refusing a young head would refuse an honest joiner; clipped to the median, a poisoner among
    the young has no more say than a typical head. Over the bound relative to |W| it is rejected."""
    weights, deltas = _round([45.0, 50.0, 55.0, 490.0])
    verdict = robust.screen(weights, deltas, [{}] * 4, max_ratio=5.0, median_ratio=4.0, fresh={3})
    assert verdict.rejected == {} and set(verdict.clipped) == {3} and "a young head" in verdict.clipped[3]
    assert verdict.delta_scales[3]["w"] == pytest.approx(50.0 / 490.0)
    weights, deltas = _round([45.0, 50.0, 55.0, 600.0])  # over 5 x |W| = 500
    verdict = robust.screen(weights, deltas, [{}] * 4, max_ratio=5.0, median_ratio=4.0, fresh={3})
    assert set(verdict.rejected) == {3} and not verdict.clipped and not verdict.non_finite


def test_with_two_heads_the_recent_rounds_give_the_median():
    weights, deltas = _round([50.0, 400.0])  # alone, two heads have no median that says which is wrong
    assert robust.screen(weights, deltas, [{}] * 2, max_ratio=5.0, median_ratio=4.0).rejected == {}
    recent = {"delta": [45.0, 48.0, 52.0, 55.0]}  # heads accepted in the last rounds
    verdict = robust.screen(weights, deltas, [{}] * 2, max_ratio=5.0, median_ratio=4.0, recent=recent)
    assert set(verdict.rejected) == {1} and verdict.totals["delta"][1] == pytest.approx(400.0)


def test_a_one_head_baseline_is_not_judged_by_its_own_past_rounds(tiny_cfg):
    """The median bound compares heads. A one-head baseline would be judged by its own recent
    rounds alone, and rejecting its only head ends the run."""
    from lte_ray.core.methods import LORA_MERGE, LTE

    base = tiny_cfg(**{"lte.quant": "none"})
    for method, rejected in ((LTE, True), (LORA_MERGE, False)):
        cfg = method.lte_config(base.replace({"lte.heads": 1}) if method is LTE else base)
        data = load_data(cfg.data, cfg.model)
        master, head = MasterWeights(cfg, data), Head(cfg, 0, data, "cpu")
        result = head.train_round(0, master.broadcast(full=True), None)
        # the recent rounds' norms far below this one's: a head 1e6x over its own past
        master.recent_norms = {kind: deque([[1e-9] * 3], maxlen=robust.RECENT_ROUNDS)
                               for kind in ("delta", "replica change")}
        verdict = master.accept([result])
        assert bool(verdict.rejected) is rejected, (method.name, verdict.rejected)
    assert LORA_MERGE.lte_config(base).ray.max_median_ratio is None and base.ray.max_median_ratio == 8.0


def test_the_master_keeps_the_accepted_heads_norms_for_the_next_rounds(tiny_cfg):
    cfg = tiny_cfg(**{"lte.heads": 3, "lte.quant": "none", "ray.max_median_ratio": 4.0})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    heads = [Head(cfg, i, data, "cpu") for i in range(3)]
    for r in range(robust.RECENT_ROUNDS + 1):
        payload = master.broadcast(full=r == 0)
        master.merge(master.accept([h.train_round(r, payload, master.store.base_round(h.head_id)) for h in heads])
                     .accepted, r)
    kept = master.recent_norms["delta"]
    assert len(kept) == robust.RECENT_ROUNDS and all(len(x) == 3 and min(x) > 0 for x in kept)


def test_clipping_scales_an_outlier_down_to_the_bound():
    weights, deltas = _round([45.0, 50.0, 55.0, 490.0])
    verdict = robust.screen(weights, deltas, [{}] * 4, max_ratio=5.0, median_ratio=4.0, clip=True)
    assert verdict.rejected == {} and set(verdict.clipped) == {3}
    clipped = robust.clip_delta(deltas[3], verdict.delta_scales[3])
    median = float(torch.tensor([45.0, 50.0, 55.0, 490.0]).median())  # the lower middle: 50
    assert float((clipped["w"][0] @ clipped["w"][1]).norm()) == pytest.approx(4.0 * median, rel=1e-4)


def test_non_finite_updates_are_rejected_even_when_clipping():
    weights, deltas = _round([45.0, 50.0, 55.0])
    deltas[1]["w"][0][0, 0] = float("nan")
    verdict = robust.screen(weights, deltas, [{}] * 3, max_ratio=5.0, median_ratio=4.0, clip=True)
    assert set(verdict.rejected) == {1} and "NaN" in verdict.rejected[1] and not verdict.clipped
    assert verdict.non_finite == {1}  # its factors cannot be trusted: the coordinator restarts it fresh


def test_with_two_heads_only_the_weight_bound_applies():
    weights, deltas = _round([40.0, 400.0])  # 400 < 5 x 100: no median of two says which is wrong
    assert robust.screen(weights, deltas, [{}] * 2, max_ratio=5.0, median_ratio=4.0).rejected == {}
    weights, deltas = _round([40.0, 600.0])
    assert set(robust.screen(weights, deltas, [{}] * 2, max_ratio=5.0, median_ratio=4.0).rejected) == {1}


def test_replica_changes_are_bounded_too():
    weights, deltas = _round([50.0, 50.0, 50.0])
    weights["norm.bias"] = torch.zeros(16)  # starts at zero: its bound uses sqrt(numel) = 4
    ok = [{"norm.bias": torch.full((16,), 0.01 * (i + 1))} for i in range(3)]
    assert robust.screen(weights, deltas, ok, 5.0, 4.0).rejected == {}
    huge = ok[:2] + [{"norm.bias": torch.full((16,), 1e30)}]
    verdict = robust.screen(weights, deltas, huge, 5.0, 4.0)
    assert set(verdict.rejected) == {2} and "replica change" in verdict.rejected[2]
    far = ok[:2] + [{"norm.bias": torch.full((16,), 1.0)}]  # |change| 4 < 5 x 4, but 20x the median peer
    verdict = robust.screen(weights, deltas, far, 5.0, 4.0, clip=True)
    assert set(verdict.clipped) == {2}
    moved = robust.clip_replicas(far[2], weights, verdict.replica_scales[2])["norm.bias"]
    assert float(moved.norm()) == pytest.approx(4.0 * float(ok[1]["norm.bias"].norm()), rel=1e-4)


def _poison(model):
    with torch.no_grad():
        for layer in lte_layers(model).values():
            layer.lora_B.mul_(-10.0)


@pytest.mark.parametrize("outliers", ["reject", "clip"])
def test_a_poisoned_head_among_honest_ones(tiny_cfg, outliers):
    cfg = tiny_cfg(**{"lte.heads": 4, "lte.quant": "none", "ray.outliers": outliers, "ray.max_median_ratio": 4.0})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    heads = [Head(cfg, i, data, "cpu") for i in range(4)]
    for r in range(3):
        heads[3].tamper = _poison if r == 2 else None  # once the factors are non-zero
        payload = master.broadcast(full=r == 0)
        results = [h.train_round(r, payload, master.store.base_round(h.head_id)) for h in heads]
        accepted, rejected, _ = master.accept(results)
        master.merge(accepted, r)
    if outliers == "reject":
        assert list(rejected) == [3] and len(accepted) == 3
        assert master.store.base_round(3) is None  # it sends everything next time
    else:
        assert not rejected and [d.result.head_id for d in accepted if d.clipped] == [3]
        assert master.store.base_round(3) == 2  # the store holds what the head holds, clipped or not
    assert all(torch.isfinite(v).all() for v in master.state.values())


def test_a_head_whose_factors_went_nan_recovers_when_restarted_fresh(tiny_cfg):
    cfg = tiny_cfg(**{"lte.quant": "none"})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)

    def nan(model):
        with torch.no_grad():
            next(iter(lte_layers(model).values())).lora_B.fill_(float("nan"))

    def finite(result) -> bool:
        return all(torch.isfinite(e.data.float()).all() for e in result.upload.b.values())

    for fresh, recovers in ((False, False), (True, True)):
        head = Head(cfg, 0, data, "cpu")
        head.train_round(0, master.broadcast(full=True))
        head.tamper = nan
        assert not finite(head.train_round(1, master.broadcast()))  # the coordinator rejects this one
        head.tamper = None
        again = head.train_round(2, master.broadcast(), None, fresh=fresh)
        assert finite(again) == recovers
        if recovers:
            assert master.problem(again) is None and not again.upload.relative
