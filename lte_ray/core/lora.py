"""The LTE parameterization of a torch model: targeted `nn.Linear` layers get a LoRA head.

For a targeted layer with main weight W (d_out x d_in) a head holds A (r x d_in, orthogonal,
scaled by sqrt(d_in/r)), B (d_out x r, zeros) and the snapshot (A_prev, B_prev) taken at the
last merge. With s = alpha / r the forward during local training is

    y = W x + b + s * B A x - s * B_prev A_prev x        (reset-less, the paper's default)

so at the start of every round the head computes exactly the merged model. In "reset" mode the
factors are re-initialized at every merge instead (B = 0), and there is no snapshot term.

The main weight keeps the name `<layer>.weight` and the bias `<layer>.bias`, so the model's
non-LoRA state dict has the same keys as the plain model's: that is the "shared state" the
coordinator owns and broadcasts.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

from lte_ray.errors import UserError

LORA_KEYS = ("lora_A", "lora_B", "lora_A_prev", "lora_B_prev")


class _PackedLinear(torch.autograd.Function):
    """x @ dequant(W)^T that keeps only the packed W: the fp32 weight is rebuilt in forward and
    again in backward (for the input gradient), never held between them (as QLoRA does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed) -> torch.Tensor:  # type: ignore[override]
        ctx.packed = packed
        return F.linear(x, packed.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad @ ctx.packed.dequantize().to(grad.dtype), None


class LTELinear(nn.Module):
    """A `nn.Linear` whose weight is frozen and moves only through merged LoRA deltas."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, resetless: bool = True):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling, self.resetless = rank, alpha / rank, resetless
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = base.bias  # a replica parameter: the policy decides if it trains
        factory = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.register_buffer("lora_A_prev", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B_prev", torch.zeros_like(self.lora_B))
        self.packed = None  # a quant.PackedWeight when the head keeps W quantized (lte.keep_quantized)

    def set_packed(self, packed) -> None:
        """Compute with this packed main weight from now on, and free the fp32 one."""
        self.packed = packed
        self.weight = None

    @torch.no_grad()
    def init_factors(self, generator: torch.Generator | None = None) -> None:
        """Paper init: A orthogonal scaled by sqrt(d_in / r), B = 0; snapshot = current."""
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)  # drawn on CPU: same on every device
        nn.init.orthogonal_(a, generator=generator)
        self.lora_A.copy_(a * math.sqrt(self.in_features / self.rank))
        self.lora_B.zero_()
        self.snapshot()

    @torch.no_grad()
    def snapshot(self) -> None:
        self.lora_A_prev.copy_(self.lora_A)
        self.lora_B_prev.copy_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = _PackedLinear.apply(x, self.packed)
            y = y + self.bias if self.bias is not None else y
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.resetless:
            a = torch.cat([self.lora_A, self.lora_A_prev])
            b = torch.cat([self.lora_B, -self.lora_B_prev], dim=1)
        else:
            a, b = self.lora_A, self.lora_B
        return y + self.scaling * F.linear(F.linear(x, a), b)

    @torch.no_grad()
    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U @ V = s * (B A - B_prev A_prev): rank <= 2r (r in reset mode)."""
        if not self.resetless:
            return self.scaling * self.lora_B, self.lora_A.clone()
        u = torch.cat([self.lora_B, self.lora_B_prev], dim=1) * self.scaling
        v = torch.cat([self.lora_A, -self.lora_A_prev])
        return u, v

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, resetless={self.resetless}")


def target_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the `nn.Linear` modules matched by any fnmatch pattern (e.g. "*", "blocks.*.mlp.*")."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(fnmatchcase(name, p) for p in patterns)]


def main_weight_keys(model: nn.Module, patterns: list[str]) -> list[str]:
    """State-dict keys of the main weights LTE trains (the rest of the state are replicas)."""
    return [f"{name}.weight" for name in target_names(model, patterns)]


def to_lte(model: nn.Module, rank: int, alpha: float, patterns: list[str], resetless: bool = True) -> list[str]:
    """Wrap every targeted `nn.Linear` in place; returns the wrapped layer names."""
    names = target_names(model, patterns)
    if not names:
        raise UserError(f"lte.targets: {patterns} match no nn.Linear layer of the model")
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LTELinear(getattr(parent, attr), rank, alpha, resetless))
    return names


def lte_layers(model: nn.Module) -> dict[str, LTELinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LTELinear)}


def init_factors(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh factors for every layer, in a fixed order, from one generator (a head's seed)."""
    for layer in lte_layers(model).values():
        layer.init_factors(generator)


def snapshot(model: nn.Module) -> None:
    for layer in lte_layers(model).values():
        layer.snapshot()


def set_trainable(model: nn.Module, train_replicas: bool) -> None:
    """Only LoRA factors train, plus the replica parameters when they are averaged."""
    lte_weights = {f"{n}.weight" for n in lte_layers(model)}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LORA_KEYS:
            p.requires_grad_(True)
        elif name in lte_weights:
            p.requires_grad_(False)
        else:
            p.requires_grad_(train_replicas)


def is_lora_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in LORA_KEYS


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Main weights + replica parameters/buffers: everything but the head's own factors."""
    return {k: v for k, v in model.state_dict().items() if not is_lora_key(k)}


def load_shared_state(model: nn.Module, state: dict[str, torch.Tensor], partial: bool = False,
                      packed: dict | None = None) -> None:
    """Load main weights + replicas; with `partial`, only the keys given (e.g. frozen replicas
    were loaded before and did not travel again). Main weights in `packed` (key ->
    quant.PackedWeight) stay packed in their layers instead."""
    packed = packed or {}
    for key, weight in packed.items():
        layer = model.get_submodule(key.rpartition(".")[0])
        if not isinstance(layer, LTELinear):
            raise KeyError(f"{key}: only LTE layers can keep a packed weight")
        layer.set_packed(weight)
    result = model.load_state_dict(state, strict=False)
    missing = [] if partial else [k for k in result.missing_keys if not is_lora_key(k) and k not in packed]
    if missing or result.unexpected_keys:
        raise KeyError(f"state does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
