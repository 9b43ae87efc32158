"""DESIGN.md's exact identity: with a merge every step, the same batch for every head and SGD
with lr eta/N, LTE equals multi-head LoRA (y = W0 x + (s/N) sum_i B_i A_i x, SGD lr eta)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lte_ray.core import lora, merge

N, RANK, ALPHA, ETA, STEPS = 3, 2, 4.0, 0.05, 20


def two_layer_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)) for _ in range(STEPS)]


def run_lte(net: nn.Module):
    heads = []
    for i in range(N):
        h = copy.deepcopy(net)
        lora.to_lte(h, RANK, ALPHA, ["*"], resetless=True)
        lora.init_factors(h, torch.Generator().manual_seed(100 + i))
        lora.set_trainable(h, train_replicas=False)
        heads.append(h)
    init = [{n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in lora.lte_layers(h).items()}
            for h in heads]
    opts = [torch.optim.SGD([p for p in h.parameters() if p.requires_grad], lr=ETA / N) for h in heads]
    state = lora.shared_state(heads[0])
    for x, y in batches():
        for h, opt in zip(heads, opts):
            lora.load_shared_state(h, state)
            lora.snapshot(h)
            opt.zero_grad()
            F.mse_loss(h(x), y).backward()
            opt.step()
        state = merge.merge_round(state, [merge.head_delta(h) for h in heads], [])
    return state, init


def run_multihead_lora(net: nn.Module, init):
    """Reference written independently of lte_ray: one model, N LoRA heads summed, SGD lr eta."""
    layers = {"0": net[0], "2": net[2]}
    s = ALPHA / RANK
    factors = {n: [[init[i][n][0].clone().requires_grad_(), init[i][n][1].clone().requires_grad_()]
                   for i in range(N)] for n in layers}
    params = [t for n in layers for ab in factors[n] for t in ab]
    opt = torch.optim.SGD(params, lr=ETA)

    def linear(name, x):
        layer = layers[name]
        out = F.linear(x, layer.weight.detach(), layer.bias.detach())
        return out + (s / N) * sum((x @ a.T) @ b.T for a, b in factors[name])

    for x, y in batches():
        opt.zero_grad()
        F.mse_loss(linear("2", torch.tanh(linear("0", x))), y).backward()
        opt.step()
    with torch.no_grad():
        return {f"{n}.weight": layers[n].weight + (s / N) * sum(b @ a for a, b in factors[n]) for n in layers}


def test_lte_equals_multihead_lora_after_20_steps():
    net = two_layer_net()
    lte_state, init = run_lte(net)
    ref = run_multihead_lora(two_layer_net(), init)
    for key, w_ref in ref.items():
        diff = (lte_state[key] - w_ref).abs().max().item()
        assert diff < 1e-5, f"{key}: max abs diff {diff:.2e}"
        # and the weights really moved, so the comparison is not vacuous
        assert (w_ref - net.get_parameter(key)).abs().max().item() > 1e-3
