"""`lte-ray bench system`: where a run's time, bytes and memory go, for one config.

* Time: the config runs on Ray; each round's critical path splits into the slowest head's
  compute (dequantize + T steps), quantizing the broadcast, receiving and checking the results,
  decoding + bounding + merging them, and the rest: object-store transfer and Ray scheduling.
  `critical_path_seconds` is what a round waits for besides its slowest head. Evaluation and the
  checkpoint run in the background, overlapping the next round: shown, not on the path.
* Traffic: the run's bytes up and down per round against what data-parallel training sends for
  the same steps: a ring all-reduce of the full fp32 gradient every step, 2 (N-1) x 4 P bytes
  over all N workers (P parameters).
* Workers (`lte_ray.bench.memory`): one head's training-state bytes at its backward peak and
  its step time with fp32, int8 and nf4 main weights (int8/nf4 kept packed) against a full-rank
  AdamW worker with the same per-worker batch, for each precision x activation-checkpointing
  setting asked for.
* Image folders: samples per second of a head's batch stream with 0 and more DataLoader workers.
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
from lte_ray.redact import redacted_config
from lte_ray.run import Run

# The model sizes of the lean-heads figures, as one flag: ViT-S (the paper's ImageNet model) and
# nanoGPT's "baby GPT" of shakespeare_char (width 384, depth 6, 6 attention heads, context 256).
PRESETS: dict[str, dict[str, Any]] = {
    "vit-s": {"model.name": "vit_small", "model.width": 384, "model.depth": 12, "model.attn_heads": 6,
              "lte.heads": 4, "lte.rank": 64, "lte.alpha": 512, "train.batch_size": 16, "train.eval_every": 2},
    "gpt-s": {"model.name": "gpt_mini", "model.width": 384, "model.depth": 6, "model.attn_heads": 6,
              "model.context": 256, "data.name": "shakespeare", "lte.heads": 4, "lte.rank": 64, "lte.alpha": 512,
              "train.batch_size": 16, "train.eval_every": 2},
}

# A round's critical path (round_seconds): these parts one after the other, and the rest (transfer,
# scheduling). Evaluation and the checkpoint run in the background, overlapping the next round.
SPLIT = [("head compute (slowest head)", "head_seconds"), ("quantize the broadcast", "quantize_seconds"),
         ("receive + check the results", "collect_seconds"), ("decode + bound + merge", "merge_seconds")]
BACKGROUND = [("eval", "evaluation_seconds"), ("checkpoint", "checkpoint_seconds")]


def steady_throughput(records: list[dict[str, Any]]) -> float:
    """Samples per second over rounds 2..R (round 1 includes start-up)."""
    if len(records) < 2:
        return float("nan")
    first, last = records[0], records[-1]
    return (last["samples_seen"] - first["samples_seen"]) / max(1e-9, last["elapsed"] - first["elapsed"])


def time_split(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean seconds per round over rounds 2..R: the critical path's parts, the rest (transfer and
    scheduling), `critical_path_seconds` (what a round waits for besides its slowest head) and the
    background parts (overlapping the next round, not in round_seconds)."""
    steady = records[1:] or records
    rows = {key: statistics.fmean(r.get(key, 0.0) for r in steady) for _, key in SPLIT}
    round_s = statistics.fmean(r["round_seconds"] for r in steady)
    rows["transfer_seconds"] = max(0.0, round_s - sum(rows.values()))
    critical = round_s - rows["head_seconds"]
    background = {key: statistics.fmean(r.get(key, 0.0) for r in steady) for _, key in BACKGROUND}
    return {"rounds_averaged": len(steady), "round_seconds": round_s, **rows, "critical_path_seconds": critical,
            "non_head_share": critical / round_s, "background": background}


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


