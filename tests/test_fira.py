"""Fira (`core.fira`) against the paper's update rule (arXiv 2410.01623, Algorithm 1), written out
here step by step with the SVD projection, Adam on the projected gradient, the column-wise
norm-based scaling of the residual and the norm-growth limiter."""

import math

import pytest
import torch

from lte_ray.core.fira import GROWTH_LIMIT, FiraAdamW

BETAS, EPS, LR = (0.9, 0.999), 1e-8, 0.01


def paper_steps(w0: torch.Tensor, grads: list[torch.Tensor], rank: int, residual: bool = True) -> torch.Tensor:
    """W after Fira steps on `grads`, the projection taken from the first gradient (gap > steps)."""
    g0 = grads[0].double()
    u, _, vh = torch.linalg.svd(g0, full_matrices=False)
    tall = g0.shape[0] >= g0.shape[1]
    # Project on the smaller side: R = G P^T (m x r) for tall G, R = P^T G (r x n) for wide G.
    project = (lambda g: g @ vh[:rank].T) if tall else (lambda g: u[:, :rank].T @ g)
    back = (lambda r: r @ vh[:rank]) if tall else (lambda r: u[:, :rank] @ r)
    w, m, v, prev = w0.double().clone(), 0.0, 0.0, None
    for t, g in enumerate(grads, start=1):
        g = g.double()
        r = project(g)
        m = BETAS[0] * m + (1 - BETAS[0]) * r
        v = BETAS[1] * v + (1 - BETAS[1]) * r * r
        psi = m / (v.sqrt() + EPS)
        # phi_i = ||psi(R)_{:,i}|| / ||R_{:,i}||, over the rank dimension, one per row or column of G
        dim = 1 if tall else 0
        phi = psi.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        s = phi * (g - back(r))
        if prev is not None and s.norm() / prev > GROWTH_LIMIT:
            s = s / s.norm() * GROWTH_LIMIT * prev
        prev = s.norm()
        lr_t = LR * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
        w = w - lr_t * (back(psi) + (s if residual else 0))
    return w


@pytest.mark.parametrize("shape", [(6, 4), (4, 7)])
def test_fira_steps_follow_the_paper(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    # The third gradient is 10x larger: the limiter must act on it.
    grads = [torch.randn(shape), torch.randn(shape), 10 * torch.randn(shape), torch.randn(shape)]
    p = torch.nn.Parameter(w0.clone())
    opt = FiraAdamW([{"params": [p], "rank": 2, "update_proj_gap": 100}], lr=LR, betas=BETAS, eps=EPS)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = paper_steps(w0, grads, rank=2)
    assert torch.allclose(p.detach().double(), expected, atol=1e-5), (p.detach() - expected.float()).abs().max()
    # GaLore (no residual) ends elsewhere: Fira's extra term is really applied.
    assert (p.detach().double() - paper_steps(w0, grads, rank=2, residual=False)).abs().max() > 1e-3


def test_the_limiter_bounds_the_residual_step_growth():
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = FiraAdamW([{"params": [p], "rank": 2, "update_proj_gap": 100}], lr=LR)
    norms = []
    for scale in (1.0, 50.0, 50.0):
        p.grad = scale * torch.randn(8, 8)
        opt.step()
        norms.append(float(opt.state[p]["residual_norm"]))
    assert norms[1] <= GROWTH_LIMIT * norms[0] * (1 + 1e-6) and norms[2] <= GROWTH_LIMIT * norms[1] * (1 + 1e-6)


def test_unprojected_groups_are_plain_adamw():
    torch.manual_seed(2)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))
    b.data.copy_(a.data)
    fira, adamw = FiraAdamW([a], lr=LR, weight_decay=0.1), torch.optim.AdamW([b], lr=LR, weight_decay=0.1, eps=1e-8)
    for _ in range(3):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        fira.step()
        adamw.step()
    assert torch.allclose(a, b, atol=1e-6)
