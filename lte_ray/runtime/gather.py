"""Gathering a round's results: received and checked as they arrive, until every head reported, the
stragglers' grace ran out, or the hard deadline passed.

Grace: once `ray.min_heads` results are in and half the round's heads have arrived (so the median
head time of the round is known), the round waits until `ray.straggler_grace` x that median (plus
`GRACE_FLOOR_S`) after dispatch, then merges without the rest. Times are from dispatch to arrival,
as the coordinator saw them (a head cannot claim to be fast). A head's first round is waited for
(up to the hard deadline): it starts its data loading and its first kernels, and a new joiner is
not a straggler. `round_timeout_s` stays the hard deadline. A result that arrives later is
discarded (staleness 0) and its head sits out until its late task ends.

Nothing a head sends can raise here: a result that is not this head's for this round, has
non-numeric loss/samples/seconds, or fails the structural check (`MasterWeights.problem`) is
rejected with its reason, and its head starts the next round from fresh factors.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from lte_ray.config import Config
from lte_ray.core.master import MasterWeights
from lte_ray.core.protocol import HeadResult
from lte_ray.runtime.membership import YOUNG_ROUNDS, Member, Membership

log = logging.getLogger("lte_ray.coordinator")
GRACE_FLOOR_S = 0.5  # added to the grace: short rounds are not decided by scheduling jitter


@dataclass
class Gathered:
    results: list[HeadResult] = field(default_factory=list)
    bytes_up: int = 0
    rejected: int = 0
    late: list[Any] = field(default_factory=list)  # the futures still running at the end
    collect_seconds: float = 0.0  # checking the last arrival: on the round's critical path


def deadline_after(dispatched: float, arrivals: list[float], heads: int, hard: float, cfg: Config,
                   first_rounds_pending: bool = False) -> float:
    """When the round stops waiting, given the arrival times (seconds after dispatch) of the valid
    results so far out of `heads` dispatched: the hard deadline until a quorum is in and the round's
    median head time is known (half the heads have arrived) and no head's first round is still
    running, then grace x that median."""
    grace = cfg.ray.straggler_grace
    median_at = (heads - 1) // 2  # the lower median of all the round's heads, known once it has arrived
    if grace is None or first_rounds_pending or len(arrivals) < max(cfg.ray.min_heads, median_at + 1):
        return hard
    return min(hard, dispatched + grace * sorted(arrivals)[median_at] + GRACE_FLOOR_S)


def gather(futures: dict[Any, Member], members: Membership, master: MasterWeights, round_idx: int,
           cfg: Config) -> Gathered:
    """Receive and check the results of `futures` (ObjectRef -> the member that trains it)."""
    out = Gathered(late=list(futures))
    dispatched = time.monotonic()
    hard = dispatched + cfg.ray.round_timeout_s
    arrivals: list[float] = []
    firsts = {f for f, m in futures.items() if not m.initialized}
    while out.late and (left := deadline_after(dispatched, arrivals, len(futures), hard, cfg,
                                               bool(firsts.intersection(out.late))) - time.monotonic()) > 0:
        ready, out.late = ray.wait(out.late, num_returns=1, timeout=left)
        t_arrived = time.perf_counter()
        for f in ready:
            if _receive(f, futures[f], members, master, round_idx, out):
                arrivals.append(time.monotonic() - dispatched)  # valid results only: garbage is not a pace
        out.collect_seconds = time.perf_counter() - t_arrived
    return out


def _receive(ref: Any, m: Member, members: Membership, master: MasterWeights, round_idx: int,
             out: Gathered) -> bool:
    """Take in one arrival; True if its result is readable."""
    try:
        res: HeadResult = ray.get(ref)
    except (RayError, GetTimeoutError) as e:
        members.lose(m, type(e).__name__)  # its held factors go at the next round (keep_only)
        return False
    m.initialized = True
    members.on_time(m)
    if not isinstance(res, HeadResult) or res.head_id != m.head_id or res.round != round_idx:
        why = "not this head's result for this round"
    elif not all(isinstance(x, (int, float)) for x in (res.loss, res.samples, res.seconds)):
        why = "its loss, samples or seconds are not numbers"
    else:
        try:  # a result this malformed is the head's problem, never the coordinator's
            why = master.problem(res)
        except Exception as e:  # noqa: BLE001
            why = f"unreadable ({type(e).__name__}: {e})"
        out.bytes_up += 0 if why else res.nbytes  # a malformed upload may not even have a size
    if why:
        reject(m, why, round_idx, members, master)
        out.rejected += 1
        return False
    out.results.append(res)
    return True


def reject(m: Member, why: str, round_idx: int, members: Membership, master: MasterWeights) -> None:
    """`m`'s upload cannot be trusted and is left out of round `round_idx` (0-based): it resends
    everything next time, from fresh factors."""
    log.warning("round %d: rejected head %d: %s", round_idx + 1, m.head_id, why)
    master.store.forget(m.head_id)
    m.reset_next = True
    m.young_rounds = YOUNG_ROUNDS  # a head that sent NaN or garbage is not given a young head's leeway
    members.counters.heads_reset += 1
    members.on_rejected(m)