def loader_rows(cfg: Config, data: DataBundle, workers: list[int], batches: int = 100) -> list[dict[str, Any]]:
    """Image-folder samples per second through a head's batch stream, with each number of
    DataLoader workers (the first batch, which pays for starting the workers, is not timed)."""
    from lte_ray.batches import training_batches

    rows = []
    for n in workers:
        stream = training_batches(data, cfg.train.batch_size, cfg.train.seed, workers=n)
        next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        seconds = time.perf_counter() - start
        rows.append({"workers": n, "batches": batches, "samples_per_s": batches * cfg.train.batch_size / seconds})
        del stream  # stops its worker processes
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


def bench_system(cfg: Config, output: str, runs: bool = True, precisions: list[str] | None = None,
                 checkpointing: list[bool] | None = None, loader_workers: list[int] | None = None) -> dict[str, Any]:
    """`runs`: time the config on Ray and with core.simulate (time split, traffic, Ray overhead);
    always: the worker rows for each precision x checkpointing setting (default: the config's),
    and for image folders the loader's samples/s with each number of workers."""
    from rich.console import Console

    from lte_ray.bench.memory import worker_rows
    from lte_ray.data import load_data
    from lte_ray.datasets import FolderDataset
    from lte_ray.models import build_model

    console = Console(stderr=True)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data, cfg.model)
    params = sum(p.numel() for p in build_model(cfg.model, data.spec).parameters())
    report: dict[str, Any] = {"bench": "system", "schema": 3, "machine": machine(),
                              "config": redacted_config(cfg.to_dict()), "recipe": cfg.recipe(), "rounds": cfg.rounds,
                              "params": params}
    if runs:
        console.print(f"bench system: {cfg.rounds} rounds on Ray ({cfg.lte.heads} heads) ...", highlight=False)
        name = f"bench-system-{os.getpid()}-{int(time.time())}"  # the coordinator's actor name, unique
        records, ray_wall = timed_run(cfg.replace({"output": str(out / "ray-run"), "ray.run_name": name}), "ray")
        console.print(f"bench system: the same {cfg.rounds} rounds with core.simulate ...", highlight=False)
        sim_records, sim_wall = timed_run(cfg.replace({"output": str(out / "simulate-run")}), "local", data)
        ray_sps, sim_sps = steady_throughput(records), steady_throughput(sim_records)
        report.update({
            "time": time_split(records), "traffic": traffic(cfg, records, params),
            "throughput": {"ray_samples_per_s": ray_sps, "simulate_samples_per_s": sim_sps,
                           "ray_over_simulate": ray_sps / sim_sps, "ray_wall_seconds": ray_wall,
                           "simulate_wall_seconds": sim_wall, "ray_final": records[-1] if records else {},
                           "simulate_final": sim_records[-1] if sim_records else {},
                           "torch_threads_simulate": torch.get_num_threads(),
                           "cpus_per_head": cfg.ray.cpus_per_head},
            "rounds_detail": records})
    console.print("bench system: memory and step time per worker ...", highlight=False)
    report["memory"] = worker_rows(cfg, data, precisions or [cfg.train.precision],
                                   checkpointing or [cfg.train.activation_checkpointing])
    if isinstance(data.train, FolderDataset):
        console.print("bench system: image-folder loading ...", highlight=False)
        report["loader"] = loader_rows(cfg, data, loader_workers or [0, 2])
    write_outputs(out, "system", report, markdown(report))
    return report


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _time_and_traffic(report: dict[str, Any]) -> list[str]:
    t, tr = report["time"], report["traffic"]
    parts = [f"**Time per round** (mean over rounds 2..{report['rounds']}): the round's critical path, one part "
             "after the other; evaluation and the checkpoint run in the background, overlapping the next round:", ""]
    rows = [[label, f"{t[key]:.3f}", f"{100 * t[key] / t['round_seconds']:.0f}%"] for label, key in SPLIT]
    rows.append(["object-store transfer, scheduling (rest)", f"{t['transfer_seconds']:.3f}",
                 f"{100 * t['transfer_seconds'] / t['round_seconds']:.0f}%"])
    rows.append(["**round** (critical path)", f"{t['round_seconds']:.3f}", "100%"])
    rows.append(["critical path besides the slowest head", f"{t['critical_path_seconds']:.3f}",
                 f"{100 * t['non_head_share']:.0f}%"])
    rows += [[f"{label} (background, overlapping)", f"{t['background'][key]:.3f}", "-"] for label, key in BACKGROUND]
    parts += [markdown_table(["part", "seconds", "share"], rows), ""]
    parts += [f"**Traffic per round** against data-parallel ({tr['heads']} workers, {tr['params']:,} parameters, "
              f"a ring all-reduce of the fp32 gradient at each of the {tr['steps_per_round']} steps):", ""]
    ratio = f"{tr['ratio_to_dp']:.4f}" if tr["ratio_to_dp"] is not None else "n/a (one worker)"
    parts += [markdown_table(
        ["bytes up (all heads)", "bytes down (all heads)", "data-parallel bytes", "LTE / data-parallel"],
        [[f"{tr['bytes_up_per_round']:,.0f}", f"{tr['bytes_down_per_round']:,.0f}",
          f"{tr['dp_allreduce_bytes_per_round']:,}", ratio]]), ""]
    return parts


