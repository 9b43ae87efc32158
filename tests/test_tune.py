"""A 2 x 2 Tune grid (rank x heads) on digits, with placement groups: every trial is its own MLflow
run under the sweep's parent run, and best_config.json names one of the four trials."""

import json

import mlflow
import pytest

from lte_ray.cli import main


@pytest.mark.slow
def test_rank_by_heads_grid(ray_cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["tune", "--output", str(out), "--grid", "lte.rank=2,4", "--grid", "lte.heads=1,2", "--rounds", "3",
               "--set", "train.eval_every=1", "--set", "model.depth=1", "--set", "model.width=32",
               "--set", "model.attn_heads=2", "--set", "ray.cpus_per_head=0.5",
               "--set", "ray.coordinator_gpus=0.25"])  # each trial's coordinator gets its own GPU bundle
    assert rc == 0
    assert "trials ranked by eval_accuracy" in capsys.readouterr().out
    report = json.loads((out / "best_config.json").read_text())
    trials = report["trials"]
    assert len(trials) == 4 and not any(t["error"] for t in trials)
    assert {(t["params"]["lte.rank"], t["params"]["lte.heads"]) for t in trials} == {(2, 1), (2, 2), (4, 1), (4, 2)}
    assert report["best"]["trial_id"] in {t["trial_id"] for t in trials}
    assert report["best"]["eval_accuracy"] == max(t["eval_accuracy"] for t in trials)
    assert report["best_config"]["lte"]["rank"] == report["best"]["params"]["lte.rank"]

    client = mlflow.MlflowClient(tracking_uri=report["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("lte-ray").experiment_id])
    parent = [r for r in runs if r.info.run_id == report["mlflow_parent_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == report["mlflow_parent_run_id"]]
    assert len(parent) == 1 and len(children) == 4 and len(runs) == 5
    assert {r.info.run_name for r in children} == {t["trial_id"] for t in trials}
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval_accuracy")]
        assert steps == [1, 2, 3]  # per-round evaluations
    assert parent[0].data.tags["best_trial"] == report["best"]["trial_id"]


def test_bad_sweep_values_fail_before_any_trial(capsys):
    assert main(["tune", "--grid", "lte.rank=4,0"]) == 2
    assert "lte.rank: must be >= 1 (got 0)" in capsys.readouterr().err
    assert main(["tune", "--loguniform", "train.lr=1e-3"]) == 2
    assert "expected section.key=LOW,HIGH" in capsys.readouterr().err
    assert main(["tune"]) == 2
    assert "nothing to sweep" in capsys.readouterr().err


def test_a_trial_reserves_a_bundle_per_head_and_spare(tiny_cfg):
    from lte_ray.tune import trial_resources

    pgf = trial_resources(tiny_cfg(**{"lte.heads": 2, "ray.spare_heads": 1, "ray.cpus_per_head": 0.5}))({})
    assert pgf.bundles == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.5}]  # trial + 2 heads + 1 spare
