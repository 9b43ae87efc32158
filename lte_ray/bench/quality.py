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
import json
import math
import time
from pathlib import Path
from typing import Any

from lte_ray.bench.quality_report import markdown, plot
from lte_ray.bench.quality_settings import (
    DATASETS,
    SETTINGS,
    Dataset,
    Setting,
    datasets_for,
    folder_name,
    parse_vary,
    settings_for,
    varied,
)
from lte_ray.bench.report import machine, mean_std, run_pool, write_outputs
from lte_ray.config import Config, parse_set, validate
from lte_ray.data import packaged_corpus
from lte_ray.errors import ConfigError, UserError
from lte_ray.outputs import finished_run
from lte_ray.redact import redacted_config

__all__ = ["DATASETS", "SETTINGS", "Setting", "aggregate", "bench_quality", "markdown", "problems", "run_config"]


def prepared_tokens(ds: Dataset, output: Path) -> str | None:
    """The token folder of a data set trained on BPE tokens, written under `output`/data/ the
    first time (deterministic: every run and every rerun of the bench reads the same tokens)."""
    if ds.bpe_corpus is None:
        return None
    from lte_ray import tokens

    folder = output / "data" / f"{ds.bpe_corpus}-bpe{ds.bpe_vocab}"
    if not (folder / "meta.json").exists():
        files, read = packaged_corpus(ds.bpe_corpus)
        tokens.prepare(files, str(folder), "bpe", vocab_size=ds.bpe_vocab, val_fraction=ds.base["data.test_fraction"],
                       force=True, read=read, log=lambda _msg: None)
    return str(folder)


