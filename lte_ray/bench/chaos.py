"""`lte-ray bench chaos`: the default digits run on a loopback cluster of several Ray nodes, calm,
with a straggler alone, and with every fault at once (`chaos_faults.chaos_schedule`): heads
SIGKILLed every few rounds, a node killed, the coordinator killed once, one head 10x slower, one
head poisoning every upload, the MLflow server down for a stretch. Each scenario gets a fresh
cluster and MLflow server (the same topology), so wall times compare.

What it checks: no merged round lost (the driver saw rounds 1..R, each once), MLflow holds every
round once, the final accuracy is within `ACCURACY_POINTS` of calm, and the wall time within
`WALL_RATIO` of calm (`STRAGGLER_WALL_RATIO` for a straggler alone).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import ray

from lte_ray.bench.chaos_faults import Faults, MlflowServer, Schedule, chaos_schedule, loopback_cluster
from lte_ray.bench.report import machine, machine_line, markdown_table, write_outputs
from lte_ray.config import DEFAULT_ROUNDS
from lte_ray.resolve import build_config
from lte_ray.run import Run

SCENARIOS = ("calm", "straggler", "chaos")
ACCURACY_POINTS = 1.0
WALL_RATIO, STRAGGLER_WALL_RATIO = 1.5, 1.3


def _schedule(scenario: str, rounds: int) -> Schedule:
    if scenario == "chaos":
        return chaos_schedule(rounds)
    return Schedule(slow_from=2) if scenario == "straggler" else Schedule()


def _mlflow_points(uri: str, run_id: str) -> dict[str, int]:
    """How many train_loss points the MLflow run holds, and how many rounds appear twice."""
    from mlflow import MlflowClient

    steps = [m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train_loss")]
    return {"points": len(steps), "steps_twice": len(steps) - len(set(steps))}


def run_scenario(scenario: str, folder: Path, rounds: int, nodes: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """One scenario on a fresh loopback cluster and MLflow server; returns what happened."""
    cluster, workers = loopback_cluster(nodes)
    server = MlflowServer(folder / "mlflow")
    try:
        server.start()
        ray.init(address=cluster.address, namespace="lte-ray", log_to_driver=False)
        name = f"chaos-{scenario}-{uuid.uuid4().hex[:6]}"
        cfg = build_config({}, {**overrides, "train.rounds": rounds, "output": str(folder / "run"),
                                "ray.run_name": name, "tracking.mlflow_uri": server.uri})
        faults = Faults(_schedule(scenario, rounds), name, str(folder / "run"), cluster, list(workers), server)
        run = Run(cfg, sinks=[faults])
        t0 = time.monotonic()
        faults.start()
        try:
            result = run.train()
            wall = time.monotonic() - t0  # not the wait for a restarting MLflow server below
        finally:
            faults.stop()
        summary = run.finish(result)  # waits for the tracker's backlog: MLflow holds every round now
        points = _mlflow_points(server.uri, summary["mlflow_run_id"])
        shown = faults.shown
        return {"scenario": scenario, "rounds": result.rounds, "samples_seen": result.samples_seen,
                "wall_seconds": round(wall, 1),
                "eval_accuracy": result.final.get("eval_accuracy"),
                "rounds_shown_twice": len(shown) - len(set(shown)),
                "merged_rounds_lost": len(set(range(1, rounds + 1)) - set(shown)),
                "rounds_redone": faults.redone, "tracking_down_s": round(faults.tracking_down_s, 1),
                "mlflow_points": points["points"], "mlflow_steps_twice": points["steps_twice"],
                "counters": vars(result.counters), "faults": faults.log}
    finally:
        ray.shutdown()
        server.stop()
        cluster.shutdown()


def bench_chaos(output: str, rounds: int | None = None, nodes: int = 3, scenarios: tuple[str, ...] = SCENARIOS,
                overrides: dict[str, Any] | None = None, progress: Any = print) -> dict[str, Any]:
    """Run `scenarios` one after the other; write chaos.json and chaos.md into `output`."""
    rounds = rounds or DEFAULT_ROUNDS
    out = Path(output)
    runs = []
    for scenario in scenarios:
        progress(f"bench chaos: {scenario} ({rounds} rounds, {nodes} nodes)...")
        runs.append(run_scenario(scenario, out / scenario, rounds, nodes, dict(overrides or {})))
        progress(f"bench chaos: {scenario}: accuracy {runs[-1]['eval_accuracy']}, {runs[-1]['wall_seconds']} s")
    spares = build_config({}, dict(overrides or {})).ray.spare_heads
    report = {"machine": machine(), "rounds": rounds, "nodes": nodes, "spare_heads": spares, "runs": runs,
              "targets": {"accuracy_points": ACCURACY_POINTS, "wall_ratio": WALL_RATIO,
                          "straggler_wall_ratio": STRAGGLER_WALL_RATIO}}
    report["problems"] = problems(report)
    write_outputs(out, "chaos", report, markdown(report))
    return report


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["scenario"]: r for r in report["runs"]}


def problems(report: dict[str, Any]) -> list[str]:
    """The targets a scenario missed (empty: all met)."""
    runs, bad = _by_name(report), []
    calm = runs.get("calm")
    for name, r in runs.items():
        if r["merged_rounds_lost"] or r["rounds_shown_twice"]:
            bad.append(f"{name}: {r['merged_rounds_lost']} merged rounds lost, {r['rounds_shown_twice']} shown twice")
        if r["mlflow_points"] != r["rounds"] or r["mlflow_steps_twice"]:
            bad.append(f"{name}: MLflow holds {r['mlflow_points']} points for {r['rounds']} rounds")
        if calm is None or name == "calm":
            continue
        points = round(100 * (calm["eval_accuracy"] - r["eval_accuracy"]), 6)  # 0.98 - 0.97 is not quite 0.01
        if points > ACCURACY_POINTS:
            bad.append(f"{name}: accuracy {points:.1f} points below calm")
        limit = STRAGGLER_WALL_RATIO if name == "straggler" else WALL_RATIO
        if r["wall_seconds"] > limit * calm["wall_seconds"]:
            bad.append(f"{name}: wall time {r['wall_seconds'] / calm['wall_seconds']:.2f}x calm (target {limit}x)")
    return bad


def _what_happened(r: dict[str, Any]) -> str:
    c = r["counters"]
    parts = [f"{c['heads_lost']} heads lost", f"{c['heads_joined']} joined mid-run", f"{c['late_results']} late",
             f"{c['heads_replaced_late']} replaced for lateness", f"{c['heads_rejected']} uploads rejected",
             f"{c.get('heads_replaced_rejected', 0)} replaced for rejections",
             f"{c['heads_clipped']} clipped", f"{c['heads_reset']} restarted fresh",
             f"{c['coordinator_restarts']} coordinator restarts"]
    return ", ".join(p for p in parts if not p.startswith("0 "))


def markdown(report: dict[str, Any]) -> str:
    runs = _by_name(report)
    calm = runs.get("calm")
    rows = []
    for name, r in runs.items():
        ratio = f"{r['wall_seconds'] / calm['wall_seconds']:.2f}x" if calm else "-"
        acc = f"{r['eval_accuracy']:.4f}" if r["eval_accuracy"] is not None else "-"
        rows.append([name, r["rounds"], f"{r['samples_seen']:,}", r["merged_rounds_lost"], r["rounds_redone"], acc,
                     f"{r['wall_seconds']:.1f}",
                     ratio, f"{r['mlflow_points']} ({r['mlflow_steps_twice']} twice)",
                     _what_happened(r) or "nothing"])
    spares = report.get("spare_heads", 0)
    lines = [f"Machine: {machine_line(report['machine'])}. {report['rounds']} rounds of the default digits run"
             + (f" with {spares} spare head{'s' if spares > 1 else ''}" if spares else "")
             + f" on {report['nodes']} Ray nodes on 127.0.0.1.", "",
             markdown_table(["scenario", "rounds merged", "samples merged", "merged rounds lost", "rounds redone",
                             "final accuracy",
                             "wall s", "wall vs calm", "MLflow points", "what happened"], rows)]
    for name, r in runs.items():
        if r["faults"]:
            lines += ["", f"Faults injected ({name}): " + "; ".join(r["faults"]) + "."]
    verdict = report.get("problems") or []
    lines += ["", "Targets: " + ("all met" if not verdict else "missed: " + "; ".join(verdict)) + "."]
    return "\n".join(lines)
