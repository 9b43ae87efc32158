"""The typed messages, the method registry and a config resolved once: what each promises."""

import math
import uuid

import pytest

from lte_ray.config import ConfigError, validate
from lte_ray.core.methods import FULL, LORA, LORA_MERGE, LTE, METHODS, get_method
from lte_ray.core.protocol import RoundRecord
from lte_ray.core.simulate import simulate
from lte_ray.errors import UserError
from lte_ray.resolve import build_config, resolve


def test_validation_is_pure_and_resolve_checks_the_world(tmp_path):
    missing = str(tmp_path / "missing.txt")
    cases = [({"method": "nope"},
              "method: must be one of 'lte', 'full', 'lora', 'lora-merge', 'mhlora', 'galore' or 'fira' (got 'nope')"),
             ({"model.name": "resnet"}, "model.name: unknown model 'resnet'"),
             ({"data.name": "imagenet"},
              "data.name: must be one of 'digits', 'npz', 'folder', 'mnist', 'text', 'shakespeare', 'kjv' or 'tokens' "
              "(got 'imagenet')"),
             ({"model.name": "gpt_nano"}, "model.name: gpt_nano needs text data"),
             ({"model.width": 30, "model.attn_heads": 4}, "model.width: 30 is not divisible by model.attn_heads=4"),
             ({"model.name": "gpt_nano", "data.name": "text", "data.path": missing}, "does not exist")]
    for overrides, message in cases:
        cfg = validate({}, overrides)  # validation alone looks nowhere, so it accepts these
        with pytest.raises(ConfigError) as e:
            resolve(cfg)
        assert message in str(e.value) and len(str(e.value).splitlines()) == 1
    assert set(METHODS) == {"lte", "full", "lora", "lora-merge", "mhlora", "galore", "fira"}


def test_rounds_are_derived_and_the_fields_stay_as_given(tmp_path):
    cfg = validate({}, {"train.total_samples": 12_800})
    assert cfg.train.rounds == 120 and cfg.train.total_samples == 12_800  # nothing rewritten
    assert cfg.rounds == math.ceil(12_800 / cfg.samples_per_round) == 20
    assert cfg.replace({"train.batch_size": 16}).rounds == 40  # derived again from the new fields
    path = tmp_path / "budget.yaml"
    path.write_text("train:\n  rounds: 5\n  total_samples: 12800\n")
    from lte_ray.cli import build_parser, config_from_args

    assert validate({"train": {"rounds": None}}).rounds == 120  # config.yaml files of older versions hold null
    assert config_from_args(build_parser().parse_args(["train", "--config", str(path)])).rounds == 20
    assert config_from_args(build_parser().parse_args(["train", "--config", str(path), "--rounds", "3"])).rounds == 3


def test_methods_know_their_heads_and_where_they_run(tiny_cfg):
    cfg = tiny_cfg()
    assert LTE.lte_config(cfg) is cfg and LTE.on_ray and LTE.title(cfg) == "lte x2" and LORA.title(cfg) == "lora"
    lora = LORA.lte_config(cfg)
    assert (lora.lte.heads, lora.train.batch_size, lora.lte.quant, lora.lte.mode) == (1, 32, "none", "resetless")
    assert lora.rounds == cfg.rounds and lora.samples_per_round == cfg.samples_per_round
    assert LORA_MERGE.lte_config(cfg).lte.mode == "reset"
    assert not FULL.on_ray
    with pytest.raises(UserError, match="has no heads"):
        FULL.lte_config(cfg)
    assert get_method("galore").needs.pip == "galore-torch"
    with pytest.raises(ConfigError, match="method: must be one of .* \\(got 'adam'\\)"):
        get_method("adam")


def test_a_runs_records_are_typed_and_flatten_for_json(tiny_cfg):
    seen = []
    cfg = tiny_cfg(**{"train.eval_every": 1, "lte.quant": "nf4", "lte.replicas": "frozen"})
    result = simulate(cfg, on_round=seen.append)
    assert result.history == seen and all(isinstance(r, RoundRecord) for r in seen)
    assert [r.round for r in seen] == [1, 2] and result.task == "classify"
    first = seen[0].to_json()
    assert first["round"] == 1 and first["head_losses"] == {"0": seen[0].head_losses[0], "1": seen[0].head_losses[1]}
    assert "eval_accuracy" in first and "evals" not in first
    assert seen[0].bytes_down > seen[1].bytes_down > 0  # the first broadcast carries the replicas too
    assert result.counters.bytes_up == sum(r.bytes_up for r in seen) > 0
    assert {"train_loss_head_0", "eval_loss", "bytes_up", "merge_seconds"} <= set(seen[0].metrics())
    summary = result.summary()
    assert summary["task"] == "classify" and summary["rounds"] == 2 and "eval_accuracy" in summary


def test_the_coordinator_returns_the_runs_history(ray_cluster, ray_cfg, tmp_path):
    from lte_ray.runtime.launch import train

    cfg = ray_cfg(**{"lte.quant": "none", "train.eval_every": 1})
    streamed = []
    on_ray = train(cfg, run_name=f"test-{uuid.uuid4().hex[:8]}", output_dir=str(tmp_path), on_round=streamed.append)
    local = simulate(cfg)
    assert on_ray.history == streamed and len(streamed) == cfg.rounds
    assert [r.samples_seen for r in on_ray.history] == [r.samples_seen for r in local.history]
    assert [r.bytes_up for r in on_ray.history] == [r.bytes_up for r in local.history]
    for ray_rec, sim_rec in zip(on_ray.history, local.history):
        assert ray_rec.evals["eval_loss"] == pytest.approx(sim_rec.evals["eval_loss"], abs=1e-5)
    assert on_ray.task == local.task == "classify" and on_ray.final == on_ray.history[-1].evals


def test_build_config_is_validate_then_resolve():
    assert build_config({}, {"lte.rank": 4}) == resolve(validate({}, {"lte.rank": 4}))