def _workers(report: dict[str, Any]) -> list[str]:
    cuda = any("cuda_peak_allocated" in r for r in report["memory"])
    header = ["worker", "precision", "checkpointing", "weights MiB", "LoRA MiB", "grads MiB", "optimizer MiB",
              "activations MiB", "total MiB", "vs full-rank", "activations vs full-rank", "step ms",
              "step vs full-rank"] + (["CUDA peak MiB"] if cuda else [])
    rows = [[r["label"], r["precision"], "on" if r["activation_checkpointing"] else "off", _mib(r["weights"]),
             _mib(r["lora_factors"]), _mib(r["gradients"]), _mib(r["optimizer_state"]), _mib(r["activations"]),
             _mib(r["total"]), f"{r['ratio_to_full_rank']:.2f}", f"{r['activations_ratio_to_full_rank']:.2f}",
             f"{1000 * r['step_seconds']:.0f}", f"{r['step_ratio_to_full_rank']:.2f}"]
            + ([_mib(r["cuda_peak_allocated"])] if cuda else []) for r in report["memory"]]
    return ["**One worker** at its backward peak (training-state tensors) and its step time (median of timed "
            f"steps), per-worker batch {report['config']['train']['batch_size']}:", "", markdown_table(header, rows),
            ""]


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lte, model = cfg["lte"], cfg["model"]
    head = (f"Machine: {machine_line(report['machine'])}. Config: {model['name']} (width {model['width']}, depth "
            f"{model['depth']}) on {cfg['data']['name']}, {report['params']:,} parameters, {lte['heads']} heads x rank "
            f"{report['recipe']['rank']}, alpha {report['recipe']['alpha']:g}, "
            f"T={lte['merge_every']}, quant {lte['quant']}, per-head batch "
            f"{cfg['train']['batch_size']}" + (f", {report['rounds']} rounds." if "time" in report else "."))
    parts = [head, ""]
    if "time" in report:
        parts += _time_and_traffic(report)
    parts += _workers(report)
    if "loader" in report:
        parts += ["**Image-folder loading** (samples per second through a head's batch stream):", "",
                  markdown_table(["DataLoader workers", "samples/s"],
                                 [[str(r["workers"]), f"{r['samples_per_s']:.0f}"] for r in report["loader"]]), ""]
    if "throughput" in report:
        th = report["throughput"]
        parts += ["**Ray overhead** (samples per second, rounds 2..R):", "", markdown_table(
            ["Ray run", "core.simulate (one process)", "Ray / simulate", "Ray wall s (with start-up)",
             "simulate wall s"],
            [[f"{th['ray_samples_per_s']:.0f}", f"{th['simulate_samples_per_s']:.0f}",
              f"{th['ray_over_simulate']:.2f}", f"{th['ray_wall_seconds']:.1f}",
              f"{th['simulate_wall_seconds']:.1f}"]])]
    return "\n".join(parts).rstrip() + "\n"
