"""`lte-ray bench quality` and `lte-ray bench system` in tiny settings: the JSON schema, and
finite metrics from every method; plus the arithmetic behind their tables."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lte_ray.bench.quality import DATASETS, SETTINGS, aggregate
from lte_ray.bench.system import dp_allreduce_bytes, time_split
from lte_ray.cli import main


def finite(obj):
    """True if every number in a nested JSON-like object is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(finite(v) for v in obj)
    return True


def _runs(setting, curves, metric="eval_accuracy"):
    return [{"setting": setting, "seed": seed, "method": setting, "wall_seconds": 1.0,
             "curve": [{"samples": 100 * (i + 1), metric: v} for i, v in enumerate(curve)],
             "final": {metric: curve[-1]}} for seed, curve in enumerate(curves)]


def test_samples_to_target_is_read_off_the_seed_mean_curves():
    ds = DATASETS["digits"]
    settings = [s for s in SETTINGS if s.key in ("full", "lte", "lora")]
    runs = (_runs("full", [[0.5, 0.9, 0.9], [0.5, 0.9, 0.9]]) + _runs("lte", [[0.4, 0.7, 0.92], [0.4, 0.7, 0.9]])
            + _runs("lora", [[0.3, 0.5, 0.6]]))
    out = aggregate(ds, runs, settings)
    rows = {m["key"]: m for m in out["methods"]}
    assert out["target"] == pytest.approx(0.9) and out["full_samples_to_target"] == 200
    assert rows["full"]["ratio_to_full"] == 1.0
    assert rows["lte"]["samples_to_target"] == 300 and rows["lte"]["ratio_to_full"] == pytest.approx(1.5)
    assert rows["lte"]["final"]["eval_accuracy"]["mean"] == pytest.approx(0.91)
    assert rows["lte"]["curve"]["min"] == [0.4, 0.7, 0.9]
    assert rows["lora"]["samples_to_target"] is None and rows["lora"]["ratio_to_full"] is None


def test_a_loss_target_is_reached_from_above():
    ds = DATASETS["shakespeare"]
    settings = [s for s in SETTINGS if s.key in ("full", "lte")]
    runs = _runs("full", [[3.0, 2.0, 1.5]], "eval_loss") + _runs("lte", [[3.1, 1.6, 1.4]], "eval_loss")
    rows = {m["key"]: m for m in aggregate(ds, runs, settings)["methods"]}
    assert rows["full"]["samples_to_target"] == 300 and rows["lte"]["samples_to_target"] == 300


def test_data_parallel_traffic_and_the_time_split():
    assert dp_allreduce_bytes(params=1000, workers=4, steps=10) == 2 * 3 * 4 * 1000 * 10
    assert dp_allreduce_bytes(params=1000, workers=1, steps=10) == 0
    recs = [{"round_seconds": 9.0, "head_seconds": 9.0}] + [
        {"round_seconds": 1.0, "head_seconds": 0.5, "quantize_seconds": 0.1, "merge_seconds": 0.1,
         "collect_seconds": 0.1, "evaluation_seconds": 0.3, "checkpoint_seconds": 0.2}] * 3
    split = time_split(recs)  # round 1 (start-up) is left out
    assert split["rounds_averaged"] == 3 and split["round_seconds"] == 1.0
    assert split["transfer_seconds"] == pytest.approx(0.2)  # evaluation and checkpoint are not on the path
    assert split["critical_path_seconds"] == pytest.approx(0.5) and split["non_head_share"] == pytest.approx(0.5)
    assert split["background"] == pytest.approx({"evaluation_seconds": 0.3, "checkpoint_seconds": 0.2})


