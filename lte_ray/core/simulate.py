"""All heads in one process, round by round: the reference semantics of LTE, a no-Ray mode,
and the baselines a user compares against, under the same data, evaluation and sample budget.

* lte:        N heads, each on its own batches, merged every T steps.
* lora:       one head of rank r with batch N*b, quantization off. A single reset-less head's
              merge leaves the function unchanged, so this is exactly LoRA on the initial weights.
* lora-merge: one head with batch N*b whose factors (and their optimizer state) are reset at
              every merge: ReLoRA-style, each merge adds a new rank-r update.
* full:       full-rank training of all weights with batch N*b and lr `train.full_lr`
              (default s * lr: under Adam the main weights of LTE move about s * lr per step).
* galore:     full-rank training as above, but the targeted weight matrices' gradients are
              projected to rank r by GaLore (galore-torch's GaLoreAdamW), the projection refreshed
              every T steps and scale 1, so the step size is the full-rank one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lte_ray.config import Config
from lte_ray.core.head import Head, HeadResult, lr_schedule, train_steps
from lte_ray.core.master import MasterWeights
from lte_ray.core.optim import make_optimizer
from lte_ray.core.task import evaluate, resolve_device
from lte_ray.data import DataBundle, batch_stream, load_data
from lte_ray.models import build_model

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    method: str
    rounds: int
    heads: int
    samples_seen: int
    wall_seconds: float
    final: dict[str, float]  # the last evaluation
    history: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # final merged weights
    extra: dict[str, Any] = field(default_factory=dict)  # backend counters (bytes, heads joined/lost)


def as_lte(cfg: Config) -> Config:
    """The LoRA baselines as the LTE special cases they are (see the module docstring)."""
    if cfg.method not in ("lora", "lora-merge"):
        return cfg
    return cfg.replace({
        "lte.heads": 1,
        "train.batch_size": cfg.train.batch_size * cfg.lte.heads,
        "lte.mode": "resetless" if cfg.method == "lora" else "reset",
        "lte.quant": "none" if cfg.method == "lora" else cfg.lte.quant,
        "train.rounds": cfg.rounds, "train.total_samples": None,
    })


class History:
    """Per-round records; calls `on_round` with each one (progress bars, trackers)."""

    def __init__(self, cfg: Config, on_round: RoundCallback | None):
        self.cfg, self.on_round = cfg, on_round
        self.records: list[dict[str, Any]] = []
        self.samples_seen = 0
        self.start = time.perf_counter()

    def eval_due(self, round_idx: int) -> bool:
        return (round_idx + 1) % self.cfg.train.eval_every == 0 or round_idx + 1 == self.cfg.rounds

    def add(self, round_idx: int, samples: int, head_losses: dict[int, float], evals: dict[str, float] | None,
            **extra: Any) -> dict[str, Any]:
        self.samples_seen += samples
        losses = list(head_losses.values())
        rec = {"round": round_idx + 1, "rounds": self.cfg.rounds, "samples_seen": self.samples_seen,
               "train_loss": sum(losses) / len(losses), "head_losses": {str(k): v for k, v in head_losses.items()},
               "elapsed": time.perf_counter() - self.start, **extra, **(evals or {})}
        self.records.append(rec)
        if self.on_round:
            self.on_round(rec)
        return rec

    def last_eval(self) -> dict[str, float]:
        for rec in reversed(self.records):
            if "eval_loss" in rec:
                return {k: v for k, v in rec.items() if k.startswith("eval_")}
        return {}


def simulate(cfg: Config, on_round: RoundCallback | None = None, data: DataBundle | None = None) -> RunResult:
    """Run `cfg` (any method) in this process and return the final metrics and weights."""
    data = data if data is not None else load_data(cfg.data, cfg.model)
    if cfg.method in ("full", "galore"):
        return _full_rank(cfg, data, on_round)
    run_cfg = as_lte(cfg)
    device = resolve_device(cfg.train.device)
    master = MasterWeights(run_cfg, data, device)
    heads = [Head(run_cfg, i, data, device) for i in range(run_cfg.lte.heads)]
    history = History(run_cfg, on_round)
    for r in range(run_cfg.rounds):
        payload = master.broadcast(full=r == 0)
        results: list[HeadResult] = [h.train_round(r, payload) for h in heads]
        master.merge(results)
        history.add(r, sum(x.samples for x in results), {x.head_id: x.loss for x in results},
                    master.evaluate() if history.eval_due(r) else None, active_heads=len(results))
    return RunResult(cfg.method, run_cfg.rounds, run_cfg.lte.heads, history.samples_seen,
                     time.perf_counter() - history.start, history.last_eval(), history.records, master.state)


def _full_rank(cfg: Config, data: DataBundle, on_round: RoundCallback | None) -> RunResult:
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec).to(device)
    batch = cfg.train.batch_size * cfg.lte.heads
    stream = batch_stream(data, batch, cfg.train.seed)
    lr = cfg.train.full_lr or cfg.lte.scaling * cfg.train.lr
    if cfg.method == "galore":
        opt = _galore_optimizer(model, cfg, lr)
    else:
        opt = make_optimizer(model.parameters(), cfg.train.optimizer, lr, cfg.train.weight_decay)
    lr_at = lr_schedule(cfg, lr)
    history = History(cfg, on_round)
    t = cfg.lte.merge_every
    for r in range(cfg.rounds):
        loss = train_steps(model, opt, data, stream, range(r * t, (r + 1) * t), lr_at, device, cfg.train.grad_clip)
        evals = evaluate(model, data.test, data.spec.task, device) if history.eval_due(r) else None
        history.add(r, t * batch, {0: loss}, evals, active_heads=1)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return RunResult(cfg.method, cfg.rounds, 1, history.samples_seen, time.perf_counter() - history.start,
                     history.last_eval(), history.records, state)


def _galore_optimizer(model: torch.nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    import warnings

    from galore_torch import GaLoreAdamW

    from lte_ray.core.lora import main_weight_keys

    projected = set(main_weight_keys(model, cfg.lte.targets))
    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if n not in projected]},
              {"params": [p for n, p in params.items() if n in projected], "rank": cfg.lte.rank,
               "update_proj_gap": cfg.lte.merge_every, "scale": 1.0, "proj_type": "std"}]
    with warnings.catch_warnings():  # its AdamW (from transformers) warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return GaLoreAdamW(groups, lr=lr, weight_decay=cfg.train.weight_decay)
