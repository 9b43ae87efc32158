"""Real learning: the default experiment in-process (`lte-ray train --backend local`: LTE, 4 heads,
merge every 10 steps, small ViT) reaches >= 90% test accuracy on digits; the full-rank baseline with the same sample budget is
run and reported beside it."""

import json

import pytest

from lte_ray.cli import main


@pytest.mark.slow
def test_default_lte_reaches_90_percent_and_full_rank_is_reported(tmp_path, capsys):
    assert main(["train", "--backend", "local", "--output", str(tmp_path / "lte")]) == 0
    lte = json.loads((tmp_path / "lte" / "summary.json").read_text())
    assert main(["train", "--backend", "local", "--method", "full", "--output", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    with capsys.disabled():
        print(f"\ndigits, {lte['samples_seen']} samples: LTE x{lte['heads']} acc {lte['eval_accuracy']:.4f} "
              f"({lte['wall_seconds']:.0f}s) | full-rank acc {full['eval_accuracy']:.4f} ({full['wall_seconds']:.0f}s)")
    assert lte["heads"] == 4 and lte["config"]["lte"]["merge_every"] == 5
    assert lte["eval_accuracy"] >= 0.90
    assert full["samples_seen"] == lte["samples_seen"]
    assert full["eval_accuracy"] >= 0.90
    for key in ("eval_loss", "eval_accuracy", "rounds", "samples_seen", "heads", "wall_seconds", "config"):
        assert key in lte
    assert (tmp_path / "lte" / "model.safetensors").stat().st_size > 0
    lines = (tmp_path / "lte" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == lte["rounds"]


@pytest.mark.parametrize("method", ["lora", "lora-merge"])
def test_lora_baselines_run(tmp_path, method):
    args = ["train", "--method", method, "--rounds", "3", "--quiet", "--output", str(tmp_path),
            "--set", "model.depth=1", "--set", "train.eval_every=3", "--merge-every", "10"]
    assert main(args) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["heads"] == 1 and s["method"] == method
    assert s["samples_seen"] == 3 * 10 * 32 * 4  # same budget as 4 heads of batch 32
    assert s["eval_accuracy"] > 0.15  # learned something in 30 steps (chance is 0.10)
