"""What heads upload (`core.upload`) and how the coordinator checks and reads it back: rank-r
changes in fp32/bf16/int8 after a first full upload, heads snapped to what the coordinator
decodes, full uploads again after a missed round, structural checks, and delta norms from
batched fp32 Gram matrices."""

import copy

import pytest
import torch

from lte_ray.core import merge, upload
from lte_ray.core.head import Head
from lte_ray.core.lora import delta_uv, lte_layers
from lte_ray.core.master import MasterWeights
from lte_ray.core.protocol import FactorUpload
from lte_ray.data import load_data


def _setup(tiny_cfg, **overrides):
    cfg = tiny_cfg(**{"lte.quant": "none", **overrides})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    return cfg, master, [Head(cfg, i, data, "cpu") for i in range(cfg.lte.heads)]


def _round(master, heads, r, bases=None):
    payload = master.broadcast(full=r == 0)
    results = [h.train_round(r, payload, master.store.base_round(h.head_id) if bases is None else bases[h.head_id])
               for h in heads]
    assert all(master.problem(x) is None for x in results), [master.problem(x) for x in results]
    accepted, rejected, _ = master.accept(results)
    assert not rejected
    master.merge(accepted, r)
    return results


def _factor_numbers(master, rank):
    return sum(rank * (m + n) for m, n in master.shapes.values())


@pytest.mark.parametrize("encoding,per_number", [("fp32", 4), ("bf16", 2), ("int8", 1 + 4 / 64)])
def test_uploads_are_rank_r_after_the_first(tiny_cfg, encoding, per_number):
    cfg, master, heads = _setup(tiny_cfg, **{"lte.upload": encoding})
    numbers = _factor_numbers(master, cfg.lora_rank)
    first = _round(master, heads, 0)
    assert all(x.upload.nbytes == 2 * numbers * 4 for x in first)  # B, A and the round's start B', A', fp32
    later = _round(master, heads, 1)
    assert all(x.upload.relative == (encoding != "fp32") for x in later)
    # int8 pads every tensor to whole blocks of 64: within one block per tensor of the ideal
    slack = 2 * len(master.shapes) * 64 * per_number if encoding == "int8" else 0
    assert all(numbers * per_number <= x.upload.nbytes <= numbers * per_number + slack for x in later)


@pytest.mark.parametrize("encoding", ["bf16", "int8"])
def test_lossy_uploads_snap_the_head_to_what_the_coordinator_holds(tiny_cfg, encoding):
    cfg, master, heads = _setup(tiny_cfg, **{"lte.upload": encoding})
    for r in range(4):
        _round(master, heads, r)
        for h in heads:
            held = master.store.factors[h.head_id][1]
            for name, layer in lte_layers(h.model).items():
                b, a = held[f"{name}.weight"]
                assert torch.equal(layer.lora_B.detach(), b) and torch.equal(layer.lora_A.detach(), a)
    # (tests/test_round_start.py: with these uploads a head starts every round at the merged model)


def test_encoding_the_change_keeps_the_delta_where_encoding_the_products_would_not():
    g = torch.Generator().manual_seed(0)
    b_prev, a_prev = torch.randn(96, 8, generator=g), torch.randn(8, 96, generator=g)
    b, a = b_prev + 1e-2 * torch.randn(96, 8, generator=g), a_prev + 1e-2 * torch.randn(8, 96, generator=g)
    exact = b @ a - b_prev @ a_prev

    def rel(d):
        return float((d - exact).norm() / exact.norm())

    via_change = [b_prev + upload.decode(upload.encode(b - b_prev, "bf16")),
                  a_prev + upload.decode(upload.encode(a - a_prev, "bf16"))]
    u, v = delta_uv(*via_change, b_prev, a_prev, 1.0)
    assert rel(u @ v) < 0.01
    bf = [upload.decode(upload.encode(t, "bf16")) for t in (b, a, b_prev, a_prev)]
    assert rel(bf[0] @ bf[1] - bf[2] @ bf[3]) > 0.05  # the terms' rounding swamps the delta


def test_a_head_back_from_a_missed_round_sends_everything_once(tiny_cfg):
    cfg, master, heads = _setup(tiny_cfg, **{"lte.upload": "bf16"})
    _round(master, heads, 0)
    # round 1: head 1's result is lost on the way (late): the coordinator keeps round 0's factors
    payload = master.broadcast()
    results = [h.train_round(1, payload, master.store.base_round(h.head_id)) for h in heads]
    accepted = master.accept(results[:1]).accepted
    master.merge(accepted, 1)
    assert master.store.base_round(1) == 0
    again = _round(master, heads, 2)
    assert again[1].upload.base_round is None and again[1].upload.b_prev  # full, fp32
    assert again[0].upload.relative
    # a stale relative upload is named, not merged
    stale = FactorUpload("bf16", 7, True, again[0].upload.b, again[0].upload.a)
    assert "holds round" in upload.problem(stale, master.shapes, cfg.lora_rank, True, 2)


