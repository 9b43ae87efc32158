import pickle

import pytest
import torch

from lte_ray.core import quant


@pytest.mark.parametrize("method, max_err, max_ratio", [("nf4", 0.1, 0.15), ("int8", 0.02, 0.3)])
@pytest.mark.parametrize("shape", [(512, 512), (384, 96), (1000, 37)])
def test_roundtrip_error_and_bytes(method, max_err, max_ratio, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    payload = quant.pack({"w": w}, ["w"], method)
    rep = quant.report({"w": w}, payload)["w"]
    assert rep["rel_error"] < max_err
    assert rep["ratio"] <= max_ratio
    assert quant.unpack(payload)["w"].shape == w.shape


@pytest.mark.parametrize("method", ["none", "int8", "nf4"])
def test_payload_is_plain_data_that_survives_pickling(method):
    state = {"w": torch.randn(64, 128), "bias": torch.randn(64)}
    payload = quant.pack(state, ["w"], method)
    again = quant.unpack(pickle.loads(pickle.dumps(payload)))
    first = quant.unpack(payload)
    assert all(torch.equal(again[k], first[k]) for k in state)
    assert torch.equal(first["bias"], state["bias"])  # non-quantized tensors travel exactly
    if method == "none":
        assert torch.equal(first["w"], state["w"])


def test_requantizing_from_the_master_does_not_accumulate_error():
    w = torch.randn(256, 256)
    once = quant.unpack(quant.pack({"w": w}, ["w"], "nf4"))["w"]
    again = quant.unpack(quant.pack({"w": w}, ["w"], "nf4"))["w"]
    assert torch.equal(once, again)
