"""Optimizer and learning-rate schedule (a function of the global step, so a head that joins
mid-run, or a resumed run, uses the same schedule as one that was there from the start)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch

if TYPE_CHECKING:
    from lte_ray.config import Config


def make_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], name: str, lr: float,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """`params`: parameters, or torch parameter groups; a group's "lr_scale" multiplies the
    scheduled learning rate for it (`set_lr`)."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [{**g, "lr": lr * g.get("lr_scale", 1.0)} for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
              min_ratio: float = 0.0) -> float:
    """Linear warmup, then constant or cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_schedule(cfg: "Config", lr: float) -> Callable[[int], float]:
    """The learning rate at each global step: `lr` times the config's warm-up and decay."""
    t = cfg.train
    warmup = t.warmup_rounds * cfg.lte.merge_every
    return lambda step: lr * lr_factor(step, cfg.total_steps, warmup, t.schedule, t.min_lr_ratio)


def decoupled_decay(cfg: "Config", round_idx: int) -> float:
    """What full-rank AdamW's decoupled weight decay multiplies a weight by over round
    `round_idx`'s T steps, at the full-rank rate and schedule: prod_t (1 - lr_t x weight_decay).
    LTE heads never hold W as a parameter, so the merge applies this to it (`lte.decay_main`)."""
    lr_at, t = lr_schedule(cfg, cfg.full_rank_lr), cfg.lte.merge_every
    return math.prod(1 - lr_at(step) * cfg.train.weight_decay for step in range(round_idx * t, (round_idx + 1) * t))
