"""The LTE parameterization of a torch model: targeted `nn.Linear` layers get a LoRA head.

For a targeted layer with main weight W (d_out x d_in) a head holds A (r x d_in, orthogonal,
scaled by sqrt(d_in/r)), B (d_out x r, zeros) and the snapshot (A_prev, B_prev) taken at the
last merge. With s = alpha / r the forward during local training is

    y = W x + b + s * B A x - s * B_prev A_prev x        (reset-less, the paper's default)

so at the start of every round the head computes exactly the merged model. A head with dense
main weights folds the snapshot term into its copy of W when a round starts (W' = W - s B_prev
A_prev, once), so its steps compute `W' x + b + s B A x`: the cost of plain LoRA. In "reset"
mode the factors are re-initialized at every merge instead (B = 0), and there is no snapshot term.

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


class _FrozenPath(torch.autograd.Function):
    """x @ W^T - s (x @ A'^T) @ B'^T, the part of the forward no gradient flows into but x's.

    Nothing is saved for backward but references to the layer's own tensors: no activation, no
    rank-r intermediate. A packed W (`lte.keep_quantized`) is dequantized in forward and again in
    backward, never held between them (as QLoRA does). Under autocast the products run in its
    dtype, as `F.linear` would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "LTELinear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        y = F.linear(x, layer.frozen_weight().to(x.dtype))
        if layer.unfolded_snapshot():
            y = y - layer.scaling * F.linear(F.linear(x, layer.lora_A_prev.to(x.dtype)), layer.lora_B_prev.to(x.dtype))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer = ctx.layer
        dx = grad @ layer.frozen_weight().to(grad.dtype)
        if layer.unfolded_snapshot():
            dx = dx - layer.scaling * (grad @ layer.lora_B_prev.to(grad.dtype)) @ layer.lora_A_prev.to(grad.dtype)
        return dx, None


class LTELinear(nn.Module):
    """A `nn.Linear` whose weight is frozen and moves only through merged LoRA deltas.

    A head folds its snapshot into its own copy of W once per round (`fold`), so its forward is
    `W' x + b + s B A x` with W' = W - s B_prev A_prev: no per-step snapshot term at all. A packed
    W cannot be folded; its snapshot term goes through `_FrozenPath`, which saves nothing."""

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
        self.folded = False  # does `weight` hold W - s B_prev A_prev (see `fold`)?

    def set_packed(self, packed) -> None:
        """Compute with this packed main weight from now on, and free the fp32 one."""
        self.packed, self.weight, self.folded = packed, None, False

    def frozen_weight(self) -> torch.Tensor:
        return self.packed.dequantize() if self.packed is not None else self.weight

    def unfolded_snapshot(self) -> bool:
        """Does the forward still owe the `- s B_prev A_prev x` term?"""
        return self.resetless and not self.folded

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
        if self.folded:  # W' holds the old snapshot; a new one would be subtracted from the wrong W
            raise RuntimeError("snapshot of a folded layer: load its main weight first")
        self.lora_A_prev.copy_(self.lora_A)
        self.lora_B_prev.copy_(self.lora_B)

    @torch.no_grad()
    def fold(self) -> None:
        """W <- W - s B_prev A_prev, once, right after W was loaded and the snapshot taken."""
        if self.unfolded_snapshot() and self.packed is None:
            self.weight.addmm_(self.lora_B_prev, self.lora_A_prev, alpha=-self.scaling)
            self.folded = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unfolded_snapshot() or self.packed is not None:
            y = _FrozenPath.apply(x, self)
            y = y + self.bias if self.bias is not None else y
        else:
            y = F.linear(x, self.weight, self.bias)
        return torch.add(y, F.linear(F.linear(x, self.lora_A), self.lora_B), alpha=self.scaling)  # one op, not two

    @torch.no_grad()
    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U @ V = s * (B A - B_prev A_prev): rank <= 2r (r in reset mode)."""
        if not self.resetless:
            return delta_uv(self.lora_B, self.lora_A, None, None, self.scaling)
        return delta_uv(self.lora_B, self.lora_A, self.lora_B_prev, self.lora_A_prev, self.scaling)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, resetless={self.resetless}")


def delta_uv(b: torch.Tensor, a: torch.Tensor, b_prev: torch.Tensor | None, a_prev: torch.Tensor | None,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A delta as factors (U, V), new tensors: s B A in reset mode (no previous factors), else
    s (B A - B' A') = s [B - B' | B'] [A; A - A']. Written with the changes, not as [B | B'] [A; -A'],
    so that its terms are the size of the delta itself: no cancellation in U V or in a norm."""
    if b_prev is None or a_prev is None:
        return scaling * b, a.clone()
    return torch.cat([b - b_prev, b_prev], dim=1) * scaling, torch.cat([a, a - a_prev])


def output_layer_name(model: nn.Module) -> str | None:
    """The model's output layer: what timm's `get_classifier()` returns (ViT, Mixer, our GPT)
    when it is an `nn.Linear`, else the last `nn.Linear` registered."""
    linear = {m: name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if classifier in linear:
        return linear[classifier]
    return list(linear.values())[-1] if linear else None


def target_names(model: nn.Module, patterns: list[str] | None, output_as_replica: bool = True) -> list[str]:
    """Names of the `nn.Linear` modules LTE trains as LoRA: those any fnmatch pattern matches (e.g.
    "*", "blocks.*.mlp.*"); with no patterns (the default rule), every one but the output layer when
    `output_as_replica`, so that it trains full-rank in every head and is averaged at each merge,
    as the embeddings are (on the KJV it took LTE from 1.60x to 1.50x full-rank's samples)."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if patterns is None:
        output = output_layer_name(model) if output_as_replica else None
        return [name for name in linear if name != output]
    return [name for name in linear if any(fnmatchcase(name, p) for p in patterns)]


def main_weight_keys(model: nn.Module, patterns: list[str] | None, output_as_replica: bool = True) -> list[str]:
    """State-dict keys of the main weights LTE trains (the rest of the state are replicas)."""
    return [f"{name}.weight" for name in target_names(model, patterns, output_as_replica)]


def no_target_error(patterns: list[str] | None) -> UserError:
    if patterns is None:
        return UserError("lte.targets: the model has no nn.Linear layer but its output layer; "
                         "set lte.targets (e.g. [\"*\"]) or lte.replicas=frozen")
    return UserError(f"lte.targets: {patterns} match no nn.Linear layer of the model")


def to_lte(model: nn.Module, rank: int, alpha: float, patterns: list[str] | None, resetless: bool = True,
           output_as_replica: bool = True) -> list[str]:
    """Wrap every targeted `nn.Linear` (see `target_names`) in place; returns the wrapped layer names."""
    names = target_names(model, patterns, output_as_replica)
    if not names:
        raise no_target_error(patterns)
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


def fold(model: nn.Module) -> None:
    """Fold every layer's snapshot into its dense main weight (see `LTELinear.fold`)."""
    for layer in lte_layers(model).values():
        layer.fold()


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


def param_groups(model: nn.Module, lr: float, replica_lr: float) -> list[dict]:
    """The optimizer's groups: LoRA factors at `lr`, replica parameters at `replica_lr`."""
    params = dict(model.named_parameters())
    factors = [p for n, p in params.items() if is_lora_key(n)]
    replicas = [p for n, p in params.items() if not is_lora_key(n)]
    return [{"params": factors}, {"params": replicas, "lr_scale": replica_lr / lr}]


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
    for name, layer in lte_layers(model).items():
        if f"{name}.weight" in state:
            layer.folded = False
    missing = [] if partial else [k for k in result.missing_keys if not is_lora_key(k) and k not in packed]
    if missing or result.unexpected_keys:
        raise KeyError(f"state does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
