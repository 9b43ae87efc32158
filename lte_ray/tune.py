"""Ray Tune sweeps over LTE settings (rank x heads, and merge_every, alpha, lr where asked).

* Each trial reserves its coordinator and all its heads as one placement group
  (`tune.PlacementGroupFactory`): bundle 0 for the trial's process, bundle 1 for the coordinator
  (`ray.coordinator_cpus` / `coordinator_gpus`; it shares bundle 0 when it reserves nothing), one
  bundle per head. A trial starts only when all of it fits, so trials never deadlock each other on a small
  cluster, and heads the coordinator starts later (replacements) go into the same group.
* A trial is one `Run` (the bookkeeping `lte-ray train` uses) whose rounds also go to Tune: it
  reports every evaluation (`round`, `eval_*`, `train_loss`, ...), and ASHA can stop poor trials.
* The metric is the data's headline metric (`core.task.headline_metric`): `eval_accuracy` (max)
  for classification, `eval_loss` (min) for language modelling.
* MLflow: the sweep is a parent run (the base config as params); Ray's `MLflowLoggerCallback`
  makes every trial a child run, named by its trial id, with the swept values as params and the
  reports as metrics at step = round. It logs from the driver, so the SQLite store has one writer.
  At the end a table ranks the trials; `best_config.json` names the best.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

from ray import tune

from lte_ray.config import Config, ConfigError
from lte_ray.core.methods import get_method
from lte_ray.core.protocol import RoundRecord
from lte_ray.core.task import headline_metric
from lte_ray.data import data_task
from lte_ray.redact import redacted_config
from lte_ray.resolve import resolve
from lte_ray.tracking import Tracker

TRIAL_DRIVER_CPUS = 0.5  # the trial's own process; the coordinator shares its bundle (num_cpus=0)


def metric_for(cfg: Config) -> tuple[str, str]:
    return headline_metric(data_task(cfg.data))


def parse_space(grid: list[str], choice: list[str], loguniform: list[str], uniform: list[str]) -> dict[str, Any]:
    """`KEY=V1,V2,...` items -> a Tune search space over dotted config keys."""
    import yaml
    space: dict[str, Any] = {}

    def split(item: str, flag: str) -> tuple[str, list[Any]]:
        key, sep, raw = item.partition("=")
        if not sep or not raw:
            raise ConfigError(f"{flag} {item}: expected section.key=V1,V2,...")
        return key.strip(), [yaml.safe_load(v) for v in raw.split(",")]

    for item in grid:
        key, values = split(item, "--grid")
        space[key] = tune.grid_search(values)
    for item in choice:
        key, values = split(item, "--choice")
        space[key] = tune.choice(values)
    for flag, items, make in (("--loguniform", loguniform, tune.loguniform), ("--uniform", uniform, tune.uniform)):
        for item in items:
            key, values = split(item, flag)
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
                raise ConfigError(f"{flag} {item}: expected section.key=LOW,HIGH with LOW < HIGH")
            space[key] = make(float(values[0]), float(values[1]))
    if not space:
        raise ConfigError("tune: nothing to sweep; give --grid, --choice, --loguniform or --uniform")
    return space


def _check_trial(base: Config, values: dict[str, Any]) -> None:
    cfg = resolve(base.replace(values))
    if not get_method(cfg.method).on_ray:
        raise ConfigError(f"method: tune sweeps methods that train heads on Ray; {cfg.method} has none")


def check_space(base: Config, grid: list[str], choice: list[str]) -> None:
    """Every listed value must make a valid config, checked against the world here, once: fail
    before any trial starts (trials then apply their values without looking again)."""
    import yaml

    _check_trial(base, {})
    for item in grid + choice:
        key, _, raw = item.partition("=")
        for value in raw.split(","):
            _check_trial(base, {key.strip(): yaml.safe_load(value)})
    if grid:  # combinations too (e.g. min_heads against heads)
        axes = [(k.strip(), [yaml.safe_load(v) for v in raw.split(",")])
                for k, _, raw in (g.partition("=") for g in grid)]
        for combo in itertools.product(*[vals for _, vals in axes]):
            _check_trial(base, {k: v for (k, _), v in zip(axes, combo)})


def trial_resources(base: Config):
    """Placement group of one trial: its driver + coordinator, then one bundle per head and spare."""
    def resources(params: dict[str, Any]):
        cfg = base.replace(params)
        head = {"CPU": cfg.ray.cpus_per_head}
        if cfg.ray.gpus_per_head:
            head["GPU"] = cfg.ray.gpus_per_head
        heads = get_method(cfg.method).lte_config(cfg).lte.heads
        coordinator = {k: v for k, v in (("CPU", cfg.ray.coordinator_cpus), ("GPU", cfg.ray.coordinator_gpus)) if v}
        # Bundle 0 is all the trainable's (Tune gives it the whole first bundle): a coordinator that
        # reserves CPUs or GPUs gets bundle 1, or it would wait forever for what the trainable holds.
        bundles = [{"CPU": TRIAL_DRIVER_CPUS}] + ([coordinator] if coordinator else [])
        return tune.PlacementGroupFactory(bundles + [dict(head) for _ in range(heads + cfg.ray.spare_heads)])

    return resources


def _report(rec: RoundRecord) -> None:
    if rec.evals:  # `timesteps_total` is the step MLflowLoggerCallback logs at
        tune.report({"round": rec.round, "timesteps_total": rec.round, **rec.metrics()})


def run_trial(params: dict[str, Any], base: Config, sweep: str) -> None:
    """A Tune function trainable: one LTE run on Ray, inside the trial's placement group."""
    from ray.util import get_current_placement_group

    from lte_ray.run import Run

    ctx = tune.get_context()
    name = f"{sweep}-{ctx.get_trial_id()}"
    cfg = base.replace({**params, "output": ctx.get_trial_dir(), "ray.run_name": name})
    run = Run(cfg, backend="ray", tracking=False, sinks=[_report])  # MLflow: the driver's callback
    run.finish(run.train(placement_group=get_current_placement_group()))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "sweep"


