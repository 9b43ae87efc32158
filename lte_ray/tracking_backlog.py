"""The rounds a `Tracker` has not written to MLflow yet, oldest first, in bounded memory.

The newest `MAX_PENDING_ROUNDS` rounds wait in memory. When MLflow is away for longer than that
(a long outage), the oldest are not dropped: only their round numbers are kept, and when MLflow is
back they are read again from metrics.jsonl, which `RunOutput` appends every round to before the
tracker sees it (the complete record). So MLflow gets every round once, in order, while memory
stays bounded. Not thread-safe: `tracking_writer.Writer` calls it under its lock, except `read_spill`.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

MAX_PENDING_ROUNDS = 10_000
BATCH_METRICS = 1000  # MLflow takes at most 1000 metrics per log_batch

# (round, timestamp in ms, metrics)
Pending = tuple[int, int, dict[str, float]]


def metrics_from_json(line: dict[str, Any]) -> dict[str, float]:
    """`RoundRecord.metrics()` of the record that `RoundRecord.to_json()` wrote as `line`."""
    skip = ("round", "rounds", "elapsed", "head_losses")
    out = {k: float(v) for k, v in line.items() if k not in skip and isinstance(v, (int, float))}
    out.update({f"train_loss_head_{h}": float(v) for h, v in line.get("head_losses", {}).items()})
    return out


def _size(batch: list[Pending]) -> int:
    return sum(len(m) for _, _, m in batch)


class Backlog:
    def __init__(self, jsonl: Path, limit: int | None = None):
        self.jsonl = jsonl
        self.limit = limit or MAX_PENDING_ROUNDS
        self.rounds: deque[Pending] = deque()
        # Rounds [first, last] held only in metrics.jsonl (all older than those in memory), and
        # the byte offset there from which to look for them.
        self.spill: tuple[int, int] | None = None
        self.spill_pos = 0
        self._t0_ms: float | None = None  # wall clock at elapsed = 0, to date the points read back

    def __len__(self) -> int:
        spilled = self.spill[1] - self.spill[0] + 1 if self.spill else 0
        return len(self.rounds) + spilled

    def add(self, step: int, ts_ms: int, metrics: dict[str, float], elapsed: float) -> None:
        if self._t0_ms is None:
            self._t0_ms = ts_ms - elapsed * 1000
        self.rounds.append((step, ts_ms, metrics))
        self._trim()

    def _trim(self) -> None:
        while len(self.rounds) > self.limit:
            step = self.rounds.popleft()[0]
            self.spill = (self.spill[0] if self.spill else step, step)

    def take(self) -> list[Pending] | None:
        """Pop the oldest in-memory rounds, up to one batch (at least one round), or None when
        spilled rounds come first (`read_spill`) or nothing waits."""
        if self.spill or not self.rounds:
            return None
        batch = [self.rounds.popleft()]
        while self.rounds and _size(batch) + len(self.rounds[0][2]) <= BATCH_METRICS:
            batch.append(self.rounds.popleft())
        return batch

    def put_back(self, batch: list[Pending]) -> None:
        """A taken batch that was not written: first in line again."""
        if self.spill:  # the rounds right after the batch spilled while it was out: it goes first, in the spill
            self.spill = (batch[0][0], self.spill[1])
            return
        self.rounds.extendleft(reversed(batch))
        self._trim()

    def read_spill(self, spill: tuple[int, int], pos: int) -> tuple[list[Pending], int]:
        """The oldest spilled rounds from metrics.jsonl, up to one batch, and the offset after them.
        Reads the file only, so the writer calls it without holding its lock."""
        first, last = spill
        batch: list[Pending] = []
        with open(self.jsonl, "rb") as f:
            if pos > f.seek(0, 2):  # rewritten shorter since (RunOutput.truncate_after): look from the top
                pos = 0
            f.seek(pos)
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break  # end of file (or a line still being written: not a spilled round)
                try:
                    rec = json.loads(line)
                    step = int(rec["round"])
                except (ValueError, KeyError, TypeError):
                    pos = f.tell()
                    continue
                if step > last:
                    break
                metrics = metrics_from_json(rec)
                if batch and _size(batch) + len(metrics) > BATCH_METRICS:
                    break
                pos = f.tell()
                if step >= first and (not batch or step > batch[-1][0]):  # each round once, in order
                    ts = int((self._t0_ms or 0) + float(rec.get("elapsed", 0.0)) * 1000)
                    batch.append((step, ts, metrics))
                if step == last:
                    break
        return batch, pos

    def spill_written(self, batch: list[Pending], pos: int) -> None:
        """`read_spill`'s batch is in MLflow (or was given up): move past it."""
        assert self.spill is not None
        done = batch[-1][0] if batch else self.spill[1]  # nothing found up to `last`: none left
        self.spill = None if done >= self.spill[1] else (done + 1, self.spill[1])
        self.spill_pos = pos
