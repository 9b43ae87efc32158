"""`lte-ray bench system`'s worker rows: one worker's memory at its backward peak and its step time.

Memory is counted from the tensors themselves, so it is exact on any device: weights, LoRA
factors and snapshots, gradients, optimizer state, and the activations autograd saved for
backward (allocator slack and transient workspaces are not in it; on CUDA the allocator's
measured peak is reported beside it: `torch.cuda.max_memory_allocated` during the step, less
what was allocated before it, plus the worker's own resident weights, factors and optimizer
state, so the other workers alive on the same GPU are not counted). With activation
checkpointing, autograd keeps only what lies outside the checkpointed blocks plus each block's
input, and recomputes one block at a time in backward: the row adds the largest block's
recomputed activations to what was kept.

Rows: an LTE head with fp32, int8 and nf4 main weights (int8/nf4 kept packed) against a
full-rank AdamW worker with the same per-worker batch, for each precision x checkpointing
setting asked for. Step time is the median of a few timed optimizer steps of each worker, the
workers of a setting taking turns step by step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable

import torch
from torch import nn

from lte_ray.config import Config
from lte_ray.datasets import DataBundle

HEADS = [("LTE head, fp32 main weights", "none", False),
         ("LTE head, int8 main weights (kept packed)", "int8", True),
         ("LTE head, nf4 main weights (kept packed)", "nf4", True)]
FULL_RANK = "full-rank worker, AdamW"


def _storages(tensors: Iterable[Any]) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _largest_block(model: nn.Module, loss_of, exclude: set[int]) -> int:
    """Bytes one block saves for backward, for the largest block: what checkpointing recomputes
    at once. Measured on a forward without checkpointing, each saved tensor charged to the block
    that was running (its input, which the checkpoint keeps anyway, is not charged again)."""
    from lte_ray.models import set_activation_checkpointing

    per_block: dict[int, list[torch.Tensor]] = {}
    inputs: dict[int, int] = {}
    running: list[int] = []

    def enter(i: int):
        def hook(module, args):
            running.append(i)
            inputs[i] = args[0].untyped_storage().data_ptr()
        return hook

    def leave(module, args, out) -> None:  # returns None: a forward hook's value would replace the output
        running.pop()

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))
    set_activation_checkpointing(model, False)
    try:
        pack = lambda t: (per_block.setdefault(running[-1], []).append(t) if running else None) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_of()
    finally:
        set_activation_checkpointing(model, True)
        for h in handles:
            h.remove()
    return max((sum(n for p, n in _storages(ts).items() if p not in exclude and p != inputs[i])
                for i, ts in per_block.items()), default=0)


def step_memory(model: nn.Module, opt: torch.optim.Optimizer, batch, packed: list, device: torch.device,
                precision: str, checkpointing: bool) -> dict[str, int]:
    """Run one optimizer step and count the bytes alive at the backward peak, by kind."""
    from lte_ray.core.lora import is_lora_key
    from lte_ray.core.precision import autocast
    from lte_ray.core.task import loss_fn

    x, y = (t.to(device) for t in batch)

    def loss_of() -> torch.Tensor:
        with autocast(precision, device):
            return loss_fn(model, x, y)

    saved: list[torch.Tensor] = []
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":  # other workers' tensors live on the same GPU: count only what this step adds
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = loss_of()
    loss.backward()
    opt.step()
    named = dict(model.named_parameters())
    kinds = {
        "weights": _storages([*(p for n, p in named.items() if not is_lora_key(n)),
                              *(b for n, b in model.named_buffers() if not is_lora_key(n)),
                              *(t for w in packed for t in w.tensors())]),
        "lora_factors": _storages([*(p for n, p in named.items() if is_lora_key(n)),
                                   *(b for n, b in model.named_buffers() if is_lora_key(n))]),
        "gradients": _storages([p.grad for p in named.values()]),
        "optimizer_state": _storages([v for st in opt.state.values() for v in st.values()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0]),
    }
    seen = {ptr for k in kinds.values() for ptr in k} | {x.untyped_storage().data_ptr()}
    out = {k: sum(v.values()) for k, v in kinds.items()}
    out["activations"] = sum(n for p, n in _storages(saved).items() if p not in seen)
    # the allocator's peak during the step, over this worker's own resident tensors; read before
    # _largest_block, whose forward without checkpointing would set a peak of its own
    peak = torch.cuda.max_memory_allocated() - allocated_before if device.type == "cuda" else None
    if checkpointing:
        out["activations"] += _largest_block(model, loss_of, seen)
    out["total"] = sum(out.values())
    if peak is not None:
        out["cuda_peak_allocated"] = peak + out["weights"] + out["lora_factors"] + out["optimizer_state"]
    return out


def step_seconds(workers: list[tuple[nn.Module, torch.optim.Optimizer, Any]], device: torch.device,
                 precision: str, steps: int = 7) -> list[float]:
    """Median wall time of `steps` optimizer steps of each (model, optimizer, batches) worker,
    after one untimed step each. The workers take turns, one step at a time, so a slow spell of
    the machine falls on all of them alike instead of on whichever was being timed."""
    from lte_ray.core.head import train_steps

    times: list[list[float]] = [[] for _ in workers]
    for _ in range(steps + 1):
        for own, (model, opt, batches) in zip(times, workers):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_steps(model, opt, batches, range(1), lambda step: opt.param_groups[0]["lr"], device, None,
                        precision)
            if device.type == "cuda":
                torch.cuda.synchronize()
            own.append(time.perf_counter() - start)
    return [statistics.median(own[1:]) for own in times]


def worker_rows(cfg: Config, data: DataBundle, precisions: list[str], checkpointing: list[bool],
                timed_steps: int = 7) -> list[dict[str, Any]]:
    """For each setting, one LTE head per main-weight format and a full-rank AdamW worker."""
    from lte_ray.batches import training_batches
    from lte_ray.core.head import Head, train_steps
    from lte_ray.core.master import MasterWeights
    from lte_ray.core.optim import make_optimizer
    from lte_ray.core.precision import resolve_precision, set_matmul_precision
    from lte_ray.core.task import resolve_device
    from lte_ray.models import build_model, set_activation_checkpointing

    device = resolve_device(cfg.train.device)
    rows = []
    for requested in precisions:
        precision = resolve_precision(requested, device)
        for ckpt in checkpointing:
            setting = {"precision": precision, "activation_checkpointing": ckpt}
            group, workers = [], []
            for label, quant, keep in HEADS:
                c = cfg.replace({"lte.quant": quant, "lte.keep_quantized": keep, "train.precision": precision,
                                 "train.activation_checkpointing": ckpt})
                master, head = MasterWeights(c, data), Head(c, 0, data, device)
                broadcast = master.broadcast(full=True)
                head.receive(broadcast)
                train_steps(head.model, head.opt, head.batches, range(1), head.lr_at, device, None, precision)
                head.receive(broadcast)  # a round's start: optimizer state exists, snapshot folded
                packed = [m.packed for m in head.model.modules() if getattr(m, "packed", None) is not None]
                mem = step_memory(head.model, head.opt, next(head.batches), packed, device, precision, ckpt)
                group.append({"label": label, "quant": quant, **setting, **mem})
                workers.append((head.model, head.opt, head.batches))
            set_matmul_precision(precision, device)  # as `core.baselines.full_rank` does
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg.model, data.spec).to(device)
            set_activation_checkpointing(model, ckpt)
            opt = make_optimizer(model.parameters(), "adamw", cfg.full_rank_lr, cfg.train.weight_decay)
            batches = training_batches(data, cfg.train.batch_size, cfg.train.seed)
            train_steps(model, opt, batches, range(1), lambda step: cfg.full_rank_lr, device, None, precision)
            mem = step_memory(model, opt, next(batches), [], device, precision, ckpt)
            group.append({"label": FULL_RANK, "quant": "none", **setting, **mem})
            workers.append((model, opt, batches))
            for r, secs in zip(group, step_seconds(workers, device, precision, timed_steps)):
                r["step_seconds"] = secs
            for r in group:
                r["ratio_to_full_rank"] = r["total"] / group[-1]["total"]
                r["step_ratio_to_full_rank"] = r["step_seconds"] / group[-1]["step_seconds"]
                r["activations_ratio_to_full_rank"] = r["activations"] / max(1, group[-1]["activations"])
            rows += group
    return rows
