"""`lte-ray bench system`: where a run's time, bytes and memory go, for one config.

* Time: the config runs on Ray; each round's wall time splits into the slowest head's compute
  (dequantize + T steps), quantize, merge, eval, checkpoint, and the rest: object-store
  transfer, Ray scheduling and result validation.
* Traffic: the run's bytes up and down per round against what data-parallel training sends for
  the same steps: a ring all-reduce of the full fp32 gradient every step, 2 (N-1) x 4 P bytes
  over all N workers (P parameters).
* Memory: one head's training-state bytes at its backward peak with fp32, int8 and nf4 main
  weights (int8/nf4 kept packed, `lte.keep_quantized`) against a full-rank AdamW worker with the
  same per-worker batch. Counted from the tensors themselves (weights, LoRA factors, gradients,
  optimizer state, activations saved for backward), so it is exact on any device; on CUDA the
  allocator's measured peak is reported beside it.
* Ray overhead: samples per second on Ray against `core.simulate` of the same config in this
  process, both over rounds 2..R (the first round pays for actor start-up).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lte_ray.bench.report import machine, machine_line, markdown_table, write_outputs
from lte_ray.config import Config
from lte_ray.datasets import DataBundle
from lte_ray.run import Run

SPLIT = [("head compute (slowest head)", "head_seconds"), ("quantize", "quantize_seconds"),
         ("merge", "merge_seconds"), ("eval", "evaluation_seconds"), ("checkpoint", "checkpoint_seconds")]


def steady_throughput(records: list[dict[str, Any]]) -> float:
    """Samples per second over rounds 2..R (round 1 includes start-up)."""
    if len(records) < 2:
        return float("nan")
    first, last = records[0], records[-1]
    return (last["samples_seen"] - first["samples_seen"]) / max(1e-9, last["elapsed"] - first["elapsed"])


def time_split(records: list[dict[str, Any]]) -> dict[str, Any]:
    steady = records[1:] or records
    rows = {key: statistics.fmean(r.get(key, 0.0) for r in steady) for _, key in SPLIT}
    round_s = statistics.fmean(r["round_seconds"] for r in steady)
    rows["transfer_seconds"] = max(0.0, round_s - sum(rows.values()))
    return {"rounds_averaged": len(steady), "round_seconds": round_s, **rows}


def dp_allreduce_bytes(params: int, workers: int, steps: int) -> int:
    """Bytes all workers send in `steps` ring all-reduces of an fp32 gradient of `params`."""
    return 2 * (workers - 1) * 4 * params * steps


def traffic(cfg: Config, records: list[dict[str, Any]], params: int) -> dict[str, Any]:
    steady = records[1:] or records
    up = statistics.fmean(r["bytes_up"] for r in steady)
    down = statistics.fmean(r["bytes_down"] for r in steady)
    heads = round(statistics.fmean(r["active_heads"] for r in steady))
    dp = dp_allreduce_bytes(params, heads, cfg.lte.merge_every)
    return {"params": params, "heads": heads, "steps_per_round": cfg.lte.merge_every, "bytes_up_per_round": up,
            "bytes_down_per_round": down, "dp_allreduce_bytes_per_round": dp,
            "ratio_to_dp": (up + down) / dp if dp else None,
            "first_round_bytes_down": records[0]["bytes_down"] if records else None}


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is not None and isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def _step_memory(model: torch.nn.Module, opt: torch.optim.Optimizer, batch, packed: list, device) -> dict[str, int]:
    """Run one optimizer step and count the bytes alive at the backward peak, by kind."""
    from lte_ray.core.lora import is_lora_key
    from lte_ray.core.task import loss_fn

    x, y = (t.to(device) for t in batch)
    saved: list[torch.Tensor] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    named = dict(model.named_parameters())
    kinds = {
        "weights": _storages([*(p for n, p in named.items() if not is_lora_key(n)),
                              *(b for n, b in model.named_buffers() if not is_lora_key(n)),
                              *(t for w in packed for t in w.tensors())]),
        "lora_factors": _storages([*(p for n, p in named.items() if is_lora_key(n)),
                                   *(b for n, b in model.named_buffers() if is_lora_key(n))]),
        "gradients": _storages([p.grad for p in named.values()]),
        "optimizer_state": _storages([v for st in opt.state.values() for v in st.values()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0]),
    }
    seen = {ptr for k in kinds.values() for ptr in k}
    kinds["activations"] = {p: n for p, n in _storages(saved).items() if p not in seen and p != x.untyped_storage().data_ptr()}
    out = {k: sum(v.values()) for k, v in kinds.items()}
    out["total"] = sum(out.values())
    if device.type == "cuda":
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def memory_rows(cfg: Config, data: DataBundle) -> list[dict[str, Any]]:
    """One head with fp32 / int8 / nf4 main weights, and a full-rank AdamW worker."""
    from lte_ray.core.head import Head
    from lte_ray.core.master import MasterWeights
    from lte_ray.core.optim import make_optimizer
    from lte_ray.core.task import resolve_device
    from lte_ray.datasets import batch_stream
    from lte_ray.models import build_model

    device = resolve_device(cfg.train.device)
    rows = []
    for label, quant, keep in [("LTE head, fp32 main weights", "none", False),
                               ("LTE head, int8 main weights (kept packed)", "int8", True),
                               ("LTE head, nf4 main weights (kept packed)", "nf4", True)]:
        c = cfg.replace({"lte.quant": quant, "lte.keep_quantized": keep})
        master, head = MasterWeights(c, data), Head(c, 0, data, device)
        head.train_round(0, master.broadcast(full=True))  # optimizer state exists from here on
        head.receive(master.broadcast(full=True))
        packed = [m.packed for m in head.model.modules() if getattr(m, "packed", None) is not None]
        rows.append({"label": label, "quant": quant,
                     **_step_memory(head.model, head.opt, data.train.batch(head.stream.next()), packed, device)})
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec).to(device)
    opt = make_optimizer(model.parameters(), "adamw", cfg.train.lr, cfg.train.weight_decay)
    stream = batch_stream(data, cfg.train.batch_size, cfg.train.seed)
    _step_memory(model, opt, data.train.batch(stream.next()), [], device)
    rows.append({"label": "full-rank worker, AdamW", "quant": "none",
                 **_step_memory(model, opt, data.train.batch(stream.next()), [], device)})
    full = rows[-1]["total"]
    for r in rows:
        r["ratio_to_full_rank"] = r["total"] / full
    return rows


def timed_run(cfg: Config, backend: str, data: DataBundle | None = None) -> tuple[list[dict[str, Any]], float]:
    """One run in its folder (`cfg.output`, replaced if a former benchmark left one there), without
    MLflow: its records as metrics.jsonl holds them, and its training wall time with start-up."""
    shutil.rmtree(str(cfg.output), ignore_errors=True)
    run = Run(cfg, backend=backend, tracking=False)
    start = time.perf_counter()
    result = run.train(data=data)
    wall = time.perf_counter() - start
    run.finish(result)
    return [r.to_json() for r in result.history], wall


def bench_system(cfg: Config, output: str) -> dict[str, Any]:
    from rich.console import Console

    from lte_ray.data import load_data
    from lte_ray.models import build_model

    console = Console(stderr=True)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"bench system: {cfg.rounds} rounds on Ray ({cfg.lte.heads} heads) ...", highlight=False)
    name = f"bench-system-{os.getpid()}-{int(time.time())}"  # the coordinator's actor name, unique
    records, ray_wall = timed_run(cfg.replace({"output": str(out / "ray-run"), "ray.run_name": name}), "ray")
    console.print(f"bench system: the same {cfg.rounds} rounds with core.simulate ...", highlight=False)
    data = load_data(cfg.data, cfg.model)
    sim_records, sim_wall = timed_run(cfg.replace({"output": str(out / "simulate-run")}), "local", data)
    console.print("bench system: memory per head ...", highlight=False)
    memory = memory_rows(cfg, data)
    params = sum(p.numel() for p in build_model(cfg.model, data.spec).parameters())
    ray_sps, sim_sps = steady_throughput(records), steady_throughput(sim_records)
    report = {
        "bench": "system", "schema": 1, "machine": machine(), "config": cfg.to_dict(), "rounds": cfg.rounds,
        "time": time_split(records), "traffic": traffic(cfg, records, params), "memory": memory,
        "throughput": {"ray_samples_per_s": ray_sps, "simulate_samples_per_s": sim_sps,
                       "ray_over_simulate": ray_sps / sim_sps, "ray_wall_seconds": ray_wall,
                       "simulate_wall_seconds": sim_wall, "ray_final": records[-1] if records else {},
                       "simulate_final": sim_records[-1] if sim_records else {},
                       "torch_threads_simulate": torch.get_num_threads(),
                       "cpus_per_head": cfg.ray.cpus_per_head},
        "rounds_detail": records,
    }
    write_outputs(out, "system", report, markdown(report))
    return report


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def markdown(report: dict[str, Any]) -> str:
    cfg, t, tr, th = report["config"], report["time"], report["traffic"], report["throughput"]
    lte, model = cfg["lte"], cfg["model"]
    head = (f"Machine: {machine_line(report['machine'])}. Config: {model['name']} on {cfg['data']['name']}, "
            f"{lte['heads']} heads x rank {lte['rank']}, T={lte['merge_every']}, quant {lte['quant']}, "
            f"per-head batch {cfg['train']['batch_size']}, {report['rounds']} rounds.")
    parts = [head, "", f"**Time per round** (mean over rounds 2..{report['rounds']}):", ""]
    rows = [[label, f"{t[key]:.3f}", f"{100 * t[key] / t['round_seconds']:.0f}%"] for label, key in SPLIT]
    rows.append(["object-store transfer, scheduling, validation (rest)", f"{t['transfer_seconds']:.3f}",
                 f"{100 * t['transfer_seconds'] / t['round_seconds']:.0f}%"])
    rows.append(["**round**", f"{t['round_seconds']:.3f}", "100%"])
    parts += [markdown_table(["part", "seconds", "share"], rows), ""]
    parts += [f"**Traffic per round** against data-parallel ({tr['heads']} workers, {tr['params']:,} parameters, "
              f"a ring all-reduce of the fp32 gradient at each of the {tr['steps_per_round']} steps):", ""]
    ratio = f"{tr['ratio_to_dp']:.4f}" if tr["ratio_to_dp"] is not None else "n/a (one worker)"
    parts += [markdown_table(
        ["bytes up (all heads)", "bytes down (all heads)", "data-parallel bytes", "LTE / data-parallel"],
        [[f"{tr['bytes_up_per_round']:,.0f}", f"{tr['bytes_down_per_round']:,.0f}",
          f"{tr['dp_allreduce_bytes_per_round']:,}", ratio]]), ""]
    cuda = any("cuda_peak_allocated" in r for r in report["memory"])
    header = ["worker", "weights MiB", "LoRA MiB", "grads MiB", "optimizer MiB", "activations MiB", "total MiB",
              "vs full-rank"] + (["CUDA peak MiB"] if cuda else [])
    rows = [[r["label"], _mib(r["weights"]), _mib(r["lora_factors"]), _mib(r["gradients"]),
             _mib(r["optimizer_state"]), _mib(r["activations"]), _mib(r["total"]), f"{r['ratio_to_full_rank']:.2f}"]
            + ([_mib(r["cuda_peak_allocated"])] if cuda else []) for r in report["memory"]]
    parts += ["**Memory of one worker** at its backward peak (training-state tensors, per-worker batch "
              f"{cfg['train']['batch_size']}):", "", markdown_table(header, rows), ""]
    parts += ["**Ray overhead** (samples per second, rounds 2..R):", "", markdown_table(
        ["Ray run", "core.simulate (one process)", "Ray / simulate", "Ray wall s (with start-up)", "simulate wall s"],
        [[f"{th['ray_samples_per_s']:.0f}", f"{th['simulate_samples_per_s']:.0f}", f"{th['ray_over_simulate']:.2f}",
          f"{th['ray_wall_seconds']:.1f}", f"{th['simulate_wall_seconds']:.1f}"]])]
    return "\n".join(parts)
