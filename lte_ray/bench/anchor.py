"""Anchor throughput: k LoRA heads simulated in one process by the official LTE code.

What it measures: samples/s, median step time and CUDA peak memory of `heads` LTE heads on OUR
model (`lte_ray.models.build_model`), trained as the paper authors' implementation
(github.com/minyoungg/LTE) trains them: `lte.prepare_model_for_lte` in its default "ddp" mode
(reset-less LTE: one shared main weight whose forward runs once over the whole (heads*B, ...)
batch; every head's factors in one batched matmul; head i takes the i-th contiguous slice of
the batch; the caller merges the mean delta every T steps with `lte.misc.merge.MergeCondition`).
Beside our Ray heads on the same GPU it is the reference for what batching heads in one process
buys. Hand-written because it drives research code that has no benchmark API; the code is
imported at run time from a checkout (`src`), never copied into this repository.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lte_ray.config import Config
from lte_ray.datasets import DataBundle
from lte_ray.errors import UserError


class _CfgNode(dict):
    """Stand-in for `yacs.config.CfgNode` (a dict with attribute access), the one yacs feature
    `lte.config.LTEConfig` uses."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _einops_unused(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("einops stand-in: install einops for lte.misc's conv/attention helpers")


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules the `lte` package imports at import time beyond torch and numpy, for those not
    installed: yacs (its config) and einops (helpers this benchmark does not call)."""
    out: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("yacs") is None:
        yacs, cfg = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        cfg.CfgNode = _CfgNode  # type: ignore[attr-defined]
        yacs.config = cfg  # type: ignore[attr-defined]
        out.update({"yacs": yacs, "yacs.config": cfg})
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")
        einops.rearrange = _einops_unused  # type: ignore[attr-defined]
        out["einops"] = einops
    return out


def import_official_lte(src: str) -> tuple[types.ModuleType, list[str]]:
    """The official `lte` package from checkout `src`, and the missing dependencies stood in for
    while it was imported (they leave sys.modules again right after)."""
    if not (Path(src) / "lte" / "__init__.py").is_file():
        raise UserError(f"anchor: no official LTE checkout at {src} (expected {src}/lte/__init__.py)")
    added = src not in sys.path
    if added:  # only for the import: a module of the checkout must not shadow an installed one later
        sys.path.insert(0, src)
    shims = _stand_ins()
    sys.modules.update(shims)
    try:
        lte = importlib.import_module("lte")
        importlib.import_module("lte.misc.merge")
    except Exception as e:  # noqa: BLE001 (any failure of foreign code is the same user problem)
        raise UserError(f"anchor: cannot import the official lte package from {src}: {e!r}") from None
    finally:
        for name in shims:
            sys.modules.pop(name, None)
        if added:
            sys.path.remove(src)
    return lte, sorted(n for n in shims if "." not in n)


def source_commit(src: str) -> str | None:
    """The checkout's commit: `git rev-parse HEAD` in a clone, or a COMMIT file beside an export."""
    marker = Path(src) / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip() or None
    if not (Path(src) / ".git").exists():  # else git would answer with the enclosing repository's commit
        return None
    try:
        out = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _replica_modules(model: nn.Module) -> list[nn.Module]:
    """Non-Linear modules owning parameters (norms, embeddings, the patch conv) and no Linear:
    the official code's "replica layers", one copy per head, averaged at each merge (our
    `lte.replicas: average`). Parameters of the root itself (pos_embed, cls_token) cannot be
    replicated by it and stay one shared parameter."""
    return [m for name, m in model.named_modules()
            if name and not isinstance(m, nn.Linear) and any(True for _ in m.parameters(recurse=False))
            and not any(isinstance(c, nn.Linear) for c in m.modules())]


def batched_heads_throughput(cfg: Config, data: DataBundle, heads: int, steps: int, src: str,
                             device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Time `steps` optimizer steps of `heads` official LTE heads (rank `cfg.lora_rank`, alpha
    `cfg.lora_alpha`, merge every `cfg.lte.merge_every` steps), `cfg.train.batch_size` samples
    per head, in the official "ddp" mode (batched heads)."""
    from lte_ray.batches import training_batches
    from lte_ray.bench.gpu_profile import timed
    from lte_ray.core.head import train_steps
    from lte_ray.core.precision import resolve_precision, set_matmul_precision
    from lte_ray.models import build_model, set_activation_checkpointing

    if heads < 1 or steps < 1:
        raise UserError(f"anchor: heads and steps must be >= 1 (got {heads}, {steps})")
    lte, stand_ins = import_official_lte(src)
    precision = resolve_precision(precision, device)
    set_matmul_precision(precision, device)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec).to(device)  # the official README converts a model already on the GPU
    replicas = _replica_modules(model) if cfg.lte.replicas == "average" else []
    if cfg.lte.replicas == "frozen":
        for m in model.modules():
            if not isinstance(m, nn.Linear):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    with warnings.catch_warnings():  # strict=False: root parameters stay shared (see _replica_modules)
        warnings.simplefilter("ignore")
        model = lte.prepare_model_for_lte(
            model, lte.LTEConfig.default(lora_r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, num_heads=heads),
            replica_layers=replicas, mode="ddp", strict=False)
    model = model.to(device)
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    factors = [p for n, p in named if "lora_" in n]
    others = [p for n, p in named if "lora_" not in n]
    groups: list[dict[str, Any]] = [{"params": factors}]
    if others:
        groups.append({"params": others, "lr_scale": cfg.replica_lr / cfg.factor_lr})
    opt = torch.optim.AdamW([{**g, "lr": cfg.factor_lr * g.get("lr_scale", 1.0)} for g in groups],
                            lr=cfg.factor_lr, weight_decay=cfg.train.weight_decay)
    merger = lte.misc.merge.MergeCondition(model, merge_steps=cfg.lte.merge_every)
    batches = training_batches(data, heads * cfg.train.batch_size, cfg.train.seed,
                               pin_memory=device.type == "cuda")
    def lr_at(step: int) -> float:  # constant: no schedule in a throughput run
        return cfg.factor_lr

    def step() -> None:
        train_steps(model, opt, batches, range(1), lr_at, device, cfg.train.grad_clip, precision)
        merger.step()  # the official merge trigger: merges every LTE and replica layer every T calls

    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed(step, device) for _ in range(steps)]
    per_step = heads * cfg.train.batch_size
    return {
        "heads": heads, "rank": cfg.lora_rank, "steps": steps, "per_head_batch": cfg.train.batch_size,
        "samples_per_s": per_step * steps / sum(times),  # merges included, as they fall in the timed steps
        "step_seconds": statistics.median(times),
        "cuda_peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "source_commit": source_commit(src),
        "mode": "ddp", "merge_every": cfg.lte.merge_every, "precision": precision,
        "lte_layers": sum(isinstance(m, lte.LTELayer) for m in model.modules()),
        "replica_layers": len(replicas), "stand_ins": stand_ins,
    }
