"""Fira (Chen et al., 2024, arXiv 2410.01623): full-rank training under a low-rank constraint on
the optimizer state. A targeted weight's gradient G is projected as GaLore does (R = P^T G, the
projection P from G's SVD, refreshed every `update_proj_gap` steps) and Adam runs on R. The
part of G outside the projection, which GaLore drops, is applied too:

    psi(R)  = Adam's normalized step on R (m / (sqrt(v) + eps))
    phi     = ||psi(R)|| / ||R||, per column along the rank dimension (norm-based scaling)
    S_t     = phi * (G - P R)                                 (the residual, scaled like Adam's)
    S_t    <- S_t * gamma ||S_{t-1}|| / ||S_t||   if ||S_t|| > gamma ||S_{t-1}||   (norm-growth limiter)
    W      <- W - lr_t (P psi(R) + S_t)

Written here on galore-torch's projector rather than taken from PyPI `fira` 1.0.2: that package
imports `transformers` at import time (for a version check) and requires transformers,
bitsandbytes and tensorly, for one optimizer class. tests/test_fira.py checks a step
against the equations above.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

GROWTH_LIMIT = 1.01  # gamma: the paper's (and its code's) bound on the residual step's growth per step


class FiraAdamW(torch.optim.Optimizer):
    """AdamW whose parameter groups with a "rank" (and "update_proj_gap") take Fira's update;
    every other group is plain AdamW (decoupled weight decay, bias-corrected step size)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, growth_limit: float = GROWTH_LIMIT):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "growth_limit": growth_limit})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:  # torch's optimizer protocol: re-evaluate the loss first
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                projector = None
                if "rank" in group:
                    if "projector" not in state:
                        from galore_torch.galore_projector import GaLoreProjector

                        state["projector"] = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                             scale=1.0, proj_type="std")
                    projector = state["projector"]
                    low = projector.project(grad, state.get("step", 0))
                else:
                    low = grad
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(low, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
                normalized = m / (v.sqrt() + group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                if projector is None:
                    update = normalized
                else:
                    update = projector.project_back(normalized) + self._residual(state, grad, low, normalized,
                                                                                 group["growth_limit"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-step_size)
        return loss

    @staticmethod
    def _residual(state: dict[str, Any], grad: torch.Tensor, low: torch.Tensor, normalized: torch.Tensor,
                  growth_limit: float) -> torch.Tensor:
        """S_t: the gradient outside the projection, scaled by Adam's norm ratio and growth-limited."""
        rank_dim = 0 if low.shape[0] < low.shape[1] else 1  # the low-rank side of R (r x n or m x r)
        phi = normalized.norm(dim=rank_dim) / (low.norm(dim=rank_dim) + 1e-8)
        residual = (grad - state["projector"].project_back(low)) * phi.unsqueeze(rank_dim)
        norm = residual.norm()
        previous = state.get("residual_norm")
        if previous is not None and norm > growth_limit * previous:
            residual = residual * (growth_limit * previous / norm)
            norm = growth_limit * previous
        state["residual_norm"] = norm
        return residual
