"""Model builders: a name plus keyword overrides, sized for the data. Nothing is downloaded.

* ViT: timm's registered `vit_*` entry points (they accept overriding patch_size etc.).
* MLP-Mixer: timm's `MlpMixer` class built directly (the `mixer_*` entry points fix patch_size).
* GPT: a small decoder-only causal transformer, defined here (nanoGPT-style).

`MODELS` is the registry: each name's family, which says what task it solves and whether it
has attention heads (so `model.width` must divide among them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from lte_ray.config import ConfigError, ModelConfig
from lte_ray.core.protocol import Task
from lte_ray.datasets import DataSpec

_VIT_ENTRY = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}
_MIXER = {"mixer_s": dict(patch_size=16, num_blocks=8, embed_dim=512),
          "mixer_b": dict(patch_size=16, num_blocks=12, embed_dim=768)}
_GPT = {"gpt_nano": dict(depth=4, width=128, attn_heads=4), "gpt_mini": dict(depth=6, width=192, attn_heads=6)}


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    return model_family(cfg.name).build(cfg, spec)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute each block in backward instead of keeping its activations (`train.
    activation_checkpointing`): timm's `set_grad_checkpointing` for ViT and Mixer (non-reentrant
    `torch.utils.checkpoint`), the same method on our GPT."""
    model.set_grad_checkpointing(enabled)


def _set(kwargs: dict[str, Any], **values: Any) -> dict[str, Any]:
    kwargs.update({k: v for k, v in values.items() if v is not None})
    return kwargs


def _build_vit(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    import timm

    kwargs = _set(dict(img_size=spec.img_size, in_chans=spec.in_chans, num_classes=spec.num_classes),
                  patch_size=cfg.patch_size, depth=cfg.depth, embed_dim=cfg.width,
                  num_heads=cfg.attn_heads, mlp_ratio=cfg.mlp_ratio)
    kwargs.update(cfg.extra)
    return timm.create_model(_VIT_ENTRY[cfg.name], pretrained=False, **kwargs)


def _build_mixer(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    kwargs = _set(dict(_MIXER[cfg.name]), patch_size=cfg.patch_size, num_blocks=cfg.depth,
                  embed_dim=cfg.width)
    if cfg.mlp_ratio is not None:
        kwargs["mlp_ratio"] = (0.5, cfg.mlp_ratio)
    kwargs.update(img_size=spec.img_size, in_chans=spec.in_chans, num_classes=spec.num_classes)
    kwargs.update(cfg.extra)
    return MlpMixer(**kwargs)


def _build_gpt(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    preset = _GPT[cfg.name]
    return GPT(vocab_size=spec.vocab_size, context=cfg.context,
               depth=cfg.depth or preset["depth"], width=cfg.width or preset["width"],
               attn_heads=cfg.attn_heads or preset["attn_heads"], mlp_ratio=cfg.mlp_ratio or 4.0,
               **cfg.extra)


@dataclass(frozen=True)
class Family:
    name: str
    task: Task  # what it is built for: image classes, or the next token
    attention: bool  # has attention heads: model.width must divide among model.attn_heads
    build: Callable[[ModelConfig, DataSpec], nn.Module]


VIT_FAMILY = Family("vit", "classify", True, _build_vit)
MIXER_FAMILY = Family("mixer", "classify", False, _build_mixer)
GPT_FAMILY = Family("gpt", "lm", True, _build_gpt)
MODELS: dict[str, Family] = {
    "vit_tiny": VIT_FAMILY, "vit_small": VIT_FAMILY, "vit_base": VIT_FAMILY,
    "mixer_s": MIXER_FAMILY, "mixer_b": MIXER_FAMILY,
    "gpt_nano": GPT_FAMILY, "gpt_mini": GPT_FAMILY,
}


def model_family(name: str) -> Family:
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r} (choose from {', '.join(MODELS)})")
    return MODELS[name]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, attn_heads: int):
        super().__init__()
        if width % attn_heads:
            raise ValueError(f"model.width ({width}) must be divisible by model.attn_heads ({attn_heads})")
        self.attn_heads = attn_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.attn_heads, c // self.attn_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, attn_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, attn_heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class GPT(nn.Module):
    """Decoder-only causal transformer: tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab_size: int, context: int = 64, depth: int = 4, width: int = 128,
                 attn_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        self.context = context
        self.grad_checkpointing = False
        self.tok_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, width))
        self.blocks = nn.ModuleList(Block(width, attn_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("fc2.weight"):  # GPT-2 residual scaling
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    def get_classifier(self) -> nn.Module:
        """The output layer, as timm's models name theirs (the default LTE targets leave it out)."""
        return self.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """As timm's models: checkpoint every block when training (`torch.utils.checkpoint`)."""
        self.grad_checkpointing = enable

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens exceeds model.context={self.context}")
        x = self.tok_embed(idx) + self.pos_embed[:, :t]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: gradients reach the block's parameters even when x needs none.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.norm(x))
