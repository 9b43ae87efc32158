"""LTE on Ray: equivalence with core.simulate, fractional GPUs, object traffic, invalid uploads,
a killed head, a head joining from another process, and resuming a killed run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import ray
import torch

from lte_ray.checkpoint import checkpoint_meta
from lte_ray.core.simulate import simulate
from lte_ray.runtime.launch import train


def _name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _coordinator(name: str):
    return ray.get_actor(name, namespace="lte-ray")


@pytest.mark.parametrize("upload", ["fp32", "int8"])
def test_ray_run_equals_simulate(ray_cluster, ray_cfg, tmp_path, upload):
    """Exact fp32 uploads, and lossy ones (the head and the coordinator decode the same values)."""
    cfg = ray_cfg(**{"lte.heads": 3, "train.rounds": 3, "lte.quant": "none", "lte.replicas": "average",
                     "lte.upload": upload})
    on_ray = train(cfg, run_name=_name(), output_dir=str(tmp_path))
    local = simulate(cfg)
    assert on_ray.rounds == 3 and on_ray.samples_seen == local.samples_seen
    diff = max((on_ray.state[k] - local.state[k]).abs().max().item() for k in local.state)
    assert diff < 1e-5, f"max abs difference {diff:.2e}"
    moved = max((local.state[k] - simulate(cfg.replace({"train.rounds": 1})).state[k]).abs().max().item()
                for k in local.state)
    assert moved > 1e-4  # the weights did change over the rounds compared


def test_fractional_gpus_traffic_and_device(ray_cluster, ray_cfg, tmp_path):
    cfg = ray_cfg(**{"lte.heads": 4, "ray.gpus_per_head": 0.25, "train.rounds": 3, "lte.quant": "nf4",
                     "lte.replicas": "frozen"})
    name, seen = _name(), {}

    def on_round(rec):
        if rec.round == 1:
            seen["workers"] = ray.get(_coordinator(name).workers.remote())
        seen.setdefault("records", []).append(rec)

    result = train(cfg, run_name=name, output_dir=str(tmp_path), on_round=on_round)
    workers = seen["workers"]
    # Four live heads at round 1, each holding 0.25 of GPU 0, on a node with exactly one GPU: all four
    # scheduled at once. (ray.available_resources() is eventually consistent, so it is not read here.)
    assert len(workers) == 4 and ray.cluster_resources()["GPU"] == 1.0
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    for info in workers.values():
        assert info["gpu_ids"] == ["0"] and info["cuda_visible_devices"] == "0"
        assert info["device"].startswith(expected_device)
    assert all(rec.active_heads == 4 for rec in seen["records"])

    # Object traffic. Down: one nf4 payload per head per round, <= 0.16x of the fp32 weights
    # (a head's first payload also carries the frozen replica parameters, once).
    fp32_bytes = sum(v.numel() * 4 for v in result.state.values())
    for rec in seen["records"][1:]:
        assert rec.bytes_down / rec.active_heads <= 0.16 * fp32_bytes
    first = seen["records"][0].bytes_down / 4
    assert first > seen["records"][1].bytes_down / 4
    assert sum(r.bytes_down for r in seen["records"]) / (4 * 3) <= 0.16 * fp32_bytes
    # Up: a head's first upload is its factors and their start, (d_out + d_in) x 2r fp32 numbers per
    # layer; after that only the change of its factors, (d_out + d_in) x r numbers in bf16 (the default).
    from lte_ray.core.lora import target_names
    from lte_ray.data import load_data
    from lte_ray.models import build_model

    data = load_data(cfg.data, cfg.model)
    model = build_model(cfg.model, data.spec)
    targets = target_names(model, cfg.lte.targets, cfg.lte.output_as_replica)
    numbers = sum((m.in_features + m.out_features) * cfg.lora_rank for n, m in model.named_modules() if n in targets)
    assert cfg.lte.upload == "bf16" and seen["records"][0].bytes_up == 4 * numbers * 2 * 4
    assert all(rec.bytes_up == 4 * numbers * 2 for rec in seen["records"][1:])
    assert result.counters.bytes_up == 4 * numbers * (8 + 2 * 2)


def test_invalid_uploads_are_rejected_and_the_run_completes(ray_cluster, ray_cfg, tmp_path):
    # Enough rounds that the run is still going when the driver sees round 1 (it polls every
    # 0.5 s; six tiny rounds could all finish before that, and the heads be gone).
    cfg = ray_cfg(**{"lte.heads": 3, "train.rounds": 40, "lte.quant": "none"})
    name = _name()

    def on_round(rec):
        if rec.round == 1:
            # heads without GPUs see none, on this node that advertises one (Ray 2.60 no longer hides it)
            infos = ray.get(_coordinator(name).workers.remote())
            assert ray.cluster_resources()["GPU"] == 1.0
            assert infos and all(i["cuda_visible_devices"] == "" and i["gpu_ids"] == [] for i in infos.values())
            handles = ray.get(_coordinator(name).worker_handles.remote())
            ids = sorted(handles)
            ray.get([handles[ids[0]].corrupt_next.remote("nan"), handles[ids[1]].corrupt_next.remote("shape"),
                     handles[ids[2]].corrupt_next.remote("type")])

    result = train(cfg, run_name=name, output_dir=str(tmp_path), on_round=on_round)
    assert result.rounds == 40 and result.counters.heads_rejected == 3
    assert all(torch.isfinite(v).all() for v in result.state.values() if v.is_floating_point())


@pytest.mark.slow
def test_sigkill_of_a_head_mid_round(ray_cluster, tmp_path):
    from lte_ray.resolve import build_config

    # T = 10: rounds long enough for a replacement head to start and join within the run
    cfg = build_config({}, {"ray.cpus_per_head": 0.5, "train.rounds": 25, "lte.quant": "nf4", "lte.merge_every": 10,
                            "train.warmup_rounds": 5})
    name, killed = _name(), {}

    def on_round(rec):
        if rec.round == 3 and not killed:
            workers = ray.get(_coordinator(name).workers.remote())
            head_id, info = sorted(workers.items())[0]
            os.kill(info["pid"], signal.SIGKILL)
            killed["head"] = head_id

    result = train(cfg, run_name=name, output_dir=str(tmp_path), on_round=on_round)
    print(f"\nSIGKILL of head {killed['head']}: {result.counters}, accuracy {result.final['eval_accuracy']:.4f}")
    assert result.rounds == 25
    assert result.counters.heads_lost >= 1 and result.counters.heads_joined >= 1
    assert result.final["eval_accuracy"] >= 0.90


@pytest.mark.slow
def test_lte_ray_join_from_a_second_process(ray_cluster, tmp_path):
    from lte_ray.resolve import build_config

    cfg = build_config({}, {"ray.cpus_per_head": 0.5, "ray.start_grace_s": 600, "lte.heads": 2, "train.rounds": 40,
                            "lte.quant": "nf4", "lte.merge_every": 10})  # T = 10: time for the joiner to start
    name, records, box = _name(), [], {}
    runner = threading.Thread(target=lambda: box.setdefault("result", train(
        cfg, run_name=name, output_dir=str(tmp_path), on_round=records.append)))
    runner.start()
    while not records:  # the run is up
        time.sleep(0.5)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    join = [sys.executable, "-m", "lte_ray.cli", "join", "--address", ray_cluster, "--run", name, "--secret-file"]
    wrong = tmp_path.parent / f"{name}-wrong-secret"
    wrong.write_text("guess\n")
    refused = subprocess.run(join + [str(wrong)], capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode == 2 and "wrong join secret" in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "join-secret").stat().st_mode & 0o777 == 0o600
    joiner = subprocess.run(join + [str(tmp_path / "join-secret")], capture_output=True, text=True, timeout=600,
                            env=env)
    runner.join(timeout=600)
    assert joiner.returncode == 0, joiner.stderr[-2000:]
    result = box["result"]
    assert result.counters.heads_joined >= 1
    later = [r for r in records if 2 in r.head_losses]  # head ids 0, 1 started; the joiner is 2
    assert later and all(r.active_heads == 3 for r in later)
    assert later[-1].round == 40  # it took part until the end
    print(f"\njoined head trained in rounds {later[0].round}..{later[-1].round}")


@pytest.mark.slow
def test_resume_after_killing_driver_and_coordinator(ray_cluster, tmp_path):
    import mlflow

    out = tmp_path / "run"
    rounds = 30
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = [sys.executable, "-m", "lte_ray.cli", "train", "--quiet", "--address", ray_cluster, "--output", str(out),
           "--rounds", str(rounds), "--set", "ray.cpus_per_head=0.5", "--set", "ray.start_grace_s=600"]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            meta = checkpoint_meta(out) if (out / "checkpoint.safetensors").exists() else None
            if meta and meta["round"] >= 3:
                break
            time.sleep(0.3)
        assert meta and meta["round"] >= 3, "no checkpoint appeared"
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies; Ray then ends its coordinator
        driver.wait()
    killed_at = checkpoint_meta(out)["round"]
    assert killed_at < rounds
    deadline = time.time() + 120
    while time.time() < deadline:  # the coordinator goes with its driver
        try:
            _coordinator(out.name)
            time.sleep(0.5)
        except ValueError:
            break

    from lte_ray.cli import main

    assert main(["train", "--quiet", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # no round lost or counted twice (a head late for the straggler grace adds nothing to its round)
    steps_per_round = summary["config"]["lte"]["merge_every"]
    assert summary["samples_seen"] == sum(r["active_heads"] for r in records) * steps_per_round * 32
    assert sum(r["active_heads"] for r in records) >= 0.9 * 4 * rounds
    logged = [r["round"] for r in records]
    assert len(logged) == len(set(logged)) and logged == sorted(logged) and logged[-1] == rounds
    assert killed_at + 1 in logged

    client = mlflow.MlflowClient(tracking_uri=summary["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("lte-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == rounds
    print(f"\nkilled after checkpoint of round {killed_at}; resumed to round {rounds}")


@pytest.mark.slow
def test_default_train_on_ray_reaches_90_percent_and_logs_to_mlflow(ray_cluster, tmp_path):
    import mlflow

    from lte_ray.cli import main

    out = tmp_path / "default"
    assert main(["train", "--quiet", "--output", str(out), "--set", "ray.cpus_per_head=0.5",
                 "--set", "ray.start_grace_s=600"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nRay, int8: accuracy {summary['eval_accuracy']:.4f} in {summary['wall_seconds']:.0f}s; "
          f"down {summary['bytes_down']:,} B, up {summary['bytes_up']:,} B")
    assert summary["eval_accuracy"] >= 0.90 and summary["config"]["lte"]["quant"] == "int8"
    for key in ("bytes_up", "bytes_down", "heads_joined", "heads_lost"):
        assert key in summary

    mlflow.set_tracking_uri(summary["mlflow_uri"])
    runs = mlflow.search_runs(experiment_names=["lte-ray"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["lte.heads"] == "4" and run.data.params["lte.quant"] == "int8"
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, 121))
    acc = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [m.step for m in acc] == [20, 40, 60, 80, 100, 120] and acc[-1].value >= 0.90
    for metric in ("active_heads", "bytes_down", "round_seconds", "merge_seconds", "train_loss_head_0"):
        assert client.get_metric_history(run.info.run_id, metric)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "config.yaml", "eval_curve.png"} <= artifacts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model.safetensors",
                                                dst_path=str(tmp_path / "dl"))
    from safetensors.torch import load_file

    assert set(load_file(local)) == set(load_file(out / "model.safetensors"))


def test_a_run_name_already_in_use_is_a_clear_error(ray_cluster, ray_cfg, tmp_path):
    from ray.util.queue import Queue

    from lte_ray.errors import UserError

    name = _name()
    taken = Queue(actor_options={"name": name, "namespace": "lte-ray"})  # any named actor holds the name
    try:
        with pytest.raises(UserError, match=f"a run named '{name}' is already running"):
            train(ray_cfg(), run_name=name, output_dir=str(tmp_path))
    finally:
        taken.shutdown()