def _trial_name(trial) -> str:
    return trial.trial_id  # also the MLflow child run's name


def sweep(base: Config, space: dict[str, Any], *, output: str, samples: int = 1, asha: bool = False,
          metric: str | None = None, mode: str | None = None, max_concurrent: int = 0) -> dict[str, Any]:
    """Run the sweep on the connected Ray cluster; returns the ranking and the best trial."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from lte_ray.checkpoint import write_json

    default_metric, default_mode = metric_for(base)
    metric, mode = metric or default_metric, mode or default_mode
    sweep_dir = Path(output).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    name = _slug(sweep_dir.name)
    parent = Tracker(base, sweep_dir, run_name=f"sweep {name}", backend="ray-tune")  # creates the experiment
    tags = {"backend": "ray-tune", **({"mlflow.parentRunId": parent.run_id} if parent.run_id else {})}
    # Ray's callback calls MLflow itself (not through the best-effort Tracker).
    children = MLflowLoggerCallback(tracking_uri=parent.uri, experiment_name=base.tracking.experiment, tags=tags)
    scheduler = (ASHAScheduler(time_attr="round", max_t=base.rounds,
                               grace_period=min(base.rounds, 2 * base.train.eval_every)) if asha else None)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, sweep=name), trial_resources(base))
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=samples, scheduler=scheduler,
                                    max_concurrent_trials=max_concurrent or None, trial_name_creator=_trial_name),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), callbacks=[children], verbose=0),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        parent.finish(sweep_dir, None, status="FAILED")
        raise
    trials = []
    for res in grid:
        row = {"trial_id": res.metrics.get("trial_id"), "params": {k: res.config[k] for k in space},
               metric: res.metrics.get(metric), "round": res.metrics.get("round"),
               "error": str(res.error).splitlines()[0] if res.error else None}
        trials.append(row)
    ok = [t for t in trials if isinstance(t[metric], (int, float)) and not math.isnan(t[metric])]
    ok.sort(key=lambda t: t[metric], reverse=mode == "max")
    ranked = ok + [t for t in trials if t not in ok]
    best = ok[0] if ok else None
    report = {"metric": metric, "mode": mode, "trials": ranked, "best": best,
              "best_config": redacted_config(base.replace(best["params"]).to_dict()) if best else None,
              "mlflow_uri": parent.shown_uri, "mlflow_parent_run_id": parent.run_id}
    write_json(sweep_dir / "best_config.json", report)
    parent.set_tag("best_trial", best["trial_id"] if best else "none")
    parent.finish(sweep_dir, None, status="FINISHED" if best else "FAILED")
    return report


def ranking_table(report: dict[str, Any]):
    from rich.table import Table

    metric = report["metric"]
    table = Table(title=f"lte-ray tune: trials ranked by {metric} ({report['mode']})")
    keys = list(report["trials"][0]["params"]) if report["trials"] else []
    for col in ["#", "trial", *keys, metric, "rounds", "error"]:
        table.add_column(col)
    for i, t in enumerate(report["trials"], 1):
        value = t[metric]
        table.add_row(str(i), str(t["trial_id"]), *[str(t["params"][k]) for k in keys],
                      f"{value:.4f}" if isinstance(value, float) else str(value), str(t["round"]), t["error"] or "")
    return table
