"""One typed config drives a run: model, data, LTE, training. YAML + command-line overrides.

This module knows the shape of a config and nothing else: its validators are pure (no file,
package or registry look-ups, no changes to the values given). What needs the world (does the
data path exist, is the method known and its package installed, does the model fit the data)
is checked once, at load time, by `lte_ray.resolve`. Derived values (`rounds`,
`samples_per_round`, `total_steps`, and the default recipe's `lora_rank`, `lora_alpha`,
`scaling`, `factor_lr`, `full_rank_lr`, `replica_lr` for fields left unset) are properties
computed from the fields, never stored.

Every invalid value becomes a `ConfigError` whose message is one line naming the field,
e.g. ``lte.rank: must be >= 1 (got 0)``; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from lte_ray.config_ray import RayConfig, Section
from lte_ray.config_text import describe, load_yaml, parse_set  # noqa: F401 (load_yaml, parse_set: re-exported)
from lte_ray.errors import ConfigError

Quant = Literal["none", "int8", "nf4"]  # what the broadcast of the main weights carries
Upload = Literal["fp32", "bf16", "int8"]  # how heads send their factors up (`core.upload`)
Device = Literal["auto", "cpu", "cuda"]
# auto: tf32 on CUDA, fp32 on CPU. bf16 autocasts the forward; weights, LoRA factors, their
# gradients and optimizer state, the merge and evaluation stay fp32.
Precision = Literal["auto", "fp32", "tf32", "bf16"]
DEFAULT_ROUNDS = 120  # 76,800 samples with the default 4 heads, T = 5, batch 32
# The default recipe (`lte-ray bench quality --vary`, docs/benchmarks.md "Finding the recipe").
RANK_HEADS_PER_WIDTH = 2  # rank x heads, in widths (and T = 5: `LTEConfig.merge_every`)
DEFAULT_SCALING = 8.0  # s = alpha / rank
DEFAULT_FULL_LR = 4e-3  # full-rank AdamW's learning rate; LoRA factors train at this / s


def one_of(field: str, choices: list[str], got: object) -> str:
    """The one-line error for a value that is not among `choices` (worded as for any other field)."""
    names = [repr(c) for c in choices]
    listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return f"{field}: must be one of {listed} (got {got!r})"


class ModelConfig(Section):
    """Architecture. `None` means "the preset's value"; image size, channels, classes and vocab
    come from the data."""

    name: str = "vit_tiny"  # a model of `lte_ray.models.MODELS`
    depth: int | None = Field(4, ge=1)
    width: int | None = Field(96, ge=1)
    attn_heads: int | None = Field(4, ge=1)
    patch_size: int | None = Field(4, ge=1)  # ViT / Mixer only
    mlp_ratio: float | None = Field(None, gt=0)
    context: int = Field(64, ge=2)  # GPT only: tokens per training sequence
    extra: dict[str, Any] = Field(default_factory=dict)  # further timm keyword overrides


class DataConfig(Section):
    name: str = "digits"  # a source of `lte_ray.data.SOURCES`
    path: str | list[str] | None = None  # npz file, image folder, or text file(s) / folder
    tokenizer: Literal["byte", "char"] = "byte"  # text only
    image_size: int = Field(32, ge=4)  # folder only: images are resized to this
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    same_batches: bool = False  # every head draws the same batches (tests, identities)
    # Images: each training image moves by its own random offset of up to this many pixels in each
    # direction, edge pixels repeated (`lte_ray.augment`); evaluation images never move. 0: off.
    augment_shift: int = Field(0, ge=0)


class LTEConfig(Section):
    heads: int = Field(4, ge=1)
    # None: the default recipe (`Config.lora_rank`, `Config.lora_alpha`, docs/benchmarks.md):
    # rank x heads = RANK_HEADS_PER_WIDTH x model.width, and s = alpha / rank = DEFAULT_SCALING.
    rank: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0)
    merge_every: int = Field(5, ge=1)  # T: local steps per round (the recipe: 5 beat 10 and 1)
    mode: Literal["resetless", "reset"] = "resetless"
    # fnmatch patterns on nn.Linear names; None, the rule: every nn.Linear but the output layer, which
    # (with replicas "average") trains full-rank in every head and is averaged at each merge.
    targets: list[str] | None = None
    replicas: Literal["frozen", "average"] = "average"  # non-LoRA parameters
    # With train.weight_decay > 0: each merge also decays W as full-rank AdamW would over the round's
    # T steps (heads train only factors and replicas, so no head's optimizer can decay W).
    decay_main: bool = True
    # int8: over 3 seeds, NF4's noise cost LTE 0.03-0.05 nats on text and kept the KJV from full-rank's
    # loss at 2x the samples (docs/benchmarks.md); nf4 halves the main weights' bytes down for that.
    quant: Quant = "int8"
    # Heads keep the broadcast's int8/nf4 main weights packed and dequantize them layer by layer
    # in forward and backward: less memory per head, a little more compute; the same values up to
    # float rounding.
    keep_quantized: bool = False
    # Factors up: fp32 exactly, or the change since the last accepted upload in bf16 / int8 (the head
    # keeps what the coordinator decodes, so the two never drift).
    upload: Upload = "bf16"

    @property
    def output_as_replica(self) -> bool:
        """Whether the default rule leaves the output layer out of LoRA: only when replicas train."""
        return self.replicas == "average"

    @model_validator(mode="after")
    def _keep_needs_quant(self) -> "LTEConfig":
        if self.keep_quantized and self.quant == "none":
            raise ValueError("lte.keep_quantized: needs lte.quant int8 or nf4 (got none)")
        return self


class TrainConfig(Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # The LoRA factors' learning rate and the full-rank one (--method full|galore|fira): give
    # either, the other is it times or divided by s (under Adam an LTE head moves W by about
    # s x lr per step); neither: lr = DEFAULT_FULL_LR / s.
    lr: float | None = Field(None, gt=0)
    full_lr: float | None = Field(None, gt=0)
    # Heads' replica parameters (embeddings, norms, biases: averaged like full-rank weights at each
    # merge); default: the full-rank learning rate, as these train exactly as full-rank ones do.
    replica_lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)  # per head
    rounds: int | None = Field(DEFAULT_ROUNDS, ge=1)  # None: the default (files of older versions hold it)
    total_samples: int | None = Field(None, ge=1)  # when given, it sets the rounds instead of `rounds`
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_rounds: int = Field(10, ge=0)  # 50 steps at T = 5
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(20, ge=1)  # rounds
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "auto"
    # Recompute each transformer block's activations in backward instead of keeping them (heads
    # and the full-rank baseline alike): far less activation memory for a second forward per block.
    activation_checkpointing: bool = False


class TrackingConfig(Section):
    mlflow_uri: str | None = None  # default: sqlite:///<output>/mlflow.db
    experiment: str = "lte-ray"


class Config(Section):
    method: str = "lte"  # a method of `lte_ray.core.methods.METHODS`
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lte: LTEConfig = Field(default_factory=LTEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.ray.min_heads > self.lte.heads:
            raise ValueError(f"ray.min_heads: {self.ray.min_heads} is more than lte.heads={self.lte.heads}")
        if self.ray.max_heads is not None and self.ray.max_heads < self.lte.heads:
            raise ValueError(f"ray.max_heads: {self.ray.max_heads} is less than lte.heads={self.lte.heads}")
        return self

    # Derived quantities every component agrees on.
    @property
    def head_cap(self) -> int:
        """Most heads a run takes, joiners included: `ray.max_heads`, by default twice `lte.heads`."""
        return self.ray.max_heads or 2 * self.lte.heads

    @property
    def lora_rank(self) -> int:
        """`lte.rank`, by default RANK_HEADS_PER_WIDTH x model.width / lte.heads (8 if the width is the preset's)."""
        if self.lte.rank is not None:
            return self.lte.rank
        return max(1, round(RANK_HEADS_PER_WIDTH * self.model.width / self.lte.heads)) if self.model.width else 8

    @property
    def lora_alpha(self) -> float:
        return self.lte.alpha if self.lte.alpha is not None else DEFAULT_SCALING * self.lora_rank

    @property
    def scaling(self) -> float:
        """s = alpha / rank: a head's forward adds s B A x."""
        return self.lora_alpha / self.lora_rank

    @property
    def factor_lr(self) -> float:
        """The heads' learning rate for their LoRA factors: `train.lr`, else the full-rank one / s."""
        return self.train.lr or (self.train.full_lr or DEFAULT_FULL_LR) / self.scaling

    @property
    def full_rank_lr(self) -> float:
        """The full-rank baselines' learning rate: `train.full_lr`, else s x the factors' one."""
        return self.train.full_lr or self.scaling * self.factor_lr

    @property
    def replica_lr(self) -> float:
        """The heads' learning rate for replica parameters: `train.replica_lr`, by default the full-rank one."""
        return self.train.replica_lr or self.full_rank_lr

    def recipe(self) -> dict[str, float]:
        """The values the defaults derive (rank, alpha, s, learning rates), as this config resolves them."""
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "scaling": self.scaling, "lr": self.factor_lr,
                "full_lr": self.full_rank_lr, "replica_lr": self.replica_lr}

    @property
    def rounds(self) -> int:
        """`train.total_samples` in whole rounds when given, else `train.rounds`."""
        if self.train.total_samples is not None:
            return max(1, math.ceil(self.train.total_samples / self.samples_per_round))
        return self.train.rounds or DEFAULT_ROUNDS

    @property
    def samples_per_round(self) -> int:
        return self.lte.heads * self.lte.merge_every * self.train.batch_size

    @property
    def total_steps(self) -> int:
        return self.rounds * self.lte.merge_every

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def replace(self, overrides: dict[str, Any]) -> "Config":
        """A validated copy with dotted-key overrides, e.g. ``replace({"lte.heads": 1})``. Pure:
        a value that needs the world checked (a new data path, say) goes through
        `lte_ray.resolve.resolve` again."""
        return validate(self.to_dict(), overrides)


def _apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {key!r} is not a section")
            node = child
        node[leaf] = value
    return data


def _from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e)) from None


def rounds_override(rounds: int) -> dict[str, Any]:
    """The overrides that make a run train `rounds` rounds: a sample budget, which would set the
    rounds instead, is cleared."""
    return {"train.rounds": rounds, "train.total_samples": None}


def validate(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """`base` (e.g. from YAML) with dotted `overrides` applied on top, validated; pure. Loading a
    config for a run is `lte_ray.resolve.load_config`, which also checks it against the world."""
    return _from_dict(_apply(copy.deepcopy(base or {}), overrides or {}))
