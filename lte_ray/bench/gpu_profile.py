"""Where a head's time goes on a GPU (`lte-ray bench share`'s profile rows).

For one LTE head (as a Ray head runs it, in this process) and one full-rank AdamW worker at the
same per-worker batch: the wall time of a training step next to the time the GPU spent in
kernels during it and the number of kernels launched (torch.profiler), and for the head the
parts of a round: receive (unpack the broadcast, load, fold the snapshot: the default
reset-less mode), T steps, upload. The profiler slows what it watches: its wall times are
higher than the round parts', which are timed without it.
A step whose kernels keep the GPU busy for a small part of its wall time is bound by Python and
kernel launches, not by the GPU: more processes on the GPU then mostly queue behind each other.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from lte_ray.config import Config
from lte_ray.datasets import DataBundle


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds `fn` took, its CUDA work included (synchronised before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def kernel_profile(step: Callable[[], Any], device: torch.device, steps: int = 5) -> dict[str, float]:
    """Per step: wall ms, ms of GPU kernel time, and kernels launched (mean of `steps`)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = sum(timed(step, device) for _ in range(steps))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    return {"wall_ms": 1000 * wall / steps, "gpu_kernel_ms": busy_us / 1000 / steps,
            "kernels": len(kernels) / steps, "gpu_busy_share": busy_us / 1e6 / wall}


def full_rank_step(cfg: Config, data: DataBundle, batch: int, device: torch.device) -> tuple[Callable[[], Any], str]:
    """One optimizer step of a full-rank AdamW worker at `batch` (as the heads: precision, checkpointing),
    as a function, and the precision it runs at."""
    from lte_ray.batches import training_batches
    from lte_ray.core.head import train_steps
    from lte_ray.core.optim import make_optimizer
    from lte_ray.core.precision import resolve_precision, set_matmul_precision
    from lte_ray.models import build_model, set_activation_checkpointing

    precision = resolve_precision(cfg.train.precision, device)
    set_matmul_precision(precision, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec).to(device)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    opt = make_optimizer(model.parameters(), "adamw", cfg.full_rank_lr, cfg.train.weight_decay)
    batches = training_batches(data, batch, cfg.train.seed, pin_memory=device.type == "cuda")
    return (lambda: train_steps(model, opt, batches, range(1), lambda step: cfg.full_rank_lr, device,
                                cfg.train.grad_clip, precision)), precision


def profile_rows(cfg: Config, data: DataBundle, device: torch.device, rounds: int = 5) -> list[dict[str, Any]]:
    """An LTE head's round parts and step profile, and a full-rank worker's step profile."""
    from lte_ray.core.head import Head, train_steps
    from lte_ray.core.master import MasterWeights

    master, head = MasterWeights(cfg, data, device), Head(cfg, 0, data, device)
    broadcast = master.broadcast(full=True)
    parts: dict[str, list[float]] = {"receive_ms": [], "steps_ms": [], "upload_ms": []}
    t = cfg.lte.merge_every
    for r in range(rounds + 1):
        times = {"receive_ms": timed(lambda: head.receive(broadcast), device),
                 "steps_ms": timed(lambda: train_steps(head.model, head.opt, head.batches, range(r * t, (r + 1) * t),
                                                        head.lr_at, device, cfg.train.grad_clip, head.precision),
                                    device),
                 "upload_ms": timed(lambda: head.upload(None), device)}
        if r:  # the first round pays for kernels' first use
            for k, v in times.items():
                parts[k].append(1000 * v)
    one = range(1)
    lte_row = {"worker": "LTE head", "rank": cfg.lora_rank, "batch": cfg.train.batch_size,
               **{k: statistics.median(v) for k, v in parts.items()},
               **kernel_profile(lambda: train_steps(head.model, head.opt, head.batches, one, head.lr_at, device,
                                                    cfg.train.grad_clip, head.precision), device)}
    full_step, _ = full_rank_step(cfg, data, cfg.train.batch_size, device)
    full_row = {"worker": "full-rank AdamW", "rank": None, "batch": cfg.train.batch_size,
                **kernel_profile(full_step, device)}
    return [lte_row, full_row]
