"""The small GPT trains with LTE on a text file and its loss falls well below the uniform loss."""

import json
import math
import textwrap

import pytest

from lte_ray.cli import main

# A small English text written here, repeated with variations so there is structure to learn.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a journey of a thousand miles begins with a single step.",
    "all that glitters is not gold, and not all who wander are lost.",
    "the river runs to the sea, and the sea never fills.",
    "to be or not to be, that is the question we ask.",
]


@pytest.fixture
def corpus(tmp_path):
    lines = [f"{i}: {SENTENCES[(i * 7) % len(SENTENCES)]} {SENTENCES[(i * 3 + 1) % len(SENTENCES)]}"
             for i in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(textwrap.fill(line, 70) for line in lines))
    return path


@pytest.mark.slow
def test_gpt_loss_falls_well_below_uniform(tmp_path, corpus):
    out = tmp_path / "run"
    args = ["train", "--quiet", "--output", str(out), "--rounds", "40", "--heads", "4", "--merge-every", "10",
            "--set", "model.name=gpt_nano", "--set", "data.name=text", "--set", f"data.path={corpus}",
            "--set", "model.depth=2", "--set", "model.width=64", "--set", "model.attn_heads=4",
            "--set", "model.context=32", "--set", "train.batch_size=16", "--set", "train.eval_every=10"]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    uniform = math.log(256)
    print(f"GPT byte-level eval loss {s['eval_loss']:.3f} vs uniform {uniform:.3f}")
    assert s["eval_loss"] < 0.5 * uniform


def test_char_tokenizer_builds_vocab_from_text(corpus):
    from lte_ray.data import load_data
    from lte_ray.resolve import build_config

    cfg = build_config({}, {"model.name": "gpt_nano", "data.name": "text", "data.path": str(corpus),
                            "data.tokenizer": "char", "model.context": 16})
    data = load_data(cfg.data, cfg.model)
    assert data.spec.vocab_size == len(data.vocab) < 60
    x, y = data.train.batch(data.train.eval_indices()[:2])
    assert x.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()
