"""Any method in this process, with no Ray: `simulate(cfg)`.

Methods that train heads run every head here, round by round (`core.reference`: the semantics
a Ray run must reproduce); the full-rank baselines run their one worker (`core.baselines`).
"""

from __future__ import annotations

from lte_ray.config import Config
from lte_ray.core.history import RoundCallback
from lte_ray.core.methods import get_method
from lte_ray.core.protocol import RunResult
from lte_ray.data import load_data
from lte_ray.datasets import DataBundle


def simulate(cfg: Config, on_round: RoundCallback | None = None, data: DataBundle | None = None) -> RunResult:
    """Run `cfg` (any method) in this process and return its result, history and final weights."""
    data = data if data is not None else load_data(cfg.data, cfg.model)
    return get_method(cfg.method).run_local(cfg, data, on_round)
