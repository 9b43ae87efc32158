"""One LTE head: take a broadcast, run T local steps on its own batches, return its delta.

Its optimizer state stays here across rounds, never synchronized and, in reset-less mode,
never reset. A head is fully determined by (config, head_id): its factor init and its batch
stream are seeded from them, so it behaves the same in-process or in a Ray actor.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from torch import nn

from lte_ray.batches import Batch, training_batches
from lte_ray.config import Config
from lte_ray.core import lora, quant, upload
from lte_ray.core.optim import lr_schedule, make_optimizer, set_lr
from lte_ray.core.precision import autocast, resolve_precision, set_matmul_precision
from lte_ray.core.protocol import Broadcast, FactorUpload, HeadResult
from lte_ray.core.task import loss_fn, resolve_device
from lte_ray.data import load_data
from lte_ray.datasets import DataBundle
from lte_ray.models import build_model, set_activation_checkpointing


def head_seed(seed: int, head_id: int) -> int:
    """Seed of head `head_id`'s factor init and batches (distinct, reproducible)."""
    return seed * 1_000_003 + 7919 * (head_id + 1)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterator[Batch], steps: range,
                lr_at: Callable[[int], float], device: torch.device, grad_clip: float | None = None,
                precision: str = "fp32") -> float:
    """Run the optimizer over `steps` (global step numbers); returns the mean training loss."""
    model.train()
    total = torch.zeros((), device=device)
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in steps:
        set_lr(opt, lr_at(step))
        x, y = next(batches)
        with autocast(precision, device):  # the forward only; backward follows the forward's dtypes
            loss = loss_fn(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        total += loss.detach()
    return float(total) / max(1, len(steps))


class Head:
    """`loader_workers`: processes that decode image-folder batches ahead (see `lte_ray.batches`)."""

    def __init__(self, cfg: Config, head_id: int, data: DataBundle | None = None,
                 device: torch.device | str | None = None, loader_workers: int = 0):
        self.cfg, self.head_id = cfg, head_id
        self.device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        set_matmul_precision(self.precision, self.device)
        self.data = data if data is not None else load_data(cfg.data, cfg.model)
        seed = cfg.train.seed if cfg.data.same_batches else head_seed(cfg.train.seed, head_id)
        self.batches = training_batches(self.data, cfg.train.batch_size, seed, loader_workers,
                                        pin_memory=self.device.type == "cuda", shift=cfg.data.augment_shift)
        self.gen = torch.Generator().manual_seed(head_seed(cfg.train.seed, head_id))

        model = build_model(cfg.model, self.data.spec)
        lte = cfg.lte
        lora.to_lte(model, cfg.lora_rank, cfg.lora_alpha, lte.targets, resetless=lte.mode == "resetless",
                    output_as_replica=lte.output_as_replica)
        lora.init_factors(model, self.gen)
        lora.set_trainable(model, train_replicas=lte.replicas == "average")
        set_activation_checkpointing(model, cfg.train.activation_checkpointing)
        self.model = model.to(self.device)
        self.opt = make_optimizer(lora.param_groups(model, cfg.factor_lr, cfg.replica_lr), cfg.train.optimizer,
                                  cfg.factor_lr, cfg.train.weight_decay)
        self.lr_at = lr_schedule(cfg, cfg.factor_lr)
        self.rounds_done = 0
        self.last_round: int | None = None  # the round of its last upload
        self.received = False  # has it had a full broadcast yet?
        self.tamper: Callable[[nn.Module], None] | None = None  # fault injection: changes factors before upload
        quant.prepare(cfg.lte.quant)  # while the head starts, not in its first round

    def receive(self, broadcast: Broadcast, fresh: bool = False) -> None:
        """Start a round from the merged weights: the head's output now equals the merged model's.
        `fresh`: also restart from new factors and an empty optimizer state (the coordinator asks
        for it after rejecting this head's upload, e.g. for NaN: a head never stays poisoned)."""
        if not (broadcast.full or self.received):
            raise ValueError(f"head {self.head_id}: its first broadcast must carry the full state")
        if self.cfg.lte.keep_quantized:  # main weights stay packed; only the rest is unpacked
            state = {k: v.to(self.device) for k, v in broadcast.plain.items()}
            packed = quant.packed_weights(broadcast, self.device)
        else:
            state, packed = quant.unpack(broadcast, self.device), None
        lora.load_shared_state(self.model, state, partial=not broadcast.full, packed=packed)
        self.received = True
        if fresh:
            lora.init_factors(self.model, self.gen)
            self.opt.state.clear()
            self.last_round = None  # the coordinator holds nothing of these factors: the next upload sends all
        if self.cfg.lte.mode == "resetless":
            lora.snapshot(self.model)
            lora.fold(self.model)  # dense main weights: the snapshot term costs nothing per step
        elif self.rounds_done:  # reset: fresh factors and fresh optimizer state for them
            lora.init_factors(self.model, self.gen)
            for layer in lora.lte_layers(self.model).values():
                for p in (layer.lora_A, layer.lora_B):
                    self.opt.state.pop(p, None)

    def train_round(self, round_idx: int, broadcast: Broadcast, base_round: int | None = None,
                    fresh: bool = False) -> HeadResult:
        """`base_round`: the round whose uploaded factors the coordinator holds for this head (None:
        none); when it is this head's last round, only the factors' change goes up (`core.upload`).
        `fresh`: see `receive`."""
        start = time.perf_counter()
        self.receive(broadcast, fresh)
        t = self.cfg.lte.merge_every
        loss = train_steps(self.model, self.opt, self.batches, range(round_idx * t, (round_idx + 1) * t),
                           self.lr_at, self.device, self.cfg.train.grad_clip, self.precision)
        self.rounds_done += 1
        if self.tamper is not None:
            self.tamper(self.model)
        sent = self.upload(base_round)
        self.last_round = round_idx
        return HeadResult(
            head_id=self.head_id, round=round_idx, upload=sent, replicas=self.export_replicas(),
            loss=loss, samples=t * self.cfg.train.batch_size, seconds=time.perf_counter() - start)

    def upload(self, base_round: int | None) -> FactorUpload:
        layers = {f"{name}.weight": layer for name, layer in lora.lte_layers(self.model).items()}
        builds_on = base_round if base_round is not None and base_round == self.last_round else None
        return upload.export(layers, self.cfg.lte.upload, builds_on)

    def export_replicas(self) -> dict[str, torch.Tensor]:
        if self.cfg.lte.replicas != "average":
            return {}
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()
                if p.requires_grad and not lora.is_lora_key(n)}
