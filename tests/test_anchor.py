"""The anchor benchmark drives the official LTE code from a checkout in .anchor/LTE; CI has none,
so the test is skipped there."""

import math
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / ".anchor" / "LTE"

needs_checkout = pytest.mark.skipif(not (SRC / "lte" / "__init__.py").is_file(),
                                    reason="no official LTE checkout in .anchor/LTE")


@needs_checkout
def test_two_official_heads_on_a_tiny_gpt_report_a_finite_throughput():
    from lte_ray.bench.anchor import batched_heads_throughput
    from lte_ray.data import load_data
    from lte_ray.resolve import build_config

    cfg = build_config({}, {"model.name": "gpt_nano", "model.width": 32, "model.depth": 1, "model.attn_heads": 2,
                            "model.context": 16, "data.name": "shakespeare", "lte.heads": 2, "lte.rank": 4,
                            "lte.merge_every": 2, "train.batch_size": 4, "train.device": "cpu"})
    data = load_data(cfg.data, cfg.model)
    out = batched_heads_throughput(cfg, data, 2, 2, str(SRC), torch.device("cpu"))
    assert {"heads", "rank", "steps", "per_head_batch", "samples_per_s", "step_seconds", "cuda_peak_allocated",
            "source_commit"} <= set(out)
    assert (out["heads"], out["rank"], out["steps"], out["per_head_batch"]) == (2, 4, 2, 4)
    assert math.isfinite(out["samples_per_s"]) and out["samples_per_s"] > 0
    assert out["step_seconds"] > 0 and out["cuda_peak_allocated"] is None
    assert out["lte_layers"] == 5  # qkv, proj, fc1, fc2 and the LM head: every nn.Linear


def test_a_missing_checkout_is_a_one_line_user_error(tmp_path):
    from lte_ray.bench.anchor import import_official_lte
    from lte_ray.errors import UserError

    with pytest.raises(UserError, match="no official LTE checkout"):
        import_official_lte(str(tmp_path))