def test_malformed_uploads_are_named(tiny_cfg):
    cfg, master, heads = _setup(tiny_cfg)
    good = heads[0].train_round(0, master.broadcast(full=True)).upload
    shapes, rank = master.shapes, cfg.lora_rank

    def why(mutate):
        bad = copy.deepcopy(good)
        mutate(bad)
        return upload.problem(bad, shapes, rank, True, None)

    key = next(iter(shapes))
    assert upload.problem(good, shapes, rank, True, None) is None
    assert "not a FactorUpload" in upload.problem((1, 2, 3), shapes, rank, True, None)
    assert "expected" in why(lambda u: u.b.pop(key))
    assert "expected fp32" in why(lambda u: setattr(u.b[key], "shape", [1, 1]))
    assert "wrong dtype" in why(lambda u: setattr(u.a[key], "data", u.a[key].data.double()))
    assert "NaN" in why(lambda u: u.b[key].data.fill_(float("nan")))
    assert "starting factors" in why(lambda u: u.b_prev.clear())
    assert "A'" in why(lambda u: u.a_prev.__setitem__(key, torch.zeros(1)))
    assert "unknown encoding" in why(lambda u: setattr(u, "encoding", "fp8"))
    assert "holds none to add it to" in why(lambda u: setattr(u, "relative", True))
    assert "not dicts" in why(lambda u: setattr(u, "b", [key]))
    assert "unknown encoding" in why(lambda u: setattr(u, "encoding", ["bf16"]))
    assert "not an encoded tensor" in why(lambda u: setattr(u.b[key], "shape", 5))
    assert "not an encoded tensor" in why(lambda u: setattr(u.b[key], "data", u.b[key].data.flatten()))
    # later uploads: int8 block statistics of the wrong shape, starting factors sent again
    _round(master, heads, 0)
    int8 = copy.deepcopy(heads[0].train_round(1, master.broadcast(), 0).upload)
    int8.encoding = "int8"
    int8.b = {k: upload.encode(e.data.float(), "int8") for k, e in int8.b.items()}
    int8.a = {k: upload.encode(e.data.float(), "int8") for k, e in int8.a.items()}
    assert upload.problem(int8, shapes, rank, True, 0) is None
    int8.b[key].absmax = int8.b[key].absmax[:, None]
    assert "wrong dtype or size" in upload.problem(int8, shapes, rank, True, 0)
    again = copy.deepcopy(int8)
    again.b[key].absmax = again.b[key].absmax.flatten()
    again.b_prev = {key: torch.zeros(1)}
    assert "already holds" in upload.problem(again, shapes, rank, True, 0)


def test_gram_norms_match_the_dense_products_in_fp32():
    g = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(5):  # realistic: factors O(1), their change O(1e-3), so the delta is small
        b_prev, a_prev = torch.randn(64, 8, generator=g), torch.randn(8, 48, generator=g)
        b, a = b_prev + 1e-3 * torch.randn(64, 8, generator=g), a_prev + 1e-3 * torch.randn(8, 48, generator=g)
        deltas.append({"w": delta_uv(b, a, b_prev, a_prev, 8.0)})
    dense = torch.tensor([float((d["w"][0].double() @ d["w"][1].double()).norm()) for d in deltas], dtype=torch.float64)
    norms = merge.delta_norms(deltas, "w")
    assert norms.dtype == torch.float32 and torch.allclose(norms.double(), dense, rtol=1e-4)
    assert all(abs(merge.delta_norm(*d["w"]) - float(x)) < 1e-4 * float(x) for d, x in zip(deltas, dense))
    w = {"w": torch.full((64, 48), float(dense.median()) / (64 * 48) ** 0.5)}  # |W| = the median |D|
    over = merge.over_bound(w, deltas, 1.0)
    assert 0 < len(over) < 5 and set(over) == {i for i, x in enumerate(dense) if x > float(w["w"].norm())}
    assert all("x the weight norm (bound 1)" in why for why in over.values())


def test_replica_problems_are_named():
    state = {"a.weight": torch.zeros(6, 5), "a.bias": torch.zeros(6)}
    assert merge.replica_problem({"a.bias": torch.ones(6)}, state, ["a.weight"]) is None
    assert "NaN" in merge.replica_problem({"a.bias": torch.full((6,), float("nan"))}, state, ["a.weight"])
    assert "unknown" in merge.replica_problem({"a.weight": torch.zeros(6, 5)}, state, ["a.weight"])
    assert "dtype" in merge.replica_problem({"a.bias": torch.ones(6, dtype=torch.float64)}, state, ["a.weight"])
    assert "not a dict" in merge.replica_problem([1], state, ["a.weight"])
