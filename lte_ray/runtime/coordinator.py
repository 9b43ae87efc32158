"""Coordinator: a named Ray actor that owns the fp32 main weights and runs the rounds.

One round: `ref = ray.put(Q(W))` once -> `train_round.remote(r, ref)` on every active head ->
`ray.wait(..., timeout=round_timeout_s)` -> drop dead heads, discard late results, reject
invalid uploads -> merge (`core.merge`) if at least `min_heads` reported -> evaluate every E
rounds -> checkpoint every K rounds -> next round, admitting heads that became ready
(replacements for lost heads, heads pending for resources until the cluster grew, joiners).

Late results are discarded (staleness 0): a head that misses the deadline is left alone until
its late task finishes, then it takes part again from the current weights.

It runs as a threaded actor, so `records_since`, `status` and `add_worker` are answered while
`run` is busy.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lte_ray.checkpoint import load_checkpoint, save_checkpoint
from lte_ray.config import Config
from lte_ray.core import quant
from lte_ray.core.head import HeadResult
from lte_ray.core.master import MasterWeights
from lte_ray.core.merge import check_result
from lte_ray.core.simulate import History
from lte_ray.data import load_data
from lte_ray.errors import UserError
from lte_ray.runtime.worker import head_actor

log = logging.getLogger("lte_ray.coordinator")

COUNTERS = ("bytes_up", "bytes_down", "heads_joined", "heads_lost", "heads_rejected", "late_results")


@dataclass
class Member:
    head_id: int
    handle: Any
    spawned: bool  # started by this coordinator (replaced when lost); joiners are not
    ready: Any = None  # ObjectRef of info() while the actor starts
    busy: Any = None  # ObjectRef of a late train_round still running
    info: dict | None = None
    initialized: bool = False  # has it completed a round (and so holds the full state)?

    @property
    def active(self) -> bool:
        return self.ready is None and self.busy is None


class Coordinator:
    def __init__(self, cfg: dict[str, Any], run_name: str, output_dir: str, mlflow_run_id: str | None = None,
                 resume: bool = False, placement_group: Any = None):
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        torch.set_num_threads(1)
        self.cfg = Config.model_validate(cfg)
        self.run_name, self.output_dir, self.mlflow_run_id = run_name, output_dir, mlflow_run_id
        # Inside a Tune trial every head (replacements too) goes into the trial's placement group.
        self.head_options = ({"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group)}
                             if placement_group is not None else {})
        self.data = load_data(self.cfg.data, self.cfg.model)
        use_cuda = self.cfg.ray.coordinator_gpus > 0 and torch.cuda.is_available()
        self.master = MasterWeights(self.cfg, self.data, "cuda" if use_cuda else "cpu")
        self.history = History(self.cfg, on_round=None)
        self.counters = {k: 0 for k in COUNTERS}
        self.round, self.next_head_id = 0, 0
        if resume:
            state, meta = load_checkpoint(output_dir)
            self.master.load(state)
            self.round, self.next_head_id = meta["round"], meta["next_head_id"]
            self.counters.update(meta["counters"])
            self.history.samples_seen = meta["samples_seen"]
            self.history.start -= meta["wall_seconds"]  # elapsed time continues across the resume
            log.info("resumed %s at round %d from its checkpoint", run_name, self.round)
        self.members: dict[int, Member] = {}
        self.lock = threading.RLock()
        self.done = False
        self.started = False  # has the first round begun?

    # --- queries, answered while run() works ------------------------------------------------

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def records_since(self, index: int) -> list[dict[str, Any]]:
        return self.history.records[index:]

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"round": self.round, "rounds": self.cfg.rounds, "done": self.done,
                    "active_heads": sum(m.active for m in self.members.values()),
                    "members": sorted(self.members)}

    def workers(self) -> dict[int, dict[str, Any]]:
        """Info (pid, device, GPU ids, node) of every head that has started."""
        with self.lock:
            return {hid: m.info for hid, m in self.members.items() if m.info}

    def worker_handles(self) -> dict[int, Any]:
        with self.lock:
            return {hid: m.handle for hid, m in self.members.items()}

    # --- membership -----------------------------------------------------------------------------

    def reserve_head_id(self) -> int:
        with self.lock:
            self.next_head_id += 1
            return self.next_head_id - 1

    def add_worker(self, head_id: int, handle: Any) -> str | None:
        """A head from another process joins at the next round boundary. Returns why not, or None."""
        with self.lock:
            if self.done:
                return "the run has finished"
            cap = self.cfg.ray.max_heads
            if cap is not None and len(self.members) >= cap:
                return f"the run is at ray.max_heads={cap}"
            self.members[head_id] = Member(head_id, handle, spawned=False, ready=handle.info.remote())
            log.info("head %d asked to join; it takes part from the next round", head_id)
            return None

    def _spawn(self) -> None:
        hid = self.reserve_head_id()
        handle = head_actor(self.cfg, hid, **self.head_options)
        self.members[hid] = Member(hid, handle, spawned=True, ready=handle.info.remote())

    def _lose(self, m: Member, why: str) -> None:
        log.warning("head %d lost (%s)", m.head_id, why)
        self.members.pop(m.head_id, None)
        self.counters["heads_lost"] += 1
        if m.spawned:
            try:
                ray.kill(m.handle)
            except RayError:
                pass
            spawned = sum(x.spawned for x in self.members.values())
            if spawned < self.cfg.lte.heads:
                self._spawn()  # the replacement joins when it is up (maybe once the cluster grows)

    def _admit(self) -> None:
        """At a round boundary: heads that finished starting, or finished a late task, take part."""
        for m in list(self.members.values()):
            for attr in ("ready", "busy"):
                ref = getattr(m, attr)
                if ref is None or not ray.wait([ref], timeout=0)[0]:
                    continue
                setattr(m, attr, None)
                try:
                    value = ray.get(ref)
                except RayTaskError as e:
                    if attr == "ready":  # the head could not be built: a setup error, not a fault
                        if isinstance(e.cause, UserError):
                            raise e.cause from None
                        raise RuntimeError(f"head {m.head_id} could not start: {e.cause!r}") from e
                    self._lose(m, f"{type(e.cause).__name__} while busy")
                    break
                except RayError as e:
                    self._lose(m, f"{type(e).__name__} while {'starting' if attr == 'ready' else 'busy'}")
                    break
                if attr == "ready":
                    m.info = value
                    if self.started:  # admitted once training had begun: it joined mid-run
                        self.counters["heads_joined"] += 1
                        log.info("head %d joined at round %d", m.head_id, self.round + 1)

    def _wait(self, need: int, timeout: float) -> None:
        """Block until `need` starting or busy heads are done, or `timeout` passes."""
        with self.lock:
            pending = [r for m in self.members.values() for r in (m.ready, m.busy) if r is not None]
        deadline = time.monotonic() + timeout
        while pending and need > 0 and (left := deadline - time.monotonic()) > 0:
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            need -= len(done)

    # --- the rounds -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        failed = 0
        try:  # whatever happens, the heads this coordinator started are stopped at the end
            with self.lock:
                for _ in range(cfg.lte.heads):
                    self._spawn()
            # Start once a quorum is up; heads the cluster cannot fit yet join when it grows.
            self._wait(cfg.ray.min_heads, cfg.ray.round_timeout_s)
            self._wait(cfg.lte.heads, cfg.ray.start_grace_s)
            with self.lock:
                self._admit()
                self.started = True
            while self.round < cfg.rounds:
                with self.lock:
                    self._admit()
                    active = [m for m in self.members.values() if m.active]
                if len(active) < cfg.ray.min_heads:
                    failed += 1
                    if failed > cfg.ray.max_failed_rounds:
                        raise RuntimeError(f"only {len(active)} heads available for {failed} rounds in a row; "
                                           f"ray.min_heads={cfg.ray.min_heads}")
                    log.warning("round %d: %d heads ready, need %d; waiting", self.round + 1, len(active),
                                cfg.ray.min_heads)
                    self._wait(cfg.ray.min_heads - len(active), cfg.ray.round_timeout_s)
                    continue
                if self._round(active):
                    failed = 0
                else:
                    failed += 1
                    if failed > cfg.ray.max_failed_rounds:
                        raise RuntimeError(f"no quorum of {cfg.ray.min_heads} valid results for {failed} rounds")
            if self.round % cfg.ray.checkpoint_every:
                self._checkpoint(self.history.samples_seen)
        finally:
            with self.lock:
                self.done = True
                for m in self.members.values():
                    if m.spawned:
                        ray.kill(m.handle)
        return {"final": self.history.last_eval(), "rounds": self.round, "samples_seen": self.history.samples_seen,
                "heads": cfg.lte.heads, "wall_seconds": time.perf_counter() - self.history.start,
                **self.counters, "state": self.master.state}

    def _round(self, active: list[Member]) -> bool:
        """One round over `active`; True if it merged."""
        cfg, r, t0 = self.cfg, self.round, time.perf_counter()
        payload = self.master.broadcast()
        t_quant = time.perf_counter() - t0
        ref = ray.put(payload)  # once per round: every head on a node reads the same object
        # A head's first round needs the full state (frozen replicas travel only then).
        new = [m for m in active if not m.initialized]
        full = self.master.with_replicas(payload) if new else payload
        full_ref = ref if full is payload else ray.put(full)
        futures = {m.handle.train_round.remote(r, full_ref if not m.initialized else ref): m for m in active}
        ready, late = ray.wait(list(futures), num_returns=len(futures), timeout=cfg.ray.round_timeout_s)
        results: list[HeadResult] = []
        bytes_up = rejected = 0
        with self.lock:
            for f in ready:
                m = futures[f]
                try:
                    res: HeadResult = ray.get(f)
                except (RayError, GetTimeoutError) as e:
                    self._lose(m, type(e).__name__)
                    continue
                m.initialized = True
                bytes_up += res.nbytes
                why = check_result(res.factors, res.replicas, self.master.state, self.master.quant_keys,
                                   cfg.ray.max_delta_ratio)
                if why:
                    log.warning("round %d: rejected head %d: %s", r + 1, m.head_id, why)
                    rejected += 1
                    continue
                results.append(res)
            for f in late:
                log.warning("round %d: head %d missed the %gs deadline; its result will be discarded",
                            r + 1, futures[f].head_id, cfg.ray.round_timeout_s)
                futures[f].busy = f
                self.counters["late_results"] += 1
        bytes_down = quant.nbytes(payload) * (len(futures) - len(new)) + quant.nbytes(full) * len(new)
        self.counters["bytes_up"] += bytes_up
        self.counters["bytes_down"] += bytes_down
        self.counters["heads_rejected"] += rejected
        if len(results) < cfg.ray.min_heads:
            log.warning("round %d: %d valid results < ray.min_heads=%d; not merged, retrying",
                        r + 1, len(results), cfg.ray.min_heads)
            return False
        results.sort(key=lambda x: x.head_id)  # a fixed summation order: reproducible merges
        t1 = time.perf_counter()
        self.master.merge(results)
        t_merge = time.perf_counter() - t1
        t2 = time.perf_counter()
        evals = self.master.evaluate() if self.history.eval_due(r) else None
        t_eval = time.perf_counter() - t2
        self.round = r + 1
        samples = sum(x.samples for x in results)
        t3 = time.perf_counter()
        if self.round % cfg.ray.checkpoint_every == 0:
            self._checkpoint(self.history.samples_seen + samples)
        t_checkpoint = time.perf_counter() - t3
        # Recorded after the checkpoint: every round the driver logs is safely on disk.
        self.history.add(r, samples, {x.head_id: x.loss for x in results}, evals,
                         active_heads=len(results), bytes_up=bytes_up, bytes_down=bytes_down,
                         round_seconds=time.perf_counter() - t0, merge_seconds=t_merge, quantize_seconds=t_quant,
                         evaluation_seconds=t_eval, checkpoint_seconds=t_checkpoint,
                         head_seconds=max(x.seconds for x in results), heads_rejected=rejected)
        return True

    def _checkpoint(self, samples_seen: int) -> None:
        meta = {"round": self.round, "next_head_id": self.next_head_id, "counters": self.counters,
                "samples_seen": samples_seen, "wall_seconds": time.perf_counter() - self.history.start,
                "mlflow_run_id": self.mlflow_run_id, "run_name": self.run_name, "config": self.cfg.to_dict()}
        save_checkpoint(self.output_dir, self.master.state, meta)
