"""`lte-ray bench chaos` end to end, tiny (issue 12): on three loopback raylets with a real MLflow
server, a calm run and one with every fault (heads SIGKILLed, a node killed, the coordinator
killed, a straggler, a poisoner, MLflow down); no merged round lost, MLflow holds each round once.
Its accuracy and wall-time targets are for the default run (docs/benchmarks.md), not this one."""

import json
import os
import subprocess
import sys

import pytest

# 16, not 12: when the fault thread lags (a loaded machine), the faults of several rounds land at once, the
# early head kills with the coordinator kill, before any loss is counted; the kills after the restart then
# need rounds left to be noticed in (12 once ended with none counted).
ROUNDS = 16
TINY = ["model.depth=1", "model.width=32", "model.attn_heads=2", "lte.rank=4", "lte.merge_every=2",
        "train.batch_size=16", "ray.cpus_per_head=0.5", "train.eval_every=4"]


@pytest.mark.slow
def test_bench_chaos_tiny_loses_no_merged_round(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "lte_ray.cli", "bench", "chaos", "--rounds", str(ROUNDS), "--scenarios", "calm,chaos",
           "--output", str(tmp_path)] + [x for kv in TINY for x in ("--set", kv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a target of the default run missed
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "chaos.json").read_text())
    print("\n" + (tmp_path / "chaos.md").read_text())
    runs = {r["scenario"]: r for r in report["runs"]}
    for r in runs.values():
        assert r["rounds"] == ROUNDS and r["merged_rounds_lost"] == 0 and r["rounds_shown_twice"] == 0
        assert r["mlflow_points"] == ROUNDS and r["mlflow_steps_twice"] == 0
    chaos = runs["chaos"]
    faults = " ".join(chaos["faults"])
    for what in ("SIGKILLed", "node", "coordinator killed", "MLflow server stopped", "MLflow server started again",
                 "slower", "poisons"):
        assert what in faults
    # Losses noticed after the last checkpoint die with the killed coordinator's counters, and a run may end
    # before a late kill is noticed: at least one is counted.
    assert chaos["counters"]["coordinator_restarts"] == 1 and chaos["counters"]["heads_lost"] >= 1
    assert runs["calm"]["counters"]["heads_lost"] == 0 and not runs["calm"]["faults"]
