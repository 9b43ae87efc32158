import pytest

from lte_ray.config import build_config


@pytest.fixture
def tiny_cfg():
    """A small, fast digits config (override further per test)."""

    def make(**overrides):
        base = {"model.depth": 2, "model.width": 32, "model.attn_heads": 2, "lte.heads": 2, "lte.rank": 4,
                "lte.merge_every": 2, "train.rounds": 2, "train.batch_size": 16, "train.device": "cpu"}
        base.update(overrides)
        return build_config({}, base)

    return make
