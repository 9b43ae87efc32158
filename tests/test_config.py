"""Bad configs: each invalid field gives one clear line naming it, and exit code 2."""

import subprocess
import sys

import pytest

from lte_ray.cli import main
from lte_ray.config import parse_set
from lte_ray.resolve import build_config, load_config

CASES = [
    (["--rank", "0"], "lte.rank: must be >= 1"),
    (["--heads", "0"], "lte.heads: must be >= 1"),
    (["--set", "train.batch_size=0"], "train.batch_size: must be >= 1"),
    (["--set", "train.batch_size=-5"], "train.batch_size: must be >= 1"),
    (["--set", "model.name=resnet50"], "model.name: unknown model 'resnet50'"),
    (["--set", "data.name=imagenet"], "data.name: must be one of"),
    (["--config", "/no/such/file.yaml"], "config: cannot read '/no/such/file.yaml'"),
    (["--set", "data.name=text", "--set", "data.path=/no/such.txt", "--set", "model.name=gpt_nano"],
     "data.path: '/no/such.txt' does not exist"),
    (["--set", "lte.quant=fp8"], "lte.quant: must be one of"),
    (["--set", "lte.rnak=4"], "lte.rnak: unknown field"),
    (["--set", "train.lr=fast"], "train.lr:"),
    (["--set", "norank"], "--set norank: expected section.key=value"),
    (["--set", "model.name=gpt_nano"], "model.name: gpt_nano needs text data"),
    (["--set", "lte.targets=[nothing*]", "--rounds", "1", "--backend", "local"], "lte.targets: ['nothing*'] match no nn.Linear"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[1].split(":")[0] for c in CASES])
def test_invalid_field_gives_one_line_and_exit_2(args, message, capsys, tmp_path):
    rc = main(["train", "--quiet", "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lte-ray: error: ") and message in err, err


def test_unreadable_and_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lte: [unclosed\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid YAML (line" in capsys.readouterr().err
    bad.write_text("- a list\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_console_script_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lte_ray.cli", "train", "--rank", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "lte-ray: error: lte.rank: must be >= 1 (got 0)"


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lte:\n  heads: 8\n  rank: 4\ntrain:\n  lr: 1.0e-3\n")
    cfg = load_config(str(path), parse_set(["lte.rank=16", "train.total_samples=12800"]))
    assert (cfg.lte.heads, cfg.lte.rank, cfg.train.lr) == (8, 16, 1e-3)
    assert cfg.rounds == 10  # 12800 samples / (8 heads * 5 steps * 32 per batch)
    assert (cfg.lora_alpha, cfg.scaling) == (128, 8.0)  # alpha follows the rank: s = 8


def test_the_default_recipe_follows_the_model():
    from lte_ray.core.methods import get_method

    cfg = load_config(None, {})  # ViT width 96, 4 heads
    assert (cfg.lte.rank, cfg.lte.alpha, cfg.train.lr, cfg.train.full_lr) == (None, None, None, None)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.scaling) == (48, 384, 8.0)  # rank x heads = 2 x width
    assert (cfg.factor_lr, cfg.full_rank_lr, cfg.replica_lr) == (4e-3 / 8, 4e-3, 4e-3)
    wide = load_config(None, {"model.width": 128, "lte.heads": 16, "train.full_lr": 8e-3})
    assert (wide.lora_rank, wide.factor_lr, wide.replica_lr) == (16, 1e-3, 8e-3)
    given = load_config(None, {"lte.rank": 4, "lte.alpha": 64, "train.lr": 1e-3, "train.replica_lr": 2e-3})
    assert (given.scaling, given.full_rank_lr, given.replica_lr) == (16.0, 16e-3, 2e-3)
    one = get_method("lora").lte_config(cfg)  # the single-head baselines keep the heads' rank and rates
    assert (one.lte.heads, one.lora_rank, one.scaling, one.factor_lr, one.full_rank_lr) == (1, 48, 8.0, 5e-4, 4e-3)
    assert get_method("mhlora").lte_config(cfg).lora_rank == 4 * 48
    assert get_method("mhlora").recipe(cfg)["rank"] == 4 * 48 and get_method("full").recipe(cfg)["rank"] == 48


def test_defaults_are_valid():
    cfg = build_config()
    assert cfg.method == "lte" and cfg.data.name == "digits" and cfg.rounds == 120


def test_digits_yaml_spells_out_the_defaults():
    from pathlib import Path

    path = Path(__file__).parents[1] / "jobs" / "configs" / "digits.yaml"
    assert load_config(str(path)) == build_config()


def test_resuming_an_older_versions_run_keeps_its_replicas_rate(tmp_path, monkeypatch):
    from lte_ray import cli

    path = tmp_path / "config.yaml"
    monkeypatch.setattr(cli, "_resumable", lambda run_dir: str(path))
    args = cli.build_parser().parse_args(["train", "--resume", str(tmp_path)])
    path.write_text("lte:\n  rank: 8\n  alpha: 64\ntrain:\n  lr: 5.0e-4\n")  # written before train.replica_lr
    assert (cli.config_from_args(args).replica_lr, cli.config_from_args(args).full_rank_lr) == (5e-4, 4e-3)
    path.write_text("lte:\n  rank: 8\n  alpha: 64\ntrain:\n  lr: 5.0e-4\n  replica_lr: null\n")  # this version's
    assert cli.config_from_args(args).replica_lr == 4e-3
