"""Heads that keep int8/nf4 main weights packed compute what dense heads compute, with fewer bytes."""

import pytest
import torch

from lte_ray.config import ConfigError
from lte_ray.core import quant
from lte_ray.core.head import Head
from lte_ray.core.master import MasterWeights
from lte_ray.core.simulate import simulate
from lte_ray.data import load_data


@pytest.mark.parametrize("method,max_ratio", [("int8", 0.3), ("nf4", 0.16)])
def test_packed_weights_dequantize_exactly_like_unpack(method, max_ratio):
    torch.manual_seed(0)
    state = {"a": torch.randn(96, 288), "b": torch.randn(10, 7), "c": torch.randn(384, 96), "bias": torch.randn(5)}
    payload = quant.pack(state, ["a", "b", "c"], method)
    dense = quant.unpack(payload)
    packed = quant.packed_weights(payload)
    assert set(packed) == {"a", "b", "c"}
    for key, w in packed.items():
        assert torch.equal(w.dequantize(), dense[key])
    assert packed["a"].nbytes <= max_ratio * state["a"].numel() * 4


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_head_keeping_packed_weights_trains_like_a_dense_head(tiny_cfg, method):
    runs = {keep: simulate(tiny_cfg(**{"lte.quant": method, "lte.keep_quantized": keep, "train.rounds": 3}))
            for keep in (False, True)}
    for key, dense in runs[False].state.items():
        assert torch.allclose(runs[True].state[key], dense, atol=1e-4), key
    assert runs[True].final["eval_loss"] == pytest.approx(runs[False].final["eval_loss"], rel=1e-4)


def test_a_packed_head_holds_no_fp32_main_weight(tiny_cfg):
    cfg = tiny_cfg(**{"lte.quant": "nf4", "lte.keep_quantized": True})
    data = load_data(cfg.data, cfg.model)
    head = Head(cfg, 0, data)
    head.receive(MasterWeights(cfg, data).broadcast(full=True))
    layers = {n: m for n, m in head.model.named_modules() if hasattr(m, "packed")}
    assert layers and all(m.packed is not None and m.weight is None for m in layers.values())
    assert not {f"{n}.weight" for n in layers} & set(head.model.state_dict())


def test_keep_quantized_without_quantization_is_a_config_error(tiny_cfg):
    with pytest.raises(ConfigError, match="lte.keep_quantized: needs lte.quant int8 or nf4"):
        tiny_cfg(**{"lte.quant": "none", "lte.keep_quantized": True})
