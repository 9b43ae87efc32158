"""Loss and evaluation for the two tasks: image classification and language modelling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lte_ray.core.protocol import Task
from lte_ray.errors import UserError


def headline_metric(task: Task) -> tuple[str, str]:
    """The metric a run of this task is judged on, and whether higher or lower is better: what
    Tune optimises, the progress bar shows and the MLflow plot draws."""
    return ("eval_loss", "min") if task == "lm" else ("eval_accuracy", "max")


def resolve_device(requested: str = "auto") -> torch.device:
    """CUDA where available (or asked for), else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: cuda was asked for but torch.cuda.is_available() is False")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: Task, device: torch.device | str,
             batch_size: int = 256) -> dict[str, float]:
    """Mean cross-entropy on the held-out split, plus accuracy (classify) or bits per token (lm)."""
    was_training = model.training
    model.eval()
    if task == "lm":
        indices = dataset.eval_indices()
    else:
        indices = torch.arange(len(dataset))
    total_loss, correct, count = 0.0, 0, 0
    for chunk in indices.split(batch_size):
        x, y = dataset.batch(chunk)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        flat, target = logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)
        total_loss += F.cross_entropy(flat, target, reduction="sum").item()
        correct += (flat.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    loss = total_loss / count
    if task == "lm":
        return {"eval_loss": loss, "eval_bits_per_token": loss / math.log(2), "eval_accuracy": correct / count}
    return {"eval_loss": loss, "eval_accuracy": correct / count}
