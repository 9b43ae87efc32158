"""Cluster use: cluster/ files parse and name only files that exist; job configs load; a real
local Ray cluster (`cluster/local.sh run` = `ray start --head` on 127.0.0.1) runs `ray job submit`
jobs: a training job that succeeds and is in MLflow, a bad config that fails with one line, a sweep."""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from lte_ray.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(p for p in (ROOT / "cluster").rglob("*") if p.is_file())


def test_cluster_yaml_parses_and_named_files_exist():
    yamls = [p for p in CLUSTER_FILES if p.suffix == ".yaml"]
    assert len(yamls) >= 3
    for path in yamls:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    named = set()
    for path in CLUSTER_FILES:
        named |= set(re.findall(r"\b((?:jobs|cluster)/[\w./-]+\.(?:py|yaml|sh))", path.read_text()))
    assert {"jobs/train.py", "jobs/configs/digits.yaml", "jobs/configs/cifar10_vit_s.yaml"} <= named
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"named in cluster/ but missing: {missing}"
    assert subprocess.run(["bash", "-n", str(ROOT / "cluster" / "local.sh")]).returncode == 0


def test_every_job_config_is_valid(tmp_path):
    (tmp_path / "text.txt").write_text("hello world " * 100)
    for path in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        name = raw.get("data", {}).get("name", "digits")
        overrides = {}
        if name == "folder":
            overrides["data.path"] = str(tmp_path)
        elif name == "text":
            overrides["data.path"] = str(tmp_path / "text.txt")
        cfg = load_config(str(path), overrides)
        assert cfg.rounds >= 1, path


@pytest.fixture(scope="module")
def job_cluster():
    """A real head node from cluster/local.sh, on its own ports; stopped (only it) at the end."""
    env = {**os.environ, "LTE_RAY_PORT": "6391", "LTE_RAY_DASHBOARD_PORT": "8291", "LTE_RAY_AGENT_PORT": "52391",
           "LTE_RAY_CPUS": "8"}
    proc = subprocess.Popen(["bash", str(ROOT / "cluster" / "local.sh"), "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = "http://127.0.0.1:8291"
    client_env = {**os.environ, "RAY_AUTH_MODE": "token"}
    client_env.pop("RAY_ADDRESS", None)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if subprocess.run(["ray", "job", "list", "--address", address], env=client_env,
                              capture_output=True).returncode == 0:
                break
            assert proc.poll() is None, "the head node did not start"
            time.sleep(2)
        else:
            pytest.fail("the job server did not come up")
        yield address, client_env
    finally:
        proc.terminate()  # `ray start --block` takes its processes down with it
        proc.wait(timeout=120)


def _submit(address: str, env: dict, *entrypoint: str) -> tuple[str, str]:
    job_id = f"lte-test-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(["ray", "job", "submit", "--address", address, "--submission-id", job_id,
                             "--working-dir", ".", "--", "python", *entrypoint], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    status = subprocess.run(["ray", "job", "status", "--address", address, job_id], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    if "does not exist" in status:  # the submission itself failed: say why
        status += "\nray job submit printed:\n" + submit.stdout[-3000:]
    logs = subprocess.run(["ray", "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    found = re.search(r"Job '[^']+' (\w+)", status)  # e.g. "Job 'lte-test-1' succeeded"
    return (found.group(1) if found else status), logs


KILL_COORDINATOR = """
import os, sys, time
from lte_ray.checkpoint import checkpoint_meta
import ray
out = sys.argv[1]
deadline = time.time() + 600
while time.time() < deadline:
    meta = checkpoint_meta(out) if os.path.exists(os.path.join(out, "checkpoint.safetensors")) else None
    if meta and meta["round"] >= 2:
        break
    time.sleep(0.2)
ray.init(address="127.0.0.1:6391", namespace="lte-ray", log_to_driver=False)
ray.kill(ray.get_actor(os.path.basename(out), namespace="lte-ray"), no_restart=True)
print("killed at round", meta["round"])
"""


@pytest.mark.slow
def test_ray_job_submit_train_succeeds_and_is_tracked_through_a_coordinator_kill(job_cluster, tmp_path):
    address, env = job_cluster
    assert (Path.home() / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600  # cluster/local.sh
    out = tmp_path / "job"
    killer = subprocess.Popen([sys.executable, "-c", KILL_COORDINATOR, str(out)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    status, logs = _submit(address, env, "jobs/train.py", "--config", "jobs/configs/digits.yaml", "--rounds", "12",
                           "--output", str(out), "--set", "ray.cpus_per_head=0.5")
    killed = killer.communicate(timeout=120)[0]
    assert "killed at round" in killed, killed[-2000:]
    assert status == "succeeded", status + logs[-3000:]
    assert "lte-ray: lte on digits" in logs and "eval_accuracy" in logs and "samples seen" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 12 and summary["coordinator_restarts"] == 1
    logged = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13))  # no merged round lost, none twice

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("lte-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == summary["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 13))  # MLflow never got a step twice


@pytest.mark.slow
def test_ray_job_with_invalid_config_fails_with_one_line(job_cluster):
    address, env = job_cluster
    status, logs = _submit(address, env, "jobs/train.py", "--config", "jobs/configs/digits.yaml", "--rank", "0")
    assert status == "failed", status
    assert "lte-ray: error: lte.rank: must be >= 1 (got 0)" in logs
    assert "Traceback" not in logs


@pytest.mark.slow
def test_ray_job_submit_sweep(job_cluster, tmp_path):
    address, env = job_cluster
    out = tmp_path / "sweep"
    status, logs = _submit(address, env, "jobs/sweep.py", "--config", "jobs/configs/digits.yaml",
                           "--grid", "lte.rank=2,4", "--rounds", "2", "--output", str(out),
                           "--set", "ray.cpus_per_head=0.5", "--set", "model.depth=1", "--set", "train.eval_every=1")
    assert status == "succeeded", status + logs[-3000:]
    best = json.loads((out / "best_config.json").read_text())
    assert best["best"]["params"]["lte.rank"] in (2, 4) and len(best["trials"]) == 2
