"""Full-rank baselines in one process: one worker trains every weight, with a batch as large as
all heads' together (`heads x batch_size`) and the same steps, schedule, evaluation points and
sample budget as LTE. The optimizer is what tells the methods apart (`core.methods`):

* AdamW (or SGD, `train.optimizer`) on all weights, lr `train.full_lr` (default s * lr: under
  Adam the main weights of LTE move about s * lr per step).
* GaLore (galore-torch's GaLoreAdamW): the targeted weight matrices' gradients projected to
  rank r, the projection refreshed every T steps, scale 1, so the step size is the full-rank one.
* Fira (`core.fira`): GaLore's projection, plus the rest of the gradient scaled by Adam's norm
  ratio and growth-limited, so every direction moves with rank-r optimizer state.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from lte_ray.batches import training_batches
from lte_ray.config import Config
from lte_ray.core.head import train_steps
from lte_ray.core.history import History, RoundCallback
from lte_ray.core.lora import main_weight_keys
from lte_ray.core.optim import lr_schedule, make_optimizer
from lte_ray.core.precision import resolve_precision, set_matmul_precision
from lte_ray.core.protocol import RunResult
from lte_ray.core.task import evaluate, resolve_device
from lte_ray.datasets import DataBundle
from lte_ray.models import build_model, set_activation_checkpointing

OptimizerFactory = Callable[[nn.Module, Config, float], torch.optim.Optimizer]  # (model, config, lr)


def plain(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """`train.optimizer` (AdamW by default) on every weight."""
    return make_optimizer(model.parameters(), cfg.train.optimizer, lr, cfg.train.weight_decay)


def _projected_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """The targeted weights, projected to rank `Config.lora_rank` (refreshed every `lte.merge_every`
    steps, scale 1), and every other parameter. The default targets leave the output layer out, as
    GaLore's own recipe projects only the blocks' layers."""
    projected = set(main_weight_keys(model, cfg.lte.targets))
    params = dict(model.named_parameters())
    return [{"params": [p for n, p in params.items() if n not in projected]},
            {"params": [p for n, p in params.items() if n in projected], "rank": cfg.lora_rank,
             "update_proj_gap": cfg.lte.merge_every, "scale": 1.0, "proj_type": "std"}]


def galore(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """GaLoreAdamW on the projected groups; every other parameter plain AdamW."""
    import warnings

    from galore_torch import GaLoreAdamW

    with warnings.catch_warnings():  # its AdamW (from transformers) warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return GaLoreAdamW(_projected_groups(model, cfg), lr=lr, weight_decay=cfg.train.weight_decay)


def fira(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """Fira (`core.fira`) on the same projected groups as GaLore."""
    from lte_ray.core.fira import FiraAdamW

    return FiraAdamW(_projected_groups(model, cfg), lr=lr, weight_decay=cfg.train.weight_decay)


OPTIMIZERS: dict[str, OptimizerFactory] = {"plain": plain, "galore": galore, "fira": fira}


def full_rank(cfg: Config, data: DataBundle, optimizer: OptimizerFactory,
              on_round: RoundCallback | None = None) -> RunResult:
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    set_matmul_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec).to(device)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    batch = cfg.train.batch_size * cfg.lte.heads
    batches = training_batches(data, batch, cfg.train.seed, pin_memory=device.type == "cuda",
                               shift=cfg.data.augment_shift)
    lr = cfg.full_rank_lr
    opt = optimizer(model, cfg, lr)
    lr_at = lr_schedule(cfg, lr)
    history = History(cfg, on_round)
    t = cfg.lte.merge_every
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        loss = train_steps(model, opt, batches, range(r * t, (r + 1) * t), lr_at, device, cfg.train.grad_clip,
                           precision)
        t_train = time.perf_counter() - t0
        evals = evaluate(model, data.test, data.spec.task, device) if history.eval_due(r) else None
        history.add(r, t * batch, {0: loss}, evals, head_seconds=t_train, round_seconds=time.perf_counter() - t0,
                    evaluation_seconds=time.perf_counter() - t0 - t_train)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return history.result(cfg.method, data.spec.task, cfg.rounds, 1, state)