def run_config(ds: Dataset, setting: Setting, seed: int, budget: int, evals: int, device: str,
               budget_factor: float = 1, data_path: str | None = None, sets: dict[str, Any] | None = None):
    """The config of one run: the data set's sample budget (times `budget_factor` for every
    setting but the reference) and evaluation interval (budget / evals samples). `sets`
    (`--set`) apply to every setting, full-rank too, under the setting's own overrides."""
    from lte_ray.resolve import build_config

    overrides = {k: v for k, v in setting.overrides.items() if v != "half"}
    where = {"data.path": data_path} if data_path else {}
    cfg = build_config({}, {**ds.base, **where, **(sets or {}), **overrides, "train.seed": seed,
                            "train.device": device})
    if setting.overrides.get("train.batch_size") == "half":
        cfg = cfg.replace({"train.batch_size": max(1, cfg.train.batch_size // 2)})
    spr = cfg.samples_per_round
    if budget % evals or (budget // evals) % spr:
        raise UserError(f"--samples {budget} with --evals {evals}: every evaluation interval must be a whole number "
                        f"of rounds for every setting ({setting.key} trains {spr} samples per round)")
    factor = 1 if setting.reference else budget_factor
    interval = budget // evals // spr  # rounds between evaluations
    rounds = budget // spr * factor
    if rounds != int(rounds) or int(rounds) % interval:
        raise UserError(f"--budget-factor {budget_factor:g}: {setting.key} would train {rounds:g} rounds, not a whole "
                        f"number of evaluation intervals of {interval} rounds")
    return cfg.replace({"train.rounds": int(rounds), "train.eval_every": interval})


def same_config(stored: dict[str, Any], cfg: Config) -> bool:
    """Whether a finished run's stored config (as `Run.finish` stores it) is `cfg`, read as today's
    code reads it: fields added since it ran take their defaults, which keep the old behaviour.
    Where it was written does not count: an output folder copied or moved still reads back."""
    try:
        today = validate(_moved(stored, cfg.output), {})
    except ConfigError:
        return False
    return redacted_config(today.to_dict()) == redacted_config(cfg.to_dict())


def _moved(stored: dict[str, Any], output: str) -> dict[str, Any]:
    """A stored run config as if its bench output folder (two levels above the run's) were the one
    of `output`: the run's folder, and a data path inside the bench folder (prepared tokens)."""
    data, path = dict(stored.get("data") or {}), (stored.get("data") or {}).get("path")
    if stored.get("output") and isinstance(path, str):
        old_root, new_root = Path(stored["output"]).parent.parent, Path(output).parent.parent
        if Path(path).is_relative_to(old_root):
            data["path"] = str(new_root / Path(path).relative_to(old_root))
    return {**stored, "data": data, "output": output}


def run_folder(dataset: str, setting: Setting, seed: int, budget_factor: float) -> str:
    """A run's folder under `<output>/runs/`: the budget factor is in the name of every setting it
    extends, so a `--budget-factor` run shares the 1x run's output folder and reads its full-rank
    runs back."""
    extended = not setting.reference and budget_factor != 1
    return folder_name(f"{dataset}-{setting.key}{f'-x{budget_factor:g}' if extended else ''}-seed{seed}")


def report_name(budget_factor: float) -> str:
    """quality.json/.md/.png at 1x, quality_x2.* with `--budget-factor 2`: both fit one folder."""
    return "quality" if budget_factor == 1 else f"quality_x{budget_factor:g}"


def job_config(job: dict[str, Any]) -> Config:
    """A job's run config, its output its own run folder."""
    ds = DATASETS[job["dataset"]]
    setting = Setting(job["setting"], job["setting"], job["overrides"], job["reference"])
    cfg = run_config(ds, setting, job["seed"], job["budget"], job["evals"], job["device"], job["budget_factor"],
                     job.get("data_path"), job.get("sets"))
    folder = run_folder(ds.name, setting, job["seed"], job["budget_factor"])
    return cfg.replace({"output": str(Path(job["output"]) / "runs" / folder)})


def clashes(work: list[dict[str, Any]]) -> list[str]:
    """The run folders of `work` that hold a finished run of another config (checked before anything
    runs: a clash found by a job would cost the other jobs' time and replace the folder's report)."""
    out = []
    for cfg in map(job_config, work):
        summary = Path(cfg.output) / "summary.json"
        if summary.exists() and not same_config(json.loads(summary.read_text())["config"], cfg):
            out.append(cfg.output)
    return out


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One seed of one setting on one data set (runs in a worker process), in its own run folder."""
    from lte_ray.run import Run

    ds = DATASETS[job["dataset"]]
    cfg = job_config(job)
    keys = (ds.metric, *ds.extra_metrics)
    done = finished_run(Path(cfg.output))
    if done is None:  # else: a finished run of an interrupted benchmark, read back
        run = Run(cfg, backend="local", tracking=False)
        run.finish(run.train())
        done = finished_run(run.dir)
    summary, records = done
    if not same_config(summary["config"], cfg):
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


def bench_quality(output: str, datasets: list[str] | None = None, methods: list[str] | None = None,
                  seeds: int | None = None, samples: int | None = None, evals: int | None = None,
                  jobs: int = 2, device: str = "cpu", budget_factor: float = 1,
                  vary: list[str] | None = None, set_items: list[str] | None = None) -> dict[str, Any]:
    common = parse_set(set_items or [])  # --set: for every setting, full-rank too
    sets, settings = datasets_for(datasets), varied(settings_for(methods), parse_vary(vary or []))
    missing = [s for s in settings if s.needs and importlib.util.find_spec(s.needs.module) is None]
    skipped = [f"{s.key} ({s.needs.pip} is not installed)" for s in missing]
    settings = [s for s in settings if s not in missing]
    out = Path(output)
    work = []
    for ds in sets:
        budget, n_evals = samples or ds.budget, evals or ds.evals
        data_path = prepared_tokens(ds, out)
        for s in settings:
            # all valid before anything runs
            run_config(ds, s, 0, budget, n_evals, device, budget_factor, data_path, common)
            work += [{"dataset": ds.name, "setting": s.key, "overrides": s.overrides, "reference": s.reference,
                      "data_path": data_path, "seed": seed, "budget": budget, "evals": n_evals,
                      "device": device, "budget_factor": budget_factor, "output": output, "sets": common}
                     for seed in range(seeds or ds.seeds)]
    if clash := clashes(work):
        held = "holds a finished run" if len(clash) == 1 else "hold finished runs"
        raise UserError(f"--output: {len(clash)} of its run folders {held} made with other settings (--samples, "
                        f"--set, --vary...; first: {clash[0]!r}); remove them or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_pool(run_one, work, jobs, lambda j: f"{j['dataset']} {j['setting']} seed {j['seed']}",
                       "bench quality", log=out / "runs.jsonl")
    runs = [r for r in results if "error" not in r]
    failed = [{**job, "error": r["error"]} for job, r in zip(work, results) if "error" in r]
    report = {"bench": "quality", "schema": 1, "machine": machine(), "jobs": jobs, "device": device,
              "budget_factor": budget_factor, "vary": vary or [], "set": set_items or [],
              "wall_seconds": time.perf_counter() - start, "skipped": skipped, "failed": failed,
              "datasets": [aggregate(ds, [r for r in runs if r["dataset"] == ds.name], settings) for ds in sets],
              "runs": runs}
    name = report_name(budget_factor)
    write_outputs(out, name, report, markdown(report))
    plot(report, out / f"{name}.png")
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """Runs that failed and settings whose final metrics are not all finite (the CLI's exit code)."""
    bad = [f"{f['dataset']}/{f['setting']} seed {f['seed']} failed" for f in report.get("failed", [])]
    return bad + [f"{ds['name']}/{m['key']} has non-finite metrics" for ds in report["datasets"]
                  for m in ds["methods"] if not all(math.isfinite(v) for f in m["final"].values() for v in f["values"])]
