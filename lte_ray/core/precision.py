"""The numeric precision of training steps: fp32, TF32 matmuls (CUDA), or bf16 autocast.

`train.precision` picks it; `auto` is TF32 on CUDA and fp32 on the CPU. TF32 is a CUDA
tensor-core format, so on the CPU `tf32` computes in fp32. Under bf16 only the forward is
autocast (torch's own mixed precision): parameters (main weights, LoRA factors), their
gradients and optimizer state stay fp32, and so do the merge and evaluation, which never run
under autocast.
"""

from __future__ import annotations

import contextlib

import torch


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a step on `device` actually uses: fp32, tf32 or bf16."""
    if requested == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if requested == "tf32" and device.type != "cuda":
        return "fp32"
    return requested


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """TF32 for fp32 matmuls on CUDA under tf32 and bf16 (what autocast leaves in fp32), full
    fp32 otherwise. Process-wide in torch, so set it for every run, back to fp32 too."""
    torch.set_float32_matmul_precision("high" if device.type == "cuda" and precision != "fp32" else "highest")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a training forward runs in."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
