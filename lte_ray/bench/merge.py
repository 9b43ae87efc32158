"""`lte-ray bench merge`: the coordinator's per-round work on N synthetic head results, before and
after the rank-r uploads, and the scaling model (`bench.scaling`) checked against it.

Synthetic heads for a transformer of the given width and depth (ViT-S by default): every head
has factors (B', A') from the previous round and (B, A) a small step away, as trained heads do.

* before: what the coordinator did until rank-r uploads: per head and layer, the fp32 rank-2r
  factors U = s[B | B'], V = [A; -A'] checked for NaN/Inf and bounded with an fp64 Gram norm
  (and the weight's norm taken again for every head), then one product per layer over all heads.
* after: what it does now (`core.master.MasterWeights.accept` + `merge`): each head's bf16
  change checked (`core.upload.problem`) and decoded against the held factors, every layer's
  delta norms from batched fp32 Gram matrices (each weight's norm once), then one product per
  layer over all heads.
Times are on `threads` torch threads; on CUDA too when it is available.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lte_ray.bench.report import machine, machine_line, markdown_table, write_outputs
from lte_ray.bench.scaling import HEADS_PER_NODE, UPLOAD_BYTES, load, projection, transformer_shapes
from lte_ray.core import merge, upload
from lte_ray.core.protocol import FactorUpload

MAX_RATIO = 5.0


def synthetic(shapes: list[tuple[int, int]], heads: int, rank: int, scaling: float, seed: int = 0):
    """Weights, a store holding every head's previous factors, and each head's bf16 upload."""
    g = torch.Generator().manual_seed(seed)
    keys = [f"layer{i}.weight" for i in range(len(shapes))]
    state = {k: 0.02 * torch.randn(m, n, generator=g) for k, (m, n) in zip(keys, shapes)}
    store = upload.FactorStore(scaling, resetless=True)
    uploads, previous = [], []
    for h in range(heads):
        before, now = {}, {}
        for k, (m, n) in zip(keys, shapes):
            b_prev, a_prev = 1e-3 * torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g)
            before[k] = (b_prev, a_prev)
            now[k] = (b_prev + 1e-4 * torch.randn(m, rank, generator=g),
                      a_prev + 1e-2 * torch.randn(rank, n, generator=g))
        store.accept(h, 0, before)
        previous.append((before, now))
        uploads.append(FactorUpload("bf16", 0, True, {k: upload.encode(now[k][0] - before[k][0], "bf16") for k in keys},
                                    {k: upload.encode(now[k][1] - before[k][1], "bf16") for k in keys}))
    return state, store, uploads, previous


def _require(ok: bool, what: str) -> None:
    """The checks being timed; not `assert`, which `python -O` would drop from the timing."""
    if not ok:
        raise RuntimeError(f"bench merge: a synthetic head failed its check: {what}")


def _before(state, previous, scaling: float) -> tuple[float, float]:
    """The former path: (validate seconds, merge seconds)."""
    t0 = time.perf_counter()
    deltas = []
    for before, now in previous:
        factors = {}
        for k, (b, a) in now.items():
            b_prev, a_prev = before[k]
            u, v = torch.cat([b, b_prev], dim=1) * scaling, torch.cat([a, -a_prev])
            w = state[k]
            _require(u.shape[0] == w.shape[0] and v.shape[1] == w.shape[1], "shapes")
            _require(bool(torch.isfinite(u).all() and torch.isfinite(v).all()), "finite factors")
            _require(merge.delta_norm(u, v) / max(float(w.norm()), 1e-12) <= MAX_RATIO, "delta norm")
            factors[k] = (u, v)
        deltas.append(factors)
    t1 = time.perf_counter()
    merge.merge_round(state, deltas, [])
    return t1 - t0, time.perf_counter() - t1


def _after(state, store, uploads, shapes: dict[str, tuple[int, int]], rank: int, device: torch.device):
    """The current path on `device`: (validate seconds, merge seconds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    state = {k: v.to(device) for k, v in state.items()}
    sync()
    t0 = time.perf_counter()
    deltas = []
    for h, up in enumerate(uploads):
        _require(upload.problem(up, shapes, rank, True, 0) is None, "a readable upload")
        _, factors = store.read(h, up)
        deltas.append({k: (u.to(device, non_blocking=True), v.to(device, non_blocking=True))
                       for k, (u, v) in factors.items()})
    _require(not merge.over_bound(state, deltas, MAX_RATIO), "delta norms within bound")
    sync()
    t1 = time.perf_counter()
    merge.merge_round(state, deltas, [])
    sync()
    return t1 - t0, time.perf_counter() - t1


def bench_merge(output: str, heads: list[int], width: int = 384, depth: int = 12, rank: int = 64,
                alpha: float = 512.0, threads: int = 1, project: list[int] | None = None) -> dict[str, Any]:
    from pathlib import Path

    from rich.console import Console

    console = Console(stderr=True)
    torch.set_num_threads(threads)
    shapes = transformer_shapes(width, depth)
    scaling = alpha / rank
    rows = []
    for n in heads:
        console.print(f"bench merge: {n} heads of rank {rank}, width {width}, depth {depth} ...", highlight=False)
        state, store, uploads, previous = synthetic(shapes, n, rank, scaling)
        keyed = {k: tuple(v.shape) for k, v in state.items()}
        model = load(shapes, n, rank, "bf16")
        cpu = torch.device("cpu")
        timed = [("before: fp32 rank 2r, fp64 norms per head", "cpu", _before(state, previous, scaling)),
                 ("after: bf16 rank r, batched fp32 Gram", "cpu", _after(state, store, uploads, keyed, rank, cpu))]
        if torch.cuda.is_available():
            timed.append(("after: bf16 rank r, batched fp32 Gram", "cuda",
                          _after(state, store, uploads, keyed, rank, torch.device("cuda"))))
        for label, device, (validate_s, merge_s) in timed:
            before = label.startswith("before")
            rows.append({"heads": n, "path": label, "device": device, "threads": threads,
                         "validate_seconds": validate_s, "merge_seconds": merge_s,
                         "total_seconds": validate_s + merge_s,
                         "ingress_bytes": model["ingress_bytes_before" if before else "ingress_bytes"],
                         "merge_flops": model["merge_flops"], "flops_per_s": model["merge_flops"] / merge_s})
        del state, store, uploads, previous
    after_cpu = [r for r in rows if r["path"].startswith("after") and r["device"] == "cpu"]
    rate = max(after_cpu, key=lambda r: r["heads"])["flops_per_s"]
    report = {"bench": "merge", "schema": 1, "machine": machine(), "width": width, "depth": depth, "rank": rank,
              "alpha": alpha, "threads": threads, "params": sum(m * n for m, n in shapes), "rows": rows,
              "model_check": [{"heads": r["heads"], "measured_merge_seconds": r["merge_seconds"],
                               "model_merge_seconds": r["merge_flops"] / rate} for r in after_cpu],
              "projection_rate_flops_per_s": rate,
              "projection": projection(project or [8, 32, 128, 1024], rank, "bf16", rate)}
    write_outputs(Path(output), "merge", report, markdown(report))
    return report


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g}"


