"""Coordinator: a named Ray actor that owns the fp32 main weights and runs the rounds.

One round: `ref = ray.put(broadcast)` once -> `train_round.remote(r, ref)` on every active head
-> `ray.wait(..., timeout=round_timeout_s)` -> drop dead heads, discard late results, reject
invalid uploads -> merge (`core.master`: decode the uploads, bound their norms, one product per layer) if at
least `min_heads` reported -> next round, admitting heads that became ready (`runtime.membership`:
replacements for lost heads, heads pending for resources, joiners). Evaluation every E rounds and
the checkpoint every K rounds run in the background meanwhile (`runtime.round_tail`).

Late results are discarded (staleness 0): a head that misses the deadline is left alone until
its late task finishes, then it takes part again from the current weights.

It runs as a threaded actor, so `records_since`, `status` and `add_worker` are answered while
`run` is busy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lte_ray.checkpoint import load_checkpoint, save_checkpoint
from lte_ray.config import Config
from lte_ray.core.history import History
from lte_ray.core.master import MasterWeights
from lte_ray.core.protocol import HeadResult, RoundRecord, RunCounters, RunResult
from lte_ray.data import load_data
from lte_ray.errors import UserError
from lte_ray.runtime.membership import Member, Membership
from lte_ray.runtime.round_tail import RoundTail
from lte_ray.runtime.worker import assigned_cuda_device, torch_threads

log = logging.getLogger("lte_ray.coordinator")
OUTPUT_TOKEN = ".lte-ray-output-token"  # see `launch.sign_output`


def _device() -> torch.device:
    """The coordinator's device: the GPU Ray assigned it, if CUDA works there; else the CPU (with a
    warning when it asked for a GPU: the run still completes, slower)."""
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # num_gpus=0 no longer hides the node's GPUs
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("coordinator: Ray assigned GPU %s but CUDA is not usable here; merging on the CPU",
                    ",".join(gpu_ids))
        return torch.device("cpu")
    return assigned_cuda_device(gpu_ids)


def output_problem(output_dir: str, token: str | None) -> str | None:
    """Why this process cannot use the driver's output folder (it reads back the driver's token), or None."""
    if token is None:
        return None
    try:
        with open(os.path.join(output_dir, OUTPUT_TOKEN)) as f:
            if f.read() == token:
                return None
    except OSError:
        pass
    node = ray.get_runtime_context().get_node_id()[:12]
    return (f"output: the coordinator runs on node {node}, which does not see the driver's output folder "
            f"{output_dir}; put it on storage every node mounts (NFS, EFS, a shared volume)")


class Coordinator:
    def __init__(self, cfg: Config, run_name: str, output_dir: str, mlflow_run_id: str | None = None,
                 resume: bool = False, placement_group: Any = None, output_token: str | None = None):
        """`output_token`: what the driver wrote into `output_dir` (see `launch.sign_output`)."""
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        # Raised by run(): an error raised here would reach the driver without its message.
        self.setup_error = output_problem(output_dir, output_token)
        torch.set_num_threads(torch_threads(cfg.ray.coordinator_cpus))  # merge, quantize, evaluation
        self.cfg = cfg  # the driver's resolved config: nothing is validated again here
        self.run_name, self.output_dir, self.mlflow_run_id = run_name, output_dir, mlflow_run_id
        # Inside a Tune trial every head (replacements too) goes into the trial's placement group.
        head_options = ({"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group)}
                        if placement_group is not None else {})
        self.data = load_data(cfg.data, cfg.model)
        self.master = MasterWeights(cfg, self.data, _device())
        self.counters, self.round, next_head_id = RunCounters(), 0, 0
        samples_seen, elapsed = 0, 0.0
        if resume and not self.setup_error:
            state, meta = load_checkpoint(output_dir)
            self.master.load(state)
            self.round, next_head_id = meta["round"], meta["next_head_id"]
            self.counters = RunCounters(**meta["counters"])
            samples_seen, elapsed = meta["samples_seen"], meta["wall_seconds"]  # both continue across the resume
            log.info("resumed %s at round %d from its checkpoint", run_name, self.round)
        self.samples_seen = samples_seen
        self.history = History(cfg, on_round=None, samples_seen=samples_seen, elapsed=elapsed)
        # A merged round's evaluation, checkpoint and record run in the background, started once
        # the next round's heads are dispatched (`_start_tail`).
        self.tail = RoundTail()
        self.deferred_tail: Callable[[], None] | None = None
        self.members = Membership(cfg, self.counters, head_options, next_head_id)

    # --- queries and membership, answered while run() works ------------------------------------

    def config(self) -> Config:
        return self.cfg

    def records_since(self, index: int) -> list[RoundRecord]:
        return self.history.records[index:]

    def status(self) -> dict[str, Any]:
        return {"round": self.round, "rounds": self.cfg.rounds, "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(self.master.device), **self.members.status()}

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
        if self.setup_error:
            raise UserError(self.setup_error)
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
                    self._start_tail()
                    self.members.wait(cfg.ray.min_heads - len(active), cfg.ray.round_timeout_s)
                    continue
                if self._round(active):
                    failed = 0
                else:
                    failed += 1
                    if failed > cfg.ray.max_failed_rounds:
                        raise RuntimeError(f"no quorum of {cfg.ray.min_heads} valid results for {failed} rounds")
            self._start_tail()
            self.tail.drain()
            if self.round % cfg.ray.checkpoint_every:
                save_checkpoint(self.output_dir, self.master.state, self._meta())
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
                                               store.base_round(m.head_id)): m for m in active}
        self._start_tail()  # the last round's evaluation and checkpoint overlap these heads, not the quantize
        # Results are received and checked as they arrive, while slower heads still train.
        results, bytes_up, rejected, late = [], 0, 0, list(futures)
        deadline, t_collect = time.monotonic() + cfg.ray.round_timeout_s, 0.0
        while late and (left := deadline - time.monotonic()) > 0:
            ready, late = ray.wait(late, num_returns=1, timeout=left)
            t_arrived = time.perf_counter()
            got, nbytes, bad = self._collect(ready, futures)
            results, bytes_up, rejected = results + got, bytes_up + nbytes, rejected + bad
            t_collect = time.perf_counter() - t_arrived  # the last arrival's is on the critical path
        for f in late:
            log.warning("round %d: head %d missed the %gs deadline; its result will be discarded",
                        r + 1, futures[f].head_id, cfg.ray.round_timeout_s)
            self.members.mark_late(futures[f], f)
            store.forget(futures[f].head_id)  # its factors move on without us: it sends them all next time
        bytes_down = broadcast.nbytes * (len(futures) - len(new)) + full.nbytes * len(new)
        self.counters.bytes_up += bytes_up
        self.counters.bytes_down += bytes_down
        results.sort(key=lambda x: x.head_id)  # a fixed summation order: reproducible merges
        t1 = time.perf_counter()
        accepted, over = self.master.accept(results)  # decode, bound the delta norms
        for head_id, why in over.items():
            log.warning("round %d: rejected head %d: %s", r + 1, head_id, why)
        rejected += len(over)
        self.counters.heads_rejected += rejected
        if len(accepted) < cfg.ray.min_heads:
            log.warning("round %d: %d valid results < ray.min_heads=%d; not merged, retrying",
                        r + 1, len(accepted), cfg.ray.min_heads)
            return False
        self.master.merge(accepted)
        t_merge = time.perf_counter() - t1
        self.round = r + 1
        merged = [d.result for d in accepted]
        self.samples_seen += sum(x.samples for x in merged)
        state = self.master.state  # a snapshot: merges make new tensors
        meta = self._meta() if self.round % cfg.ray.checkpoint_every == 0 else None
        measured = dict(bytes_up=bytes_up, bytes_down=bytes_down, merge_seconds=t_merge, quantize_seconds=t_quant,
                        heads_rejected=rejected, collect_seconds=t_collect)

        def finish() -> None:  # in the background, while the next round trains
            t2 = time.perf_counter()
            evals = self.master.evaluate(state) if self.history.eval_due(r) else None
            t3 = time.perf_counter()
            if meta is not None:
                save_checkpoint(self.output_dir, state, meta)
            # Recorded after the checkpoint: every round the driver logs is safely on disk.
            self.history.add_results(r, merged, evals, round_seconds=critical, evaluation_seconds=t3 - t2,
                                     checkpoint_seconds=time.perf_counter() - t3, **measured)

        self.tail.drain()  # the last round's tail: waiting for it is on this round's critical path
        critical = time.perf_counter() - t0
        self.deferred_tail = finish
        return True

    def _start_tail(self) -> None:
        """Start the merged round's evaluation, checkpoint and record in the background."""
        if self.deferred_tail is not None:
            self.tail.submit(self.deferred_tail)
            self.deferred_tail = None

    def _collect(self, ready: list[Any], futures: dict[Any, Member]) -> tuple[list[HeadResult], int, int]:
        """The readable results among `ready`, the bytes they uploaded, and how many were rejected."""
        results: list[HeadResult] = []
        bytes_up = rejected = 0
        for f in ready:
            m = futures[f]
            try:
                res: HeadResult = ray.get(f)
            except (RayError, GetTimeoutError) as e:
                self.members.lose(m, type(e).__name__)  # its held factors go at the next round (keep_only)
                continue
            m.initialized = True
            if not isinstance(res, HeadResult) or res.head_id != m.head_id or res.round != self.round:
                why = "not this head's result for this round"
            elif not all(isinstance(x, (int, float)) for x in (res.loss, res.samples, res.seconds)):
                why = "its loss, samples or seconds are not numbers"
            else:
                try:  # a result this malformed is the head's problem, never the coordinator's
                    why = self.master.problem(res)
                except Exception as e:  # noqa: BLE001
                    why = f"unreadable ({type(e).__name__}: {e})"
                bytes_up += 0 if why else res.nbytes  # a malformed upload may not even have a size
            if why:
                log.warning("round %d: rejected head %d: %s", self.round + 1, m.head_id, why)
                self.master.store.forget(m.head_id)  # its next upload sends everything again
                rejected += 1
                continue
            results.append(res)
        return results, bytes_up, rejected

    def _meta(self) -> dict[str, Any]:
        """The checkpoint's metadata as of now (the round just merged)."""
        return {"round": self.round, "next_head_id": self.members.next_head_id,
                "counters": dataclasses.asdict(self.counters), "samples_seen": self.samples_seen,
                "wall_seconds": self.history.elapsed, "mlflow_run_id": self.mlflow_run_id, "run_name": self.run_name,
                "config": self.cfg.to_dict()}
