"""The training methods, each defined once: LTE and the baselines it is compared against.

A method says what it trains, whether it runs as LoRA heads (and so on Ray, one actor a head),
and how it runs in one process. The CLI's choices, `resolve`, Tune, the Ray launcher and
`simulate` ask this registry; no other module tests a method's name. (Flower's Strategy and
timm's model registry are the models: one object per method, looked up by name.) The loops are
imported when a method runs, so the registry stays light enough for `lte-ray --help`.

* lte:        N heads, each on its own batches, merged every T steps.
* lora:       one head of rank r with batch N*b, quantization off. A single reset-less head's
              merge leaves the function unchanged, so this is exactly LoRA on the initial weights.
* lora-merge: one head with batch N*b whose factors (and their optimizer state) are reset at
              every merge: ReLoRA-style, each merge adds a new rank-r update.
* mhlora:     one head of rank N*r with batch N*b, never merged: multi-head LoRA, the official
              LTE code's first debugging check (can the low-rank parameterization fit at all?).
* full:       full-rank training of all weights with batch N*b (`core.baselines`).
* galore:     full-rank with GaLore-projected gradients (`core.baselines`).
* fira:       GaLore's projection plus the scaled, growth-limited residual (`core.fira`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lte_ray.config import Config, ConfigError, one_of, rounds_override
from lte_ray.errors import UserError

if TYPE_CHECKING:
    from lte_ray.core.history import RoundCallback
    from lte_ray.core.protocol import RunResult
    from lte_ray.datasets import DataBundle


@dataclass(frozen=True)
class Package:
    """An optional package a method imports: its import name and what `pip install` calls it."""

    module: str
    pip: str


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # what it is, in a line
    trains: str  # which parameters move, and how
    needs: Package | None = None

    @property
    def on_ray(self) -> bool:
        """Runs as LoRA heads, one Ray actor each."""
        return False

    def lte_config(self, cfg: Config) -> Config:
        """The LTE config its heads run."""
        raise UserError(f"method: {self.name} training has no heads; run it with --backend local")

    def title(self, cfg: Config) -> str:
        return self.name

    def recipe(self, cfg: Config) -> dict[str, float]:
        """The rank, alpha and learning rates this method trains with (`Config.recipe`)."""
        return cfg.recipe()

    def run_local(self, cfg: Config, data: DataBundle, on_round: RoundCallback | None = None) -> RunResult:
        raise NotImplementedError


@dataclass(frozen=True)
class HeadsMethod(Method):
    """Trains LoRA heads merged into the main weights: LTE, or a one-head special case of it."""

    one_head: bool = False  # one head with all heads' batch: the same steps and samples as LTE
    reset: bool = False  # factors and their optimizer state restart at every merge
    all_ranks: bool = False  # the one head has the rank of all LTE heads together (multi-head LoRA)

    @property
    def on_ray(self) -> bool:
        return True

    def lte_config(self, cfg: Config) -> Config:
        if not self.one_head:
            return cfg
        rank = cfg.lora_rank * (cfg.lte.heads if self.all_ranks else 1)
        return cfg.replace({
            "lte.heads": 1, "train.batch_size": cfg.train.batch_size * cfg.lte.heads,
            # The rank, s and learning rates of the LTE run it is compared with (the defaults follow the heads).
            "lte.rank": rank, "lte.alpha": cfg.scaling * rank, "train.lr": cfg.factor_lr,
            "train.full_lr": cfg.full_rank_lr,
            "lte.mode": "reset" if self.reset else "resetless",
            # Without resets the merges leave the function unchanged: with exact weights, plain LoRA.
            "lte.quant": cfg.lte.quant if self.reset else "none",
            # The median bound compares heads; with one head it would judge the head by its own last
            # rounds alone (an honest lora-merge head on digits once changed its replicas 11.5x as much
            # as in its recent rounds, and the rejection ended the run).
            "ray.max_median_ratio": None,
            **rounds_override(cfg.rounds),
        })

    def title(self, cfg: Config) -> str:
        return self.name if self.one_head else f"{self.name} x{cfg.lte.heads}"

    def recipe(self, cfg: Config) -> dict[str, float]:
        return self.lte_config(cfg).recipe()  # mhlora's one head: all heads' rank

    def run_local(self, cfg: Config, data: DataBundle, on_round: RoundCallback | None = None) -> RunResult:
        from lte_ray.core.reference import run_heads

        return run_heads(self.lte_config(cfg), data, on_round)


@dataclass(frozen=True)
class FullRankMethod(Method):
    """One worker trains every weight (`core.baselines`); it has no heads, so it runs in-process."""

    optimizer: str = "plain"  # of `core.baselines.OPTIMIZERS`: plain, or rank-r optimizer state (galore, fira)

    def run_local(self, cfg: Config, data: DataBundle, on_round: RoundCallback | None = None) -> RunResult:
        from lte_ray.core import baselines

        return baselines.full_rank(cfg, data, baselines.OPTIMIZERS[self.optimizer], on_round)


LTE = HeadsMethod("lte", "LoRA-the-Explorer: N heads on their own batches, merged every T steps",
                  "every head's LoRA factors; the main weights move only through merges")
LORA = HeadsMethod("lora", "one LoRA head of rank r on the initial weights (batch N x b)", "one head's LoRA factors",
                   one_head=True)
LORA_MERGE = HeadsMethod("lora-merge", "one LoRA head merged every T steps and restarted (ReLoRA-style)",
                         "one head's LoRA factors, reset with their optimizer state at every merge",
                         one_head=True, reset=True)
MHLORA = HeadsMethod("mhlora", "one LoRA head of rank heads x r (batch N x b), never merged: the official LTE "
                     "code's first check, can this low-rank parameterization fit at all",
                     "one head's LoRA factors, of all heads' rank together", one_head=True, all_ranks=True)
FULL = FullRankMethod("full", "full-rank AdamW, batch N x b, lr train.full_lr (default s x lr), in-process",
                      "every weight")
GALORE = FullRankMethod("galore", "full-rank with GaLore-projected gradients, in-process",
                        "every weight; the targeted ones with rank-r optimizer state",
                        needs=Package("galore_torch", "galore-torch"), optimizer="galore")
FIRA = FullRankMethod("fira", "full-rank with Fira: GaLore's projection plus the scaled residual, in-process",
                      "every weight; the targeted ones with rank-r optimizer state and a norm-scaled residual",
                      needs=Package("galore_torch", "galore-torch"), optimizer="fira")

METHODS: dict[str, Method] = {m.name: m for m in (LTE, FULL, LORA, LORA_MERGE, MHLORA, GALORE, FIRA)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(one_of("method", list(METHODS), name))
    return METHODS[name]
