"""Language modelling or classification is decided by the data's task everywhere: the loaders'
`DataSpec.task`, Tune's metric, the progress line. A sweep on Shakespeare minimises eval_loss."""

import io
import json
import math

import pytest
from rich.console import Console

from lte_ray.cli import main
from lte_ray.config import validate
from lte_ray.core.protocol import RoundRecord
from lte_ray.data import SOURCES, data_task, load_data
from lte_ray.progress import RoundProgress
from lte_ray.tune import metric_for

GPT = {"model.name": "gpt_nano", "model.depth": 1, "model.width": 16, "model.attn_heads": 2, "model.context": 16}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_tune_metric_follows_the_data_sources_task(name):
    cfg = validate({}, {"data.name": name})
    expected = ("eval_loss", "min") if SOURCES[name].task == "lm" else ("eval_accuracy", "max")
    assert metric_for(cfg) == expected
    assert (SOURCES[name].task == "lm") == (name in ("text", "shakespeare", "kjv", "tokens"))


@pytest.mark.parametrize("name", ["digits", "mnist", "shakespeare", "kjv"])
def test_loaded_data_carries_the_task_its_source_declares(name):
    overrides = {"data.name": name, **(GPT if name in ("shakespeare", "kjv") else {})}
    cfg = validate({}, overrides)
    assert load_data(cfg.data, cfg.model).spec.task == data_task(cfg.data) == SOURCES[name].task


def test_progress_shows_eval_loss_for_text_though_accuracy_is_there_too():
    rec = RoundRecord(round=10, rounds=20, samples_seen=640, train_loss=2.5, head_losses={0: 2.5}, active_heads=1,
                      elapsed=3.0, evals={"eval_loss": 2.25, "eval_accuracy": 0.31, "eval_bits_per_token": 3.25})
    lines = {}
    for task in ("lm", "classify"):
        out = io.StringIO()
        with RoundProgress(20, task, console=Console(file=out, force_terminal=False)) as bar:
            bar.update(rec)
        lines[task] = out.getvalue()
    assert "eval loss 2.2500" in lines["lm"] and "acc" not in lines["lm"]
    assert "eval acc 0.3100" in lines["classify"]


@pytest.mark.slow
def test_a_shakespeare_sweep_minimises_eval_loss(ray_cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    sets = [f"{k}={v}" for k, v in {**GPT, "data.name": "shakespeare", "data.tokenizer": "byte",
                                     "train.batch_size": 4, "lte.merge_every": 2, "train.eval_every": 1,
                                     "ray.cpus_per_head": 0.5, "lte.heads": 1}.items()]
    args = ["tune", "--output", str(out), "--grid", "lte.rank=1,2", "--rounds", "2"]
    assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    assert "trials ranked by eval_loss (min)" in capsys.readouterr().out
    report = json.loads((out / "best_config.json").read_text())
    assert (report["metric"], report["mode"]) == ("eval_loss", "min")
    losses = [t["eval_loss"] for t in report["trials"]]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert report["best"]["eval_loss"] == min(losses)
    assert report["best_config"]["data"]["name"] == "shakespeare"
