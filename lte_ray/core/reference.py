"""Every LTE head in one process, round by round: the reference semantics of LTE.

A run on Ray must end with the same weights as this loop for the same config (quantization
off, fixed seeds). It is also the `--backend local` mode of every method that trains heads
(`core.methods` hands the LoRA baselines here as the LTE configs they are).
"""

from __future__ import annotations

import time

from lte_ray.config import Config
from lte_ray.core.head import Head
from lte_ray.core.history import History, RoundCallback
from lte_ray.core.master import MasterWeights
from lte_ray.core.protocol import RunCounters, RunResult
from lte_ray.core.task import resolve_device
from lte_ray.datasets import DataBundle


def run_heads(cfg: Config, data: DataBundle, on_round: RoundCallback | None = None) -> RunResult:
    """Train `cfg.lte.heads` heads as `cfg` says, merging after every round of T local steps."""
    device = resolve_device(cfg.train.device)
    master = MasterWeights(cfg, data, device)
    heads = [Head(cfg, i, data, device) for i in range(cfg.lte.heads)]
    history, counters = History(cfg, on_round), RunCounters()
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        broadcast = master.broadcast(full=r == 0)
        t_quant = time.perf_counter() - t0
        results = [h.train_round(r, broadcast, master.store.base_round(h.head_id)) for h in heads]
        t1 = time.perf_counter()
        accepted, rejected, _ = master.accept(results)
        if not accepted:
            raise RuntimeError(f"round {r + 1}: every head's update was rejected: {rejected}")
        master.merge(accepted, r)
        t_merge = time.perf_counter() - t1
        evals = master.evaluate() if history.eval_due(r) else None
        t_eval = time.perf_counter() - t1 - t_merge
        bytes_up, bytes_down = sum(x.nbytes for x in results), broadcast.nbytes * len(heads)
        counters.bytes_up += bytes_up
        counters.bytes_down += bytes_down
        counters.heads_rejected += len(rejected)
        history.add_results(r, [d.result for d in accepted], evals, bytes_up=bytes_up, bytes_down=bytes_down,
                            round_seconds=time.perf_counter() - t0, quantize_seconds=t_quant, merge_seconds=t_merge,
                            evaluation_seconds=t_eval, heads_rejected=len(rejected))
    return history.result(cfg.method, data.spec.task, cfg.rounds, len(heads), master.cpu_state(), counters)
