"""Coordinator: a named Ray actor that owns the fp32 main weights and runs the rounds.

One round: `ref = ray.put(broadcast)` once -> `train_round.remote(r, ref)` on every active head
-> `ray.wait(..., timeout=round_timeout_s)` -> drop dead heads, discard late results, reject
invalid uploads -> merge (`core.merge`) if at least `min_heads` reported -> evaluate every E
rounds -> checkpoint every K rounds -> next round, admitting heads that became ready
(`runtime.membership`: replacements for lost heads, heads pending for resources, joiners).

Late results are discarded (staleness 0): a head that misses the deadline is left alone until
its late task finishes, then it takes part again from the current weights.

It runs as a threaded actor, so `records_since`, `status` and `add_worker` are answered while
`run` is busy.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lte_ray.checkpoint import load_checkpoint, save_checkpoint
from lte_ray.config import Config
from lte_ray.core.history import History
from lte_ray.core.master import MasterWeights
from lte_ray.core.merge import check_result
from lte_ray.core.protocol import HeadResult, RoundRecord, RunCounters, RunResult
from lte_ray.data import load_data
from lte_ray.runtime.membership import Member, Membership

log = logging.getLogger("lte_ray.coordinator")


class Coordinator:
    def __init__(self, cfg: Config, run_name: str, output_dir: str, mlflow_run_id: str | None = None,
                 resume: bool = False, placement_group: Any = None):
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        torch.set_num_threads(1)
        self.cfg = cfg  # the driver's resolved config: nothing is validated again here
        self.run_name, self.output_dir, self.mlflow_run_id = run_name, output_dir, mlflow_run_id
        # Inside a Tune trial every head (replacements too) goes into the trial's placement group.
        head_options = ({"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group)}
                        if placement_group is not None else {})
        self.data = load_data(cfg.data, cfg.model)
        use_cuda = cfg.ray.coordinator_gpus > 0 and torch.cuda.is_available()
        self.master = MasterWeights(cfg, self.data, "cuda" if use_cuda else "cpu")
        self.counters, self.round, next_head_id = RunCounters(), 0, 0
        samples_seen, elapsed = 0, 0.0
        if resume:
            state, meta = load_checkpoint(output_dir)
            self.master.load(state)
            self.round, next_head_id = meta["round"], meta["next_head_id"]
            self.counters = RunCounters(**meta["counters"])
            samples_seen, elapsed = meta["samples_seen"], meta["wall_seconds"]  # both continue across the resume
            log.info("resumed %s at round %d from its checkpoint", run_name, self.round)
        self.history = History(cfg, on_round=None, samples_seen=samples_seen, elapsed=elapsed)
        self.members = Membership(cfg, self.counters, head_options, next_head_id)

    # --- queries and membership, answered while run() works ------------------------------------

    def config(self) -> Config:
        return self.cfg

    def records_since(self, index: int) -> list[RoundRecord]:
        return self.history.records[index:]

    def status(self) -> dict[str, Any]:
        return {"round": self.round, "rounds": self.cfg.rounds, **self.members.status()}

    def workers(self) -> dict[int, dict[str, Any]]:
        """Info (pid, device, GPU ids, node) of every head that has started."""
        return self.members.infos()

    def worker_handles(self) -> dict[int, Any]:
        return self.members.handles()

    def reserve_head_id(self) -> int:
        return self.members.reserve_head_id()

    def add_worker(self, head_id: int, handle: Any) -> str | None:
        """A head from another process joins at the next round boundary. Returns why not, or None."""
        return self.members.add(head_id, handle)

    # --- the rounds -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg = self.cfg
        failed = 0
        try:  # whatever happens, the heads this coordinator started are stopped at the end
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
                    self.members.wait(cfg.ray.min_heads - len(active), cfg.ray.round_timeout_s)
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
            self.members.stop()
        return self.history.result(cfg.method, self.data.spec.task, self.round, cfg.lte.heads, self.master.state,
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
        futures = {m.handle.train_round.remote(r, full_ref if not m.initialized else ref): m for m in active}
        ready, late = ray.wait(list(futures), num_returns=len(futures), timeout=cfg.ray.round_timeout_s)
        results, bytes_up, rejected = self._collect(ready, futures)
        for f in late:
            log.warning("round %d: head %d missed the %gs deadline; its result will be discarded",
                        r + 1, futures[f].head_id, cfg.ray.round_timeout_s)
            self.members.mark_late(futures[f], f)
        bytes_down = broadcast.nbytes * (len(futures) - len(new)) + full.nbytes * len(new)
        self.counters.bytes_up += bytes_up
        self.counters.bytes_down += bytes_down
        self.counters.heads_rejected += rejected
        if len(results) < cfg.ray.min_heads:
            log.warning("round %d: %d valid results < ray.min_heads=%d; not merged, retrying",
                        r + 1, len(results), cfg.ray.min_heads)
            return False
        results.sort(key=lambda x: x.head_id)  # a fixed summation order: reproducible merges
        t1 = time.perf_counter()
        self.master.merge(results)
        t_merge = time.perf_counter() - t1
        evals = self.master.evaluate() if self.history.eval_due(r) else None
        t_eval = time.perf_counter() - t1 - t_merge
        self.round = r + 1
        t3 = time.perf_counter()
        if self.round % cfg.ray.checkpoint_every == 0:
            self._checkpoint(self.history.samples_seen + sum(x.samples for x in results))
        t_checkpoint = time.perf_counter() - t3
        # Recorded after the checkpoint: every round the driver logs is safely on disk.
        self.history.add_results(r, results, evals, bytes_up=bytes_up, bytes_down=bytes_down,
                                 round_seconds=time.perf_counter() - t0, merge_seconds=t_merge,
                                 quantize_seconds=t_quant, evaluation_seconds=t_eval,
                                 checkpoint_seconds=t_checkpoint, heads_rejected=rejected)
        return True

    def _collect(self, ready: list[Any], futures: dict[Any, Member]) -> tuple[list[HeadResult], int, int]:
        """The valid results among `ready`, the bytes they uploaded, and how many were rejected."""
        results: list[HeadResult] = []
        bytes_up = rejected = 0
        for f in ready:
            m = futures[f]
            try:
                res: HeadResult = ray.get(f)
            except (RayError, GetTimeoutError) as e:
                self.members.lose(m, type(e).__name__)
                continue
            m.initialized = True
            bytes_up += res.nbytes
            why = check_result(res.factors, res.replicas, self.master.state, self.master.quant_keys,
                               self.cfg.ray.max_delta_ratio)
            if why:
                log.warning("round %d: rejected head %d: %s", self.round + 1, m.head_id, why)
                rejected += 1
                continue
            results.append(res)
        return results, bytes_up, rejected

    def _checkpoint(self, samples_seen: int) -> None:
        meta = {"round": self.round, "next_head_id": self.members.next_head_id,
                "counters": dataclasses.asdict(self.counters), "samples_seen": samples_seen,
                "wall_seconds": self.history.elapsed, "mlflow_run_id": self.mlflow_run_id, "run_name": self.run_name,
                "config": self.cfg.to_dict()}
        save_checkpoint(self.output_dir, self.master.state, meta)
