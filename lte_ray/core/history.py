"""A run's history as it happens: one `RoundRecord` per merged round, handed to `on_round`
(progress bar, metrics.jsonl, MLflow, Tune) and kept for the `RunResult`. The in-process loops
and the Ray coordinator build their records here, so they report the same fields."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from lte_ray.config import Config
from lte_ray.core.protocol import HeadResult, RoundRecord, RunCounters, RunResult, Task

RoundCallback = Callable[[RoundRecord], None]


class History:
    def __init__(self, cfg: Config, on_round: RoundCallback | None = None, samples_seen: int = 0,
                 elapsed: float = 0.0):
        """`samples_seen` and `elapsed` continue a resumed run's."""
        self.cfg, self.on_round = cfg, on_round
        self.records: list[RoundRecord] = []
        self.samples_seen = samples_seen
        self.start = time.perf_counter() - elapsed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eval_due(self, round_idx: int) -> bool:
        return (round_idx + 1) % self.cfg.train.eval_every == 0 or round_idx + 1 == self.cfg.rounds

    def add(self, round_idx: int, samples: int, head_losses: dict[int, float], evals: dict[str, float] | None,
            publish: bool = True, **measured: Any) -> RoundRecord:
        """Record round `round_idx` (0-based); `measured` sets RoundRecord's other fields (bytes, seconds).
        Without `publish` the record is built (and its samples counted) but not yet shown: see `publish`."""
        self.samples_seen += samples
        rec = RoundRecord(round=round_idx + 1, rounds=self.cfg.rounds, samples_seen=self.samples_seen,
                          train_loss=sum(head_losses.values()) / len(head_losses), head_losses=head_losses,
                          active_heads=len(head_losses), elapsed=self.elapsed, evals=evals or {}, **measured)
        if publish:
            self.publish(rec)
        return rec

    def publish(self, rec: RoundRecord) -> None:
        self.records.append(rec)
        if self.on_round:
            self.on_round(rec)

    def add_results(self, round_idx: int, results: list[HeadResult], evals: dict[str, float] | None,
                    publish: bool = True, **measured: Any) -> RoundRecord:
        """Record a round merged from the heads' `results`."""
        return self.add(round_idx, sum(r.samples for r in results), {r.head_id: r.loss for r in results}, evals,
                        publish, head_seconds=max(r.seconds for r in results), **measured)

    def last_eval(self) -> dict[str, float]:
        return next((dict(rec.evals) for rec in reversed(self.records) if rec.evals), {})

    def result(self, method: str, task: Task, rounds: int, heads: int, state: dict[str, torch.Tensor],
               counters: RunCounters | None = None) -> RunResult:
        return RunResult(method, task, rounds, heads, self.samples_seen, self.elapsed, self.last_eval(),
                         list(self.records), state, counters)
