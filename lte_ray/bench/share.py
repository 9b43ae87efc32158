"""`lte-ray bench share`: k LTE heads sharing one GPU, against the GPU used whole.

For each head count k:
* LTE on Ray: k head actors at `ray.gpus_per_head` = (1 - c) / k of the GPU, the coordinator
  at c of it (merge, NF4 quantize, evaluation on the GPU); aggregate samples/s over rounds
  2..R (round 1 pays for actor start-up) and where a round's time goes (`bench.system`).
* Full-rank: one AdamW worker on the whole GPU with the k heads' combined batch (k x the
  per-head batch): its batch over its median step, in this process.
* Official batched heads (`--anchor-src`, `bench.anchor`): the LTE authors' code training k
  heads in one process with batched matmuls, the same model, rank and per-head batch: its
  samples over its whole timed stretch, its merges included.

Every number is a training step that really ran on the GPU; nothing is extrapolated.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lte_ray.bench.report import machine, machine_line, markdown_table, write_outputs
from lte_ray.config import Config
from lte_ray.datasets import DataBundle
from lte_ray.redact import redacted_config

COORDINATOR_SHARE = 0.1  # of the GPU, for the coordinator; the heads split the rest


def gpu_split(heads: int) -> dict[str, float]:
    """Ray fractions per GPU must add up to at most 1: the coordinator's share, the heads' equal parts."""
    per_head = math.floor((1 - COORDINATOR_SHARE) / heads * 10_000) / 10_000  # rounded down: Ray's precision
    return {"ray.coordinator_gpus": COORDINATOR_SHARE, "ray.gpus_per_head": per_head}


def full_rank_throughput(cfg: Config, data: DataBundle, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Samples/s of a full-rank AdamW worker at `batch` (median of `steps` timed steps after two untimed)."""
    from lte_ray.bench.gpu_profile import full_rank_step, timed

    step_fn, precision = full_rank_step(cfg, data, batch, device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 2):  # the first two untimed
        seconds = timed(step_fn, device)
        if i >= 2:
            times.append(seconds)
    step = statistics.median(times)
    return {"batch": batch, "step_seconds": step, "samples_per_s": batch / step, "precision": precision,
            "cuda_peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def bench_share(cfg: Config, output: str, heads: list[int], anchor_src: str | None = None,
                anchor_steps: int = 30, full_steps: int = 30) -> dict[str, Any]:
    """The rows of the table: one per head count (see the module docstring)."""
    from rich.console import Console

    from lte_ray.bench.system import steady_throughput, time_split, timed_run
    from lte_ray.data import load_data
    from lte_ray.models import build_model

    console = Console(stderr=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.model)
    params = sum(p.numel() for p in build_model(cfg.model, data.spec).parameters())
    report: dict[str, Any] = {"bench": "share", "schema": 1, "machine": machine(),
                              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                              "config": redacted_config(cfg.to_dict()), "recipe": cfg.recipe(), "rounds": cfg.rounds,
                              "params": params, "coordinator_share": COORDINATOR_SHARE, "rows": []}
    for k in heads:
        row: dict[str, Any] = {"heads": k, **gpu_split(k)}
        kcfg = cfg.replace({"lte.heads": k, **gpu_split(k), "output": str(out / f"ray-{k}"),
                            "ray.run_name": f"bench-share-{os.getpid()}-{k}-{int(time.time())}"})
        console.print(f"bench share: {k} head(s) on Ray, {cfg.rounds} rounds ...", highlight=False)
        records, wall = timed_run(kcfg, "ray")
        row["ray"] = {"samples_per_s": steady_throughput(records), "wall_seconds": wall,
                      "time": time_split(records), "final": records[-1] if records else {}}
        console.print(f"bench share: full-rank on the whole GPU at batch {k * cfg.train.batch_size} ...",
                      highlight=False)
        row["full_rank"] = full_rank_throughput(cfg, data, k * cfg.train.batch_size, full_steps, device)
        if anchor_src:
            from lte_ray.bench.anchor import batched_heads_throughput

            console.print(f"bench share: the official batched implementation, {k} head(s) ...", highlight=False)
            row["anchor"] = batched_heads_throughput(kcfg, data, k, anchor_steps, anchor_src, device,
                                                     cfg.train.precision)
        report["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        from lte_ray.bench.gpu_profile import profile_rows

        console.print("bench share: profiling one head and one full-rank worker ...", highlight=False)
        report["profile"] = profile_rows(cfg, data, device)
    write_outputs(out, "share", report, markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    cfg, rows = report["config"], report["rows"]
    model, lte = cfg["model"], cfg["lte"]
    anchor = any("anchor" in r for r in rows)
    head = (f"Machine: {machine_line(report['machine'])}; GPU: {report['gpu'] or 'none (CPU)'}. Model: {model['name']} "
            f"(width {model['width']}, depth {model['depth']}) on {cfg['data']['name']}, {report['params']:,} "
            f"parameters; rank {report['recipe']['rank']}, T={lte['merge_every']}, quant {lte['quant']}, per-head "
            f"batch {cfg['train']['batch_size']}, {report['rounds']} rounds per Ray run (rounds 2..R timed); the "
            f"coordinator holds {report['coordinator_share']:g} of the GPU, the heads share the rest.")
    header = ["heads", "GPU per head", "LTE on Ray samples/s", "full-rank samples/s (batch)", "Ray / full-rank"]
    header += ["official batched samples/s", "Ray / official"] if anchor else []
    header += ["round s", "slowest head s", "rest of the round s"]
    table = []
    for r in rows:
        ray_sps, full = r["ray"]["samples_per_s"], r["full_rank"]
        t = r["ray"]["time"]
        line = [str(r["heads"]), f"{r['ray.gpus_per_head']:g}", f"{ray_sps:,.0f}",
                f"{full['samples_per_s']:,.0f} ({full['batch']})", f"{ray_sps / full['samples_per_s']:.2f}"]
        if anchor:
            a = r.get("anchor")
            line += [f"{a['samples_per_s']:,.0f}", f"{ray_sps / a['samples_per_s']:.2f}"] if a else ["-", "-"]
        line += [f"{t['round_seconds']:.3f}", f"{t['head_seconds']:.3f}", f"{t['critical_path_seconds']:.3f}"]
        table.append(line)
    parts = [head, "", markdown_table(header, table)]
    if report.get("profile"):
        parts += ["", "**One worker's step on the GPU** (torch.profiler; a head's round parts timed with CUDA "
                      "synchronisation, medians):", "", markdown_table(
                          ["worker", "batch", "step wall ms", "GPU kernel ms", "GPU busy", "kernels per step",
                           "head: receive ms", "head: T steps ms", "head: upload ms"],
                          [[p["worker"], str(p["batch"]), f"{p['wall_ms']:.1f}", f"{p['gpu_kernel_ms']:.1f}",
                            f"{100 * p['gpu_busy_share']:.0f}%", f"{p['kernels']:.0f}",
                            *(f"{p[k]:.1f}" if k in p else "-" for k in ("receive_ms", "steps_ms", "upload_ms"))]
                           for p in report["profile"]])]
    return "\n".join(parts) + "\n"