def test_unknown_bench_settings_are_one_line_errors(capsys):
    assert main(["bench", "quality", "--methods", "lte,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lte-ray: error: --methods: unknown nope") and "Traceback" not in err
    assert main(["bench", "quality", "--samples", "5000", "--evals", "3", "--datasets", "digits"]) == 2
    assert "whole number of rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quality_tiny_writes_every_method_with_finite_metrics(tmp_path):
    out = tmp_path / "q"
    assert main(["bench", "quality", "--samples", "2560", "--evals", "2", "--seeds", "1", "--output", str(out),
                 "--set", "train.warmup_rounds=2"]) == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["bench"] == "quality" and report["schema"] == 1 and report["skipped"] == []
    assert report["set"] == ["train.warmup_rounds=2"]
    config = (out / "runs" / "digits-full-seed0" / "config.yaml").read_text()
    assert "warmup_rounds: 2" in config  # --set reaches full-rank too
    assert {"cpu", "cores", "memory_gib", "gpu", "torch", "timm", "scikit-learn"} <= set(report["machine"])
    assert [d["name"] for d in report["datasets"]] == ["digits", "mnist", "shakespeare", "kjv"]
    for ds in report["datasets"]:
        # The defaults: every baseline (Fira among them) and LTE with the default recipe.
        assert [m["key"] for m in ds["methods"]] == ["full", "lora", "lora-merge", "mhlora", "galore", "fira", "lte"]
        assert math.isfinite(ds["target"]) and ds["budget_samples"] == 2560
        for m in ds["methods"]:
            assert m["curve"]["samples"] == [1280, 2560]
            assert {"mean", "std", "values"} <= set(m["final"][ds["metric"]])
            assert finite(m["final"]) and finite(m["curve"]), (ds["name"], m["key"])
            assert m["samples_to_target"] is None or m["samples_to_target"] in (1280, 2560)
        methods = {m["key"]: m["method"] for m in ds["methods"]}
        assert methods["galore"] == "galore" and methods["lora-merge"] == "lora-merge" and methods["fira"] == "fira"
        # every setting is a different run (its final loss, continuous even where accuracies can tie)
        finals = {m["key"]: tuple(f["mean"] for f in m["final"].values()) for m in ds["methods"]}
        assert len(set(finals.values())) == len(finals)
    md = (out / "quality.md").read_text()
    assert "| setting | seeds |" in md and "ratio to full-rank" in md
    assert "Set for every setting, full-rank too (over the data sets' own values below): `train.warmup_rounds=2`." in md
    assert (out / "quality.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_system_tiny_splits_time_traffic_memory_and_overhead(tmp_path, ray_cluster, capsys):
    out = tmp_path / "s"
    args = ["bench", "system", "--rounds", "3", "--output", str(out), "--set", "model.depth=2",
            "--set", "model.width=32", "--set", "model.attn_heads=2", "--set", "ray.cpus_per_head=0.5",
            "--set", "ray.start_grace_s=600", "--set", "train.device=cpu",
            # rank 4 of width 32: the default recipe's rank 16 (width / 2 with 4 heads) would give a head
            # as much training state as a full-rank worker, and the comparison below is for a lean head
            "--set", "lte.rank=4"]
    assert main(args) == 0
    report = json.loads((out / "system.json").read_text())
    assert report["bench"] == "system" and report["schema"] == 3 and finite(report)
    t = report["time"]
    parts = ["head_seconds", "quantize_seconds", "collect_seconds", "merge_seconds", "transfer_seconds"]
    assert all(t[k] >= 0 for k in parts) and t["head_seconds"] > 0
    assert sum(t[k] for k in parts) == pytest.approx(t["round_seconds"], rel=1e-6)
    assert t["critical_path_seconds"] == pytest.approx(t["round_seconds"] - t["head_seconds"])
    assert t["background"]["evaluation_seconds"] > 0 and t["background"]["checkpoint_seconds"] > 0
    tr = report["traffic"]
    assert tr["heads"] == 4 and 0 < tr["ratio_to_dp"] < 0.2
    assert tr["dp_allreduce_bytes_per_round"] == 2 * 3 * 4 * tr["params"] * report["config"]["lte"]["merge_every"]
    mem = {r["quant"] + ("" if "head" in r["label"] else "-full"): r for r in report["memory"]}
    params_bytes = 4 * tr["params"]
    assert mem["none-full"]["weights"] == mem["none-full"]["gradients"] == params_bytes
    assert mem["none-full"]["optimizer_state"] == 2 * params_bytes  # AdamW: two moments per parameter
    assert mem["none"]["weights"] == params_bytes
    assert mem["nf4"]["weights"] < mem["int8"]["weights"] < mem["none"]["weights"]
    assert mem["nf4"]["total"] < mem["none-full"]["total"]
    assert all(r["step_seconds"] > 0 and r["precision"] == "fp32" and not r["activation_checkpointing"]
               for r in report["memory"])
    th = report["throughput"]
    assert th["ray_samples_per_s"] > 0 and th["simulate_samples_per_s"] > 0
    printed = capsys.readouterr().out
    assert "**Time per round**" in printed and "LTE / data-parallel" in printed and "Ray / simulate" in printed
    assert "critical path besides the slowest head" in printed and "(background, overlapping)" in printed


def test_bench_merge_tiny_times_both_paths_and_projects(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["bench", "merge", "--heads", "2,3", "--width", "32", "--depth", "1", "--rank", "4",
                 "--project", "8,1024", "--output", str(out)]) == 0
    report = json.loads((out / "merge.json").read_text())
    assert report["bench"] == "merge" and report["schema"] == 1 and finite(report)
    paths = [(r["heads"], r["path"].split(":")[0]) for r in report["rows"] if r["device"] == "cpu"]
    assert paths == [(2, "before"), (2, "after"), (3, "before"), (3, "after")]
    before, after = report["rows"][0], report["rows"][1]
    assert after["ingress_bytes"] == before["ingress_bytes"] / 4  # rank r in bf16 against rank 2r in fp32
    assert len(report["projection"]) == 3 * 2 and report["projection"][-1]["heads"] == 1024
    assert "**Projection**" in capsys.readouterr().out
    assert main(["bench", "merge", "--heads", "0"]) == 2
    assert "--heads: give whole numbers >= 1 (got 0)" in capsys.readouterr().err


def test_budget_factor_extends_every_setting_but_full_rank_on_the_same_grid():
    from lte_ray.bench.quality import run_config

    ds, by_key = DATASETS["shakespeare"], {s.key: s for s in SETTINGS}
    full = run_config(ds, by_key["full"], 0, 25_600, 10, "cpu", budget_factor=3)
    lte = run_config(ds, by_key["lte-t10"], 0, 25_600, 10, "cpu", budget_factor=3)
    assert full.rounds * full.samples_per_round == 25_600
    assert lte.rounds * lte.samples_per_round == 3 * 25_600
    assert full.train.eval_every * full.samples_per_round == lte.train.eval_every * lte.samples_per_round == 2_560
    assert (full.full_rank_lr, lte.factor_lr) == (8e-3, 1e-3)  # the factors: the full-rank lr / s


def test_set_reaches_full_rank_too_and_a_budget_factor_may_be_fractional():
    from lte_ray.bench.quality import run_config
    from lte_ray.errors import UserError

    ds, by_key = DATASETS["shakespeare"], {s.key: s for s in SETTINGS}
    sets = {"train.warmup_rounds": 20, "train.min_lr_ratio": 0.2}
    full = run_config(ds, by_key["full"], 0, 25_600, 10, "cpu", budget_factor=1.5, sets=sets)
    lte = run_config(ds, by_key["lte"], 0, 25_600, 10, "cpu", budget_factor=1.5, sets=sets)
    assert (full.train.warmup_rounds, full.train.min_lr_ratio) == (lte.train.warmup_rounds, lte.train.min_lr_ratio) \
        == (20, 0.2)
    assert full.rounds * full.samples_per_round == 25_600 and lte.rounds * lte.samples_per_round == 38_400
    with pytest.raises(UserError, match="--budget-factor 1.25: lte would train 100 rounds, not a whole number"):
        run_config(ds, by_key["lte"], 0, 25_600, 10, "cpu", budget_factor=1.25)
    # a setting's own overrides win over --set
    assert run_config(ds, by_key["lte-t10"], 0, 25_600, 10, "cpu", sets={"lte.merge_every": 5}).lte.merge_every == 10


def test_a_finished_run_is_read_back_not_trained_again(tmp_path, monkeypatch):
    from lte_ray.bench import quality
    from lte_ray.errors import UserError

    job = {"dataset": "digits", "setting": "full", "overrides": {"method": "full"}, "reference": True,
           "seed": 0, "budget": 5120, "evals": 2, "device": "cpu",
           "budget_factor": 1, "output": str(tmp_path)}
    first = quality.run_one(job)
    folder = tmp_path / "runs" / "digits-full-seed0"
    rounds = len((folder / "metrics.jsonl").read_text().splitlines())
    assert (folder / "summary.json").exists() and rounds == 8  # 5,120 samples, 640 a round (T = 5)
    monkeypatch.setattr("lte_ray.run.Run.train", lambda *a, **k: pytest.fail("trained again"))
    again = quality.run_one(job)
    assert again["curve"] == first["curve"] and again["final"] == first["final"]
    # a run of an older version, before a field was added (at a default that keeps the old behaviour)
    summary = json.loads((folder / "summary.json").read_text())
    del summary["config"]["ray"]["spare_heads"]
    (folder / "summary.json").write_text(json.dumps(summary))
    assert quality.run_one(job)["final"] == first["final"]
    # an output folder copied elsewhere: its runs still read back
    import shutil
    shutil.copytree(tmp_path / "runs", tmp_path / "copy" / "runs")
    assert quality.run_one({**job, "output": str(tmp_path / "copy")})["final"] == first["final"]
    with pytest.raises(UserError, match="holds a finished run of another config"):
        quality.run_one({**job, "budget": 10240})
    # a --budget-factor run in the same folder: full-rank (not extended) reads back
    assert quality.run_one({**job, "budget_factor": 2})["final"] == first["final"]
    # A bench whose folders clash stops before it trains anything, and leaves the folder's report alone.
    assert quality.clashes([job, {**job, "budget": 10240}]) == [str(folder)]
    (tmp_path / "quality.md").write_text("an earlier report")
    monkeypatch.setattr(quality, "run_pool", lambda *a, **k: pytest.fail("ran despite a clash"))
    with pytest.raises(UserError, match="1 of its run folders holds a finished run made with other settings"):
        quality.bench_quality(str(tmp_path), datasets=["digits"], methods=["full"], seeds=1, samples=5120, evals=2,
                              set_items=["train.full_lr=0.001"])
    assert (tmp_path / "quality.md").read_text() == "an earlier report"


def test_a_budget_factor_run_has_its_own_folders_and_report_beside_the_1x_ones():
    from lte_ray.bench.quality import report_name, run_folder
    from lte_ray.bench.quality_settings import Setting

    lte, full = Setting("lte", "LTE", {}, False), Setting("full", "full-rank", {"method": "full"}, True)
    assert run_folder("kjv", lte, 1, 1) == "kjv-lte-seed1" and run_folder("kjv", lte, 1, 2) == "kjv-lte-x2-seed1"
    assert run_folder("kjv", lte, 0, 1.5) == "kjv-lte-x1.5-seed0"
    assert run_folder("kjv", full, 0, 2) == run_folder("kjv", full, 0, 1) == "kjv-full-seed0"
    assert (report_name(1), report_name(2), report_name(1.5)) == ("quality", "quality_x2", "quality_x1.5")


def test_a_copied_bench_folder_reads_its_prepared_tokens_at_their_new_place():
    """A run's data path inside its bench folder (the prepared BPE tokens) moves with the folder;
    a data path outside it is the run's config and must match as it is."""
    from lte_ray.bench.quality import _moved

    stored = {"output": "/old/bench/runs/kjv-full-seed0",
              "data": {"name": "tokens", "path": "/old/bench/data/kjv-bpe512"}}
    moved = _moved(stored, "/new/b/runs/kjv-full-seed0")
    assert moved["data"]["path"] == "/new/b/data/kjv-bpe512" and moved["output"] == "/new/b/runs/kjv-full-seed0"
    outside = {**stored, "data": {"name": "tokens", "path": "/corpora/kjv"}}
    assert _moved(outside, "/new/b/runs/kjv-full-seed0")["data"]["path"] == "/corpora/kjv"


def test_bench_system_workers_per_precision_and_checkpointing_and_folder_loading(tmp_path, capsys):
    """`--only-workers`: no timed runs; a row group per setting; checkpointing cuts activations of
    heads and full-rank alike; bf16 halves what is saved; image folders get loader rows."""
    from PIL import Image

    folder = tmp_path / "images"
    for c in range(3):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((12, 12), 20 * i + c, dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    out = tmp_path / "w"
    args = ["bench", "system", "--only-workers", "--output", str(out), "--set", "model.depth=2",
            "--set", "model.width=32", "--set", "model.attn_heads=2", "--set", "train.device=cpu",
            "--set", "data.name=folder", "--set", f"data.path={folder}", "--set", "data.image_size=8",
            "--set", "train.batch_size=8", "--set", "lte.rank=4", "--precisions", "fp32,bf16",
            "--checkpointing", "off,on",
            "--loader-workers", "0,1"]
    assert main(args) == 0
    report = json.loads((out / "system.json").read_text())
    assert "time" not in report and "throughput" not in report
    rows = {(r["label"], r["precision"], r["activation_checkpointing"]): r for r in report["memory"]}
    assert len(rows) == 16
    for label in {r["label"] for r in report["memory"]}:
        assert rows[label, "fp32", True]["activations"] < rows[label, "fp32", False]["activations"]
        assert rows[label, "bf16", False]["activations"] < rows[label, "fp32", False]["activations"]
    assert [r["workers"] for r in report["loader"]] == [0, 1]
    assert all(r["samples_per_s"] > 0 for r in report["loader"])
    printed = capsys.readouterr().out
    assert "**Image-folder loading**" in printed and "step vs full-rank" in printed


@pytest.mark.parametrize("flag,value", [("--precisions", "fp16"), ("--checkpointing", "maybe"),
                                        ("--loader-workers", "-1")])
def test_bench_system_refuses_bad_settings_in_one_line(flag, value, capsys):
    assert main(["bench", "system", "--only-workers", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lte-ray: error: {flag}")


def test_vary_crosses_items_and_zips_keys_joined_by_plus():
    from lte_ray.bench.quality_settings import parse_vary, settings_for, varied
    from lte_ray.errors import UserError

    assert parse_vary([]) == [] and varied(settings_for(["full", "lte"]), []) == settings_for(["full", "lte"])
    grid = parse_vary(["lte.merge_every=5,10", "lte.rank+lte.alpha=8+64,16+128"])
    assert grid[1] == {"lte.merge_every": 5, "lte.rank": 16, "lte.alpha": 128} and len(grid) == 4
    out = varied(settings_for(["full", "lte"]), grid)
    assert [s.key for s in out][:2] == ["full", "lte@merge_every=5,rank=8,alpha=64"]  # full-rank stays once
    assert len(out) == 5 and out[1].overrides == {"method": "lte", **grid[0]}
    for bad in (["lte.rank"], ["lte.rank+lte.alpha=8"], ["lte.rank=8", "lte.rank+lte.alpha=16+128"]):
        with pytest.raises(UserError, match="--vary"):
            parse_vary(bad)
    assert parse_vary(["lte.rank=8,16,8"]) == [{"lte.rank": 8}, {"lte.rank": 16}]  # a point runs once
    assert parse_vary(["lte.targets=[blocks.*],[blocks.*]"]) == [{"lte.targets": ["blocks.*"]}]  # YAML lists too


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_bench_share_needs_a_gpu_and_says_so_in_one_line(capsys):
    assert main(["bench", "share", "--heads", "1,2"]) == 2
    assert capsys.readouterr().err.strip() == ("lte-ray: error: bench share: needs a CUDA GPU "
                                               "(torch.cuda.is_available() is False here)")


def test_bench_share_splits_one_gpu_between_the_coordinator_and_the_heads():
    from lte_ray.bench.share import COORDINATOR_SHARE, gpu_split

    for k in range(1, 17):
        split = gpu_split(k)
        assert split["ray.coordinator_gpus"] == COORDINATOR_SHARE > 0
        assert k * split["ray.gpus_per_head"] + split["ray.coordinator_gpus"] <= 1.0


@pytest.mark.parametrize("kind, name", [("share", "gpu_share"), ("system", "gpu_system_gpt_s"),
                                        ("system", "gpu_system_vit_s")])
def test_the_gpu_reports_in_the_docs_are_what_their_json_renders_to(kind, name):
    """docs/bench holds what the H100 printed; the tables must be the code's rendering of the JSON."""
    import importlib

    bench = Path(__file__).resolve().parents[1] / "docs" / "bench"
    report = json.loads((bench / f"{name}.json").read_text())
    assert report["machine"]["gpu"] if kind == "system" else report["gpu"]
    rendered = importlib.import_module(f"lte_ray.bench.{kind}").markdown(report)
    assert rendered + "\n" == (bench / f"{name}.md").read_text()


def test_the_gpu_quality_data_set_is_nanogpt_shakespeare_char_size_on_the_bench_grid():
    from lte_ray.bench.quality import run_config
    from lte_ray.bench.quality_settings import DATASETS, settings_for

    ds = DATASETS["shakespeare-gpt-s"]
    for setting in settings_for(["full", "lte"]):
        cfg = run_config(ds, setting, 0, ds.budget, ds.evals, "cpu", budget_factor=2)
        assert (cfg.model.width, cfg.model.depth, cfg.model.attn_heads, cfg.model.context) == (384, 6, 6, 256)
        assert cfg.rounds * cfg.samples_per_round == ds.budget * (1 if setting.reference else 2)
        assert cfg.full_rank_lr == 1e-3


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker processes from /proc (Linux)")
def test_bench_workers_stop_when_the_bench_process_is_killed():
    """A killed bench leaves no worker training on into its run folders."""
    import subprocess
    import sys
    import time

    def workers(parent: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == parent and b"spawn_main" in cmdline:
                found.append(int(stat.parent.name))
        return found

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    script = "import time; from lte_ray.bench.report import run_pool; run_pool(time.sleep, [300, 300], 2, str, 't')"
    bench = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(pids := workers(bench.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(pids) == 2, "the bench's workers did not start"
        time.sleep(3)  # past their initializer, into the jobs
    finally:
        bench.kill()
        bench.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(p) for p in pids), "a worker outlived the bench"
