"""What heads upload is checked before it is merged: keys, shapes, NaN/Inf, delta norm."""

import torch

from lte_ray.core.merge import check_result, delta_norm

W = {"a.weight": torch.randn(6, 5), "b.weight": torch.randn(4, 6), "a.bias": torch.randn(6)}
MAIN = ["a.weight", "b.weight"]


def good(scale=1e-3):
    g = torch.Generator().manual_seed(0)
    return {"a.weight": (scale * torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g)),
            "b.weight": (scale * torch.randn(4, 4, generator=g), torch.randn(4, 6, generator=g))}


def test_a_sound_upload_passes():
    assert check_result(good(), {"a.bias": torch.zeros(6)}, W, MAIN, max_delta_ratio=5.0) is None


def test_wrong_keys_shapes_and_non_finite_values_are_named():
    f = good()
    del f["b.weight"]
    assert "expected 2" in check_result(f, {}, W, MAIN)
    f = good()
    f["a.weight"] = (f["a.weight"][0][:-1], f["a.weight"][1])
    assert "do not fit weight (6, 5)" in check_result(f, {}, W, MAIN)
    f = good()
    f["b.weight"] = (f["b.weight"][0], f["b.weight"][1] * float("inf"))
    assert "NaN or Inf" in check_result(f, {}, W, MAIN)
    assert "replica a.bias" in check_result(good(), {"a.bias": torch.full((6,), float("nan"))}, W, MAIN)
    assert "unknown or wrong shape" in check_result(good(), {"a.weight": torch.zeros(6, 5)}, W, MAIN)


def test_delta_norm_bound():
    assert check_result(good(scale=10.0), {}, W, MAIN, max_delta_ratio=None) is None
    why = check_result(good(scale=10.0), {}, W, MAIN, max_delta_ratio=5.0)
    assert why and "x the weight norm (bound 5)" in why


def test_delta_norm_matches_the_dense_product():
    u, v = torch.randn(30, 6), torch.randn(6, 20)
    assert abs(delta_norm(u, v) - (u @ v).norm().item()) < 1e-4
