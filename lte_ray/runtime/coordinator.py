"""Coordinator: a named Ray actor that owns the fp32 main weights and runs the rounds.

One round: `ref = ray.put(broadcast)` once -> `train_round.remote(r, ref)` on every active head
-> gather the results as they arrive (`runtime.gather`: checked, stragglers given a grace, the
hard `round_timeout_s`) -> screen them (`core.robust`: bounds relative to the weights and to the
round's median head) -> merge if at least `min_heads` were accepted -> next round, admitting heads
that became ready (`runtime.membership`: replacements for lost heads, heads pending for resources,
joiners). Evaluation every E rounds and the checkpoint every K rounds run in the background
meanwhile (`runtime.round_tail`); a checkpoint that fails (a full disk) is tried again next round.

Nothing a head sends can end the run; a head whose upload was rejected starts its next round
from fresh factors. Setup errors (a data path missing on this node, say) are raised by `run()`,
so the driver gets their message. Access: heads join with the run's secret (`join_ticket`), under
ids the coordinator issues; `run()` is entered once.

It runs as a threaded actor, so `records_since`, `status` and the joins are answered while
`run` is busy.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import threading
import time
from typing import Any, Callable

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lte_ray.checkpoint import load_checkpoint, save_checkpoint
from lte_ray.config import Config
from lte_ray.core import quant
from lte_ray.core.history import History
from lte_ray.core.master import MasterWeights
from lte_ray.core.protocol import RoundRecord, RunCounters, RunResult
from lte_ray.data import load_data
from lte_ray.errors import UserError
from lte_ray.redact import redacted_config
from lte_ray.runtime.gather import gather, reject
from lte_ray.runtime.membership import Member, Membership
from lte_ray.runtime.round_tail import RoundTail
from lte_ray.runtime.where import coordinator_device, output_problem
from lte_ray.runtime.worker import torch_threads

log = logging.getLogger("lte_ray.coordinator")
# Records a checkpoint carries, for a driver that had not received them yet (it polls every
# `launch.POLL_S`; short rounds checkpoint several in that time).
RECENT_RECORDS = 32


class Coordinator:
    def __init__(self, cfg: Config, run_name: str, output_dir: str, mlflow_run_id: str | None = None,
                 resume: bool = False, placement_group: Any = None, output_token: str | None = None,
                 join_secret: str | None = None, restarts: int = 0):
        """`output_token`: what the driver wrote into `output_dir` (see `launch.sign_output`);
        `join_secret`: what `lte-ray join` must present; `restarts`: how often the driver has
        restarted this run's coordinator."""
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        self.cfg = cfg  # the driver's resolved config: nothing is validated again here
        self.run_name, self.output_dir, self.mlflow_run_id = run_name, output_dir, mlflow_run_id
        self.join_secret = join_secret
        self.entered, self.lock = False, threading.Lock()
        self.replayed: list[RoundRecord] = []  # the checkpoint's recent records, sent to the driver again
        self.history: History | None = None
        # Raised by run(): an error raised here would reach the driver without its message.
        self.setup_error: BaseException | None = None
        problem = output_problem(output_dir, output_token)
        if problem:
            self.setup_error = UserError(problem)
            return
        try:
            self._setup(resume, placement_group, restarts)
        except Exception as e:  # noqa: BLE001 (raised by run())
            self.setup_error = e

    def _setup(self, resume: bool, placement_group: Any, restarts: int) -> None:
        cfg = self.cfg
        torch.set_num_threads(torch_threads(cfg.ray.coordinator_cpus))  # merge, quantize, evaluation
        # Inside a Tune trial every head (replacements too) goes into the trial's placement group.
        head_options = ({"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group)}
                        if placement_group is not None else {})
        self.data = load_data(cfg.data, cfg.model)
        self.master = MasterWeights(cfg, self.data, coordinator_device())
        self.counters, self.round, next_head_id = RunCounters(), 0, 0
        samples_seen, elapsed = 0, 0.0
        if resume:
            state, meta = load_checkpoint(self.output_dir)
            self.master.load(state)
            self.round, next_head_id = meta["round"], meta["next_head_id"]
            self.counters = RunCounters(**meta["counters"])
            samples_seen, elapsed = meta["samples_seen"], meta["wall_seconds"]  # both continue across the resume
            self.replayed = [RoundRecord.from_dict(r) for r in meta.get("recent", [])]
            log.info("resumed %s at round %d from its checkpoint", self.run_name, self.round)
        self.counters.coordinator_restarts = max(self.counters.coordinator_restarts, restarts)
        self.samples_seen = samples_seen
        self.history = History(cfg, on_round=None, samples_seen=samples_seen, elapsed=elapsed)
        # A merged round's evaluation, checkpoint and record run in the background, started once
        # the next round's heads are dispatched (`_start_tail`).
        self.tail = RoundTail()
        self.deferred_tail: Callable[[], None] | None = None
        self.checkpoint_owed = False  # the last checkpoint failed: the next round writes one
        self.members = Membership(cfg, self.counters, head_options, next_head_id)

    # --- queries and membership, answered while run() works ------------------------------------

    def config(self) -> Config:
        return self.cfg

    def records_since(self, index: int) -> list[RoundRecord]:
        """Records from `index` on: first those the checkpoint carried (the driver skips rounds it has)."""
        return (self.replayed + (self.history.records if self.history else []))[index:]

    def status(self) -> dict[str, Any]:
        if self.setup_error is not None:
            return {"round": 0, "rounds": self.cfg.rounds, "done": True, "active_heads": 0, "members": []}
        return {"round": self.round, "rounds": self.cfg.rounds, "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(self.master.device), **self.members.status()}

    def workers(self) -> dict[int, dict[str, Any]]:
        """Info (pid, device, GPU ids, node) of every head that has started."""
        return self.members.infos()

    def worker_handles(self) -> dict[int, Any]:
        return self.members.handles()

    def _refuse(self, secret: str) -> str | None:
        if self.setup_error is not None:
            return "the run could not start"
        if self.join_secret is None or not hmac.compare_digest(str(secret), self.join_secret):
            return "wrong join secret (see the run's join-secret file)"
        return None

    def join_ticket(self, secret: str) -> int | str:
        """A head id for a joiner to build its head under, or why not."""
        return self._refuse(secret) or self.members.issue_ticket()

    def add_worker(self, head_id: int, handle: Any, secret: str) -> str | None:
        """A joiner's head, built under an id from `join_ticket`, takes part from the next round
        boundary. Returns why not, or None."""
        return self._refuse(secret) or self.members.add(head_id, handle)

    # --- the rounds -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        with self.lock:
            if self.entered:
                raise RuntimeError(f"run {self.run_name!r} is already running; run() is entered once")
            self.entered = True
        if self.setup_error is not None:
            raise self.setup_error
        cfg = self.cfg
        failed = 0
        try:  # whatever happens, the heads this coordinator started are stopped at the end
            # bitsandbytes' import (seconds) overlaps the heads' start, not the first round's quantize
            threading.Thread(target=quant.prepare, args=(cfg.lte.quant,), daemon=True).start()
            # Start once a quorum is up; heads the cluster cannot fit yet join when it grows.
            self.members.start(self.round + 1)
            while self.round < cfg.rounds:
                active = self.members.admit(self.round + 1)
                if len(active) < cfg.ray.min_heads:
                    failed += 1
                    if failed > cfg.ray.max_failed_rounds:
                        raise RuntimeError(f"only {len(active)} heads available for {failed} rounds in a row; "
                                           f"ray.min_heads={cfg.ray.min_heads}")
                    log.warning("round %d: %d heads ready, need %d; waiting", self.round + 1, len(active),
                                cfg.ray.min_heads)
                    self._start_tail()
                    self.members.wait(cfg.ray.min_heads - len(active), cfg.ray.round_timeout_s)
                    continue
                if self._round(active):
                    failed = 0
                else:
                    failed += 1
                    if failed > cfg.ray.max_failed_rounds:
                        raise RuntimeError(f"no quorum of {cfg.ray.min_heads} valid results for {failed} rounds")
                    # Until a head that is starting (a replacement) or finishing a late task is back:
                    # rounds of the same heads would fail the same way.
                    self.members.wait(1, cfg.ray.round_timeout_s)
            self._start_tail()
            self.tail.drain()
            if self.round % cfg.ray.checkpoint_every or self.checkpoint_owed:
                self._checkpoint(self.master.state, self._meta(), final=True)
        finally:
            self.members.stop()
            self._start_tail()  # after an error too: the last merged round's checkpoint and record
            self.tail.close()  # waits for it
        return self.history.result(cfg.method, self.data.spec.task, self.round, cfg.lte.heads, self.master.cpu_state(),
                                   self.counters)

    def _round(self, active: list[Member]) -> bool:
        """One round over `active`; True if it merged."""
        cfg, r, t0 = self.cfg, self.round, time.perf_counter()
        broadcast = self.master.broadcast()
        t_quant = time.perf_counter() - t0
        ref = ray.put(broadcast)  # once per round: every head on a node reads the same object
        # A head's first round needs the full state (frozen replicas travel only then).
        new = [m for m in active if not m.initialized]
        full = self.master.with_replicas(broadcast) if new else broadcast
        full_ref = ref if full is broadcast else ray.put(full)
        store = self.master.store
        store.keep_only(set(self.members.handles()))  # heads lost since the last round
        futures = {m.handle.train_round.remote(r, full_ref if not m.initialized else ref,
                                               store.base_round(m.head_id), m.reset_next): m for m in active}
        for m in active:
            m.reset_next = False
        self.members.sitting_out()
        self._start_tail()  # the last round's evaluation and checkpoint overlap these heads, not the quantize
        got = gather(futures, self.members, self.master, r, cfg)  # as results arrive, while slower heads train
        for f in got.late:
            log.warning("round %d: head %d missed the deadline; its result will be discarded", r + 1,
                        futures[f].head_id)
            self.members.mark_late(futures[f], f)
            store.forget(futures[f].head_id)  # its factors move on without us: it sends them all next time
        bytes_down = broadcast.nbytes * (len(futures) - len(new)) + full.nbytes * len(new)
        self.counters.bytes_up += got.bytes_up
        self.counters.bytes_down += bytes_down
        results = sorted(got.results, key=lambda x: x.head_id)  # a fixed summation order: reproducible merges
        t1 = time.perf_counter()
        by_id = {m.head_id: m for m in active}
        # decode, screen (`core.robust`); young heads are clipped rather than refused over the median bound
        accepted, over, non_finite = self.master.accept(results, fresh={i for i, m in by_id.items() if m.young})
        for head_id, why in over.items():
            if head_id in non_finite:  # its factors cannot be trusted: it restarts from fresh ones
                reject(by_id[head_id], why, r, self.members, self.master)
            else:  # over a bound: left out of this round, factors kept (it sends them all next time)
                log.warning("round %d: rejected head %d: %s", r + 1, head_id, why)
                self.members.on_rejected(by_id[head_id])
        for d in accepted:
            by_id[d.result.head_id].young_rounds += 1
            self.members.on_accepted(by_id[d.result.head_id])
            if d.clipped:
                log.warning("round %d: clipped head %d: %s", r + 1, d.result.head_id, d.clipped)
                self.counters.heads_clipped += 1
        rejected = got.rejected + len(over)
        self.counters.heads_rejected += rejected
        if len(accepted) < cfg.ray.min_heads:
            log.warning("round %d: %d valid results < ray.min_heads=%d; not merged, retrying",
                        r + 1, len(accepted), cfg.ray.min_heads)
            return False
        self.master.merge(accepted, r)
        t_merge = time.perf_counter() - t1
        self.round = r + 1
        merged = [d.result for d in accepted]
        self.samples_seen += sum(x.samples for x in merged)
        state = self.master.state  # a snapshot: merges make new tensors
        due = self.round % cfg.ray.checkpoint_every == 0
        meta = self._meta()  # as of this merge (the tail runs while the next round changes things)
        measured = dict(bytes_up=got.bytes_up, bytes_down=bytes_down, merge_seconds=t_merge, quantize_seconds=t_quant,
                        heads_rejected=rejected, collect_seconds=got.collect_seconds)

        def finish() -> None:  # in the background, while the next round trains
            t2 = time.perf_counter()
            evals = self.master.evaluate(state) if self.history.eval_due(r) else None
            t3 = time.perf_counter()
            rec = self.history.add_results(r, merged, evals, publish=False, round_seconds=critical,
                                           evaluation_seconds=t3 - t2, **measured)
            if due or self.checkpoint_owed:
                recent = self.history.records[-(RECENT_RECORDS - 1):] + [rec]
                self._checkpoint(state, {**meta, "recent": [x.as_dict() for x in recent]})
            rec.checkpoint_seconds = time.perf_counter() - t3
            # Shown after the checkpoint: a round the driver logs is on disk (or the disk failed, said so).
            self.history.publish(rec)

        self.tail.drain()  # the last round's tail: waiting for it is on this round's critical path
        critical = time.perf_counter() - t0
        self.deferred_tail = finish
        return True

    def _checkpoint(self, state: dict[str, torch.Tensor], meta: dict[str, Any], final: bool = False) -> None:
        """Write the checkpoint; a disk error is logged, and the next round tries again."""
        try:
            save_checkpoint(self.output_dir, state, meta)
            self.checkpoint_owed = False
        except OSError as e:
            self.checkpoint_owed = True
            log.warning("round %d: checkpoint failed (%s)%s", meta["round"], e,
                        "" if final else "; trying again next round, the run goes on")

    def _start_tail(self) -> None:
        """Start the merged round's evaluation, checkpoint and record in the background."""
        if self.deferred_tail is not None:
            self.tail.submit(self.deferred_tail)
            self.deferred_tail = None

    def _meta(self) -> dict[str, Any]:
        """The checkpoint's metadata as of now (the round just merged)."""
        return {"round": self.round, "next_head_id": self.members.next_head_id,
                "counters": dataclasses.asdict(self.counters), "samples_seen": self.samples_seen,
                "wall_seconds": self.history.elapsed, "mlflow_run_id": self.mlflow_run_id, "run_name": self.run_name,
                "config": redacted_config(self.cfg.to_dict())}

