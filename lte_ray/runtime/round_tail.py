"""The tail of a merged round, off its critical path: evaluation, the checkpoint and the round's
record run in one background thread once the next round's heads have their broadcast (not while
the coordinator quantizes it: on a small machine they would compete for the same cores).

Rounds are finished in order, one at a time, from a snapshot of the merged weights (the master
weights are never changed in place, so a reference is a snapshot). At most one round waits here:
a slow disk or evaluation then slows the rounds down instead of piling snapshots up in memory,
and that wait is counted on the round's critical path. An error in the tail (a full disk, say)
surfaces at the next round boundary, as it would have in the round itself.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class RoundTail:
    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lte-round-tail")
        self.pending: Future | None = None

    def submit(self, finish: Callable[[], None]) -> None:
        """Run `finish` in the background once the previous round's tail is done (the caller
        `drain`s first to time that wait)."""
        self.drain()
        self.pending = self.pool.submit(finish)

    def drain(self) -> None:
        """Wait for the round in the background, re-raising its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