def markdown(report: dict[str, Any]) -> str:
    rows = [[str(r["heads"]), r["path"], r["device"], str(r["threads"]), f"{r['validate_seconds']:.3f}",
             f"{r['merge_seconds']:.3f}", f"{r['total_seconds']:.3f}", _gb(r["ingress_bytes"]),
             f"{r['flops_per_s'] / 1e9:.1f}"] for r in report["rows"]]
    check = [[str(c["heads"]), f"{c['measured_merge_seconds']:.3f}", f"{c['model_merge_seconds']:.3f}"]
             for c in report["model_check"]]
    proj = [[p["model"], f"{p['params'] / 1e6:,.0f}M", str(p["heads"]), _gb(p["ingress_bytes"]),
             _gb(p["ingress_bytes_before"]), _gb(p["ingress_preaggregated_bytes"]), _gb(p["egress_bytes"]),
             f"{p['merge_flops'] / 1e12:.3g}", f"{p['merge_seconds_at_measured_rate']:.3g}",
             _gb(p["dense_delta_bytes"]), f"{p['preaggregate_above_heads_per_node']:.1f}"]
            for p in report["projection"]]
    return "\n".join([
        f"Machine: {machine_line(report['machine'])}. Synthetic heads of rank {report['rank']} on a transformer of "
        f"width {report['width']}, depth {report['depth']} ({report['params']:,} weights in its linear layers), "
        f"{report['threads']} torch thread(s).", "",
        "**Coordinator work per round** (decode + check = validate; merge = one product per layer):", "",
        markdown_table(["heads", "path", "device", "threads", "validate s", "merge s", "total s", "ingress GB",
                        "merge GFLOP/s"], rows), "",
        "**Model check** (merge seconds: measured, and the model's FLOPs at the largest run's rate):", "",
        markdown_table(["heads", "measured s", "model s"], check), "",
        f"**Projection** (bf16 uploads at {UPLOAD_BYTES['bf16']:g} bytes a number, NF4 broadcast; merge at "
        f"{report['projection_rate_flops_per_s'] / 1e9:.1f} GFLOP/s, this machine's measured rate):", "",
        markdown_table(["model", "weights", "heads", "ingress GB", "ingress before GB",
                        f"ingress GB, pre-aggregated ({HEADS_PER_NODE} heads a node)", "egress GB (a head a node)",
                        "merge TFLOP", "merge s", "dense bf16 delta GB", "pre-aggregate above heads/node"], proj), ""])
