"""At the start of every round a head computes the merged model (the reset-less correction
cancels), and merging zero deltas leaves the weights unchanged."""

import pytest
import torch

from lte_ray.core import merge, quant
from lte_ray.core.head import Head
from lte_ray.core.lora import lte_layers
from lte_ray.core.master import MasterWeights
from lte_ray.data import load_data
from lte_ray.models import build_model


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("q,keep", [("none", False), ("int8", False), ("int8", True), ("nf4", False),
                                    ("nf4", True)])
@pytest.mark.parametrize("replicas", ["frozen", "average"])
def test_head_starts_every_round_at_the_merged_model(tiny_cfg, q, keep, replicas):
    """Dense main weights (folded snapshot) and packed ones (`keep`: snapshot term in forward)."""
    cfg = tiny_cfg(**{"lte.quant": q, "lte.replicas": replicas, "lte.keep_quantized": keep})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    heads = [Head(cfg, i, data, "cpu") for i in range(cfg.lte.heads)]
    x, _ = data.test.batch(torch.arange(64))
    for r in range(3):
        payload = master.broadcast(full=r == 0)
        # what the merged model computes with the weights the heads received
        reference = build_model(cfg.model, data.spec)
        reference.load_state_dict({**master.state, **quant.unpack(payload)})
        expected = _outputs(reference, x)
        for h in heads:
            h.receive(payload)
            got = _outputs(h.model, x)
            assert (got - expected).abs().max().item() < 1e-5, f"round {r}, head {h.head_id}"
        results = [h.train_round(r, payload, master.store.base_round(h.head_id)) for h in heads]
        # after local training the heads have moved away from the merged model
        assert (_outputs(heads[0].model, x) - expected).abs().max().item() > 1e-4
        accepted, rejected, _ = master.accept(results)
        assert not rejected and (r == 0 or all(x.upload.relative for x in results))  # rank r from round 2
        master.merge(accepted, r)


def test_merging_zero_deltas_leaves_weights_unchanged(tiny_cfg):
    cfg = tiny_cfg(**{"lte.quant": "none"})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    before = {k: v.clone() for k, v in master.state.items()}
    zero = {k: (torch.zeros(v.shape[0], 8), torch.zeros(8, v.shape[1])) for k, v in before.items()
            if k in master.quant_keys}
    after = merge.merge_round(master.state, [zero, zero, zero], [])
    assert all(torch.equal(after[k], before[k]) for k in before)

    # a head that has received the weights but not trained yet has a zero delta too
    head = Head(cfg, 0, data, "cpu")
    head.receive(master.broadcast(full=True))
    after = merge.merge_round(master.state, [merge.head_delta(head.model)], [])
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-6


def test_merge_is_the_mean_over_reporting_heads():
    w = {"w": torch.zeros(3, 4)}
    d1 = {"w": (torch.ones(3, 1), torch.ones(1, 4))}
    d2 = {"w": (3 * torch.ones(3, 1), torch.ones(1, 4))}
    assert torch.allclose(merge.apply_deltas(w, [d1, d2])["w"], torch.full((3, 4), 2.0))
    assert torch.allclose(merge.apply_deltas(w, [d1])["w"], torch.ones(3, 4))


def test_reset_mode_reinitializes_factors_each_round(tiny_cfg):
    cfg = tiny_cfg(**{"lte.mode": "reset", "lte.quant": "none"})
    data = load_data(cfg.data, cfg.model)
    master = MasterWeights(cfg, data)
    head = Head(cfg, 0, data, "cpu")
    res = head.train_round(0, master.broadcast(full=True))
    master.merge(master.accept([res]).accepted, 0)
    head.receive(master.broadcast())
    for layer in lte_layers(head.model).values():
        assert torch.count_nonzero(layer.lora_B) == 0
        assert not head.opt.state.get(layer.lora_A)


def test_first_round_payload_reuses_the_rounds_quantized_weights(tiny_cfg):
    cfg = tiny_cfg(**{"lte.quant": "nf4", "lte.replicas": "frozen"})
    master = MasterWeights(cfg, load_data(cfg.data, cfg.model))
    payload = master.broadcast()
    full = master.with_replicas(payload)
    assert not payload.full and full.full and full.quantized is payload.quantized
    restored = quant.unpack(full)
    assert set(restored) == set(master.state)
    assert all(torch.equal(restored[k], master.state[k]) for k in master.state if k not in master.quant_keys)


def test_merge_decay_is_what_adamw_does_to_an_untouched_weight(tiny_cfg):
    """`lte.decay_main`: the merge multiplies W by what torch's AdamW does over the round's T steps
    to a full-rank weight whose gradient is zero (decay only), at the full-rank rate and schedule."""
    from lte_ray.core.optim import decoupled_decay, lr_schedule, make_optimizer, set_lr

    cfg = tiny_cfg(**{"train.weight_decay": 0.1, "train.rounds": 6, "train.warmup_rounds": 2,
                      "lte.merge_every": 3, "train.full_lr": 0.05})
    w = torch.nn.Parameter(torch.randn(5, 5))
    start = w.detach().clone()
    opt = make_optimizer([w], "adamw", cfg.full_rank_lr, cfg.train.weight_decay)
    lr_at = lr_schedule(cfg, cfg.full_rank_lr)
    expected = start.clone()
    for r in range(cfg.rounds):
        for step in range(r * 3, r * 3 + 3):
            set_lr(opt, lr_at(step))
            w.grad = torch.zeros_like(w)
            opt.step()
        expected = expected * decoupled_decay(cfg, r)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=0)
    assert (w.detach().norm() / start.norm()).item() < 0.99  # it did decay

    data = load_data(cfg.data, cfg.model)
    for decay_main, kept in ((True, decoupled_decay(cfg, 4)), (False, 1.0)):
        master = MasterWeights(cfg.replace({"lte.decay_main": decay_main}), data)
        before = dict(master.state)
        master.merge([], 4)  # no head reported: only the decay
        for k, v in before.items():
            factor = kept if k in master.quant_keys else 1.0  # replicas: their heads' AdamW decays them
            torch.testing.assert_close(master.state[k], v * factor, rtol=0, atol=0)
