"""Who takes part in a run's rounds: the heads the coordinator started, replacements for lost ones, heads still
waiting for the cluster to fit them, and heads joining from other processes.

Membership changes only at round boundaries (`admit`). A head whose process dies is dropped and, if the
coordinator started it, replaced; the replacement joins when it is up (maybe once the cluster grows). A head
still running a late task is left alone until it ends (staleness 0); one late `ray.max_late_rounds` rounds in
a row is replaced, and the rounds it sits out still busy count (a 10x straggler is gone after 3 rounds, not 3
late tasks of 10 rounds each). A head whose uploads were rejected `ray.max_rejected_rounds` rounds in a row (a
bad actor, or a head that keeps diverging) is replaced too: its slot goes to a head that can contribute. A
head that cannot start once the run has begun (a node without the data, say) is a lost head: after
`ray.max_start_failures` such heads no more are tried, and the run goes on with those it has.

Spares (`ray.spare_heads`): heads started ahead of need that build their data and model and wait. A lost
head's place goes to a spare, warm ones first, which takes part from the next round boundary instead of after
a process start (imports, data, model: seconds, more on a loaded node); a new spare is started behind it.

Head ids are assigned here, never by a caller: a joiner asks for a ticket (`issue_ticket`) and can add a head
only under an id it was issued, once, so nobody can replace another's head.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from lte_ray.config import Config
from lte_ray.core.protocol import RunCounters
from lte_ray.errors import UserError
from lte_ray.runtime.worker import head_actor

log = logging.getLogger("lte_ray.coordinator")
YOUNG_ROUNDS = 5  # a new head's first accepted uploads, clipped rather than refused over the median bound
# Replacements for rejected uploads per head of the run: beyond them, replacing has not helped (a bound
# set too tight, a node that computes garbage), and rejected heads stay and are rejected, without churn.
REJECTION_REPLACEMENTS_PER_HEAD = 2


@dataclass
class Member:
    head_id: int
    handle: Any
    spawned: bool  # started by this coordinator (replaced when lost); joiners are not
    ready: Any = None  # ObjectRef of info() while the actor starts
    busy: Any = None  # ObjectRef of a late train_round still running
    info: dict | None = None
    initialized: bool = False  # has it completed a round (and so holds the full state)?
    late_streak: int = 0  # rounds in a row it missed the deadline or sat out, still busy
    rejected_streak: int = 0  # rounds in a row its upload was left out
    reset_next: bool = False  # its last upload was rejected: it starts the next round from fresh factors
    # Its accepted uploads, counted while it is young (`core.robust`): new to the run, over the median bound
    # its upload is clipped to the median head's, not refused.
    young_rounds: int = 0
    spare: bool = False  # started ahead of need: it waits, warm, to take a lost head's place

    @property
    def young(self) -> bool:
        return self.young_rounds < YOUNG_ROUNDS

    @property
    def active(self) -> bool:
        return self.ready is None and self.busy is None and not self.spare


class Membership:
    def __init__(self, cfg: Config, counters: RunCounters, head_options: dict[str, Any], next_head_id: int = 0):
        self.cfg, self.counters, self.head_options = cfg, counters, head_options
        self.next_head_id = next_head_id
        self.members: dict[int, Member] = {}
        self.lock = threading.RLock()  # `add` and the queries come from other threads of the actor
        self.tickets: set[int] = set()  # ids issued to joiners, not yet used
        self.started = False  # has the first round begun?
        self.done = False

    def _new_head_id(self) -> int:
        self.next_head_id += 1
        return self.next_head_id - 1

    def issue_ticket(self) -> int | str:
        """A head id for a joiner to build its head under, or why not."""
        with self.lock:
            if self.done:
                return "the run has finished"
            if len(self._heads()) + len(self.tickets) >= self.cfg.head_cap:
                return f"the run is at its cap of {self.cfg.head_cap} heads (ray.max_heads)"
            hid = self._new_head_id()
            self.tickets.add(hid)
            return hid

    def add(self, head_id: int, handle: Any) -> str | None:
        """A joiner's head, built under an id this run issued it, takes part from the next round
        boundary. Returns why not, or None."""
        with self.lock:
            if self.done:
                return "the run has finished"
            if head_id not in self.tickets:
                return f"head id {head_id!r} was not issued to a joiner, or is already in use"
            self.tickets.discard(head_id)
            self.members[head_id] = Member(head_id, handle, spawned=False, ready=handle.info.remote())
            log.info("head %d asked to join; it takes part from the next round", head_id)
            return None

    def _heads(self) -> list[Member]:
        """The members that train or will (every one but the spares)."""
        return [m for m in self.members.values() if not m.spare]

    def spawn(self, spare: bool = False) -> None:
        with self.lock:
            hid = self._new_head_id()
            handle = head_actor(self.cfg, hid, **self.head_options)
            self.members[hid] = Member(hid, handle, spawned=True, ready=handle.info.remote(), spare=spare)

    def lose(self, m: Member, why: str, replace: bool = True) -> None:
        log.warning("%s %d lost (%s)", "spare head" if m.spare else "head", m.head_id, why)
        with self.lock:
            self.members.pop(m.head_id, None)
            self.counters.heads_lost += 1
            if m.spawned:
                try:
                    ray.kill(m.handle)
                except RayError:
                    pass
                if replace:
                    self._replace()

    def _replace(self) -> None:
        """Back to `lte.heads` started heads (a spare takes the place, warm ones first; else a new head
        joins when it is up, maybe once the cluster grows), then back to `ray.spare_heads` spares."""
        if sum(m.spawned for m in self._heads()) < self.cfg.lte.heads:
            spares = sorted((m for m in self.members.values() if m.spare), key=lambda m: m.ready is not None)
            if spares:
                self._promote(spares[0])
            else:
                self.spawn()
        while sum(m.spare for m in self.members.values()) < self.cfg.ray.spare_heads:
            self.spawn(spare=True)

    def _promote(self, spare: Member) -> None:
        """`spare` becomes a head. A warm one is asked again whether it is alive (nothing watched it
        while it waited): it takes part once it answers, at the next round boundary."""
        spare.spare = False
        if spare.ready is None:
            spare.ready = spare.handle.info.remote()
        log.info("spare head %d takes a head's place", spare.head_id)

    def _use_warm_spares(self) -> None:
        """A warm spare takes the place of a missing head (no replacement was started: start
        failures ran out) or of one still starting, which goes on starting as the spare."""
        warm = [m for m in self.members.values() if m.spare and m.ready is None]
        starting = [m for m in self._heads() if m.spawned and m.ready is not None and m.info is None]
        missing = self.cfg.lte.heads - sum(m.spawned for m in self._heads())
        for spare in warm:
            if missing > 0:
                missing -= 1
            elif starting:
                starting.pop().spare = True
            else:
                return
            self._promote(spare)

    def on_time(self, m: Member) -> None:
        m.late_streak = 0

    def mark_late(self, m: Member, ref: Any) -> None:
        """`m` missed the round's deadline: it sits out until `ref`, its late task, ends."""
        with self.lock:
            m.busy = ref
            self.counters.late_results += 1
            self._late(m)

    def sitting_out(self) -> None:
        """A round was dispatched: heads still busy with a late task miss it too."""
        with self.lock:
            for m in [m for m in self.members.values() if m.busy is not None]:
                self._late(m)

    def _late(self, m: Member) -> None:
        m.late_streak += 1
        if m.late_streak >= self.cfg.ray.max_late_rounds and m.spawned:
            self.counters.heads_replaced_late += 1
            self.lose(m, f"late {m.late_streak} rounds in a row; replaced")  # its late task dies with it

    def on_accepted(self, m: Member) -> None:
        m.rejected_streak = 0

    def on_rejected(self, m: Member) -> None:
        """`m`'s upload was left out of the round; so often in a row, and its slot goes to another head."""
        with self.lock:
            m.rejected_streak += 1
            budget = REJECTION_REPLACEMENTS_PER_HEAD * self.cfg.lte.heads
            if (m.rejected_streak >= self.cfg.ray.max_rejected_rounds and m.head_id in self.members
                    and self.counters.heads_replaced_rejected < budget):
                self.counters.heads_replaced_rejected += 1
                self.lose(m, f"rejected {m.rejected_streak} rounds in a row; {'replaced' if m.spawned else 'dropped'}")

    def admit(self, next_round: int) -> list[Member]:
        """At a round boundary: heads that finished starting, or finished a late task, take part.
        Returns the members active for round `next_round` (1-based)."""
        with self.lock:
            if self.started:
                self._use_warm_spares()
            for m in list(self.members.values()):
                self._settle(m, next_round)
            return [m for m in self.members.values() if m.active]

    def _settle(self, m: Member, next_round: int) -> None:
        for attr in ("ready", "busy"):
            ref = getattr(m, attr)
            if ref is None or not ray.wait([ref], timeout=0)[0]:
                continue
            setattr(m, attr, None)
            try:
                value = ray.get(ref)
            except RayError as e:
                cause = e.cause if isinstance(e, RayTaskError) else e
                if attr == "busy" or m.info is not None:  # it had started; it died since (busy, or as a spare)
                    self.lose(m, f"{type(cause).__name__} while {'busy' if attr == 'busy' else 'waiting'}")
                elif self.started or m.spare:  # once training has begun, a head that cannot start is a lost head
                    self._start_failed(m, cause)
                elif isinstance(cause, UserError):  # before the first round: a setup error, not a fault
                    raise cause from None
                elif isinstance(e, RayTaskError):
                    raise RuntimeError(f"head {m.head_id} could not start: {cause!r}") from e
                else:  # its process died while starting
                    self.lose(m, f"{type(e).__name__} while starting")
                return
            if attr == "ready":
                m.info = value
                if self.started and not m.spare:  # admitted once training had begun: it joined mid-run
                    self.counters.heads_joined += 1
                    log.info("head %d joined at round %d", m.head_id, next_round)

    def _start_failed(self, m: Member, cause: BaseException) -> None:
        """A head that could not start mid-run is lost; replacements are tried a bounded number of times."""
        self.counters.start_failures += 1
        retry = self.counters.start_failures <= self.cfg.ray.max_start_failures
        self.lose(m, f"could not start: {cause}", replace=retry)
        if not retry and m.spawned:
            log.warning("%d heads failed to start (ray.max_start_failures=%d); going on with %d heads",
                        self.counters.start_failures, self.cfg.ray.max_start_failures, len(self._heads()))

    def wait(self, need: int, timeout: float) -> None:
        """Block until `need` starting or busy heads are done, or `timeout` passes."""
        with self.lock:
            pending = [r for m in self._heads() for r in (m.ready, m.busy) if r is not None]
        deadline = time.monotonic() + timeout
        while pending and need > 0 and (left := deadline - time.monotonic()) > 0:
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            need -= len(done)

    def start(self, first_round: int) -> None:
        """Start the configured heads; return once a quorum is up and the others had their grace.
        Heads admitted after this joined mid-run."""
        for _ in range(self.cfg.lte.heads):
            self.spawn()
        for _ in range(self.cfg.ray.spare_heads):  # at once too: a head may be lost early (not waited for)
            self.spawn(spare=True)
        self.wait(self.cfg.ray.min_heads, self.cfg.ray.round_timeout_s)
        self.wait(self.cfg.lte.heads, self.cfg.ray.start_grace_s)
        self.admit(first_round)
        self.started = True
        if waiting := self.starting():  # on a cluster given by address nothing else says why heads are missing
            rc = self.cfg.ray
            log.warning("%d of %d heads not up after ray.start_grace_s=%gs (ids %s): still starting, or waiting for "
                        "room for CPU %g%s each; the run goes on without them, they join when up", len(waiting),
                        self.cfg.lte.heads, rc.start_grace_s, ", ".join(map(str, waiting)), rc.cpus_per_head,
                        f" and GPU {rc.gpus_per_head:g}" if rc.gpus_per_head else "")

    def starting(self) -> list[int]:
        """Ids of the heads (not spares) still starting: waiting for their process, or for room."""
        with self.lock:
            return sorted(m.head_id for m in self._heads() if m.ready is not None)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"active_heads": sum(m.active for m in self.members.values()), "starting": self.starting(),
                    "members": sorted(m.head_id for m in self._heads()),
                    "spares": sum(m.spare for m in self.members.values()), "done": self.done}

    def infos(self) -> dict[int, dict[str, Any]]:
        """Info (pid, device, GPU ids, node) of every head that has started (spares: not yet heads)."""
        with self.lock:
            return {m.head_id: m.info for m in self._heads() if m.info}

    def handles(self) -> dict[int, Any]:
        with self.lock:
            return {m.head_id: m.handle for m in self._heads()}

    def stop(self) -> None:
        """No more joiners; the heads this coordinator started are killed."""
        with self.lock:
            self.done = True
            for m in self.members.values():
                if m.spawned:
                    ray.kill(m.handle)
