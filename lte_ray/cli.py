"""`lte-ray train | tune | join | bench`.

User mistakes print one line `lte-ray: error: ...` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from lte_ray.errors import UserError

# Short flags for the common fields: flag -> dotted config key.
SHORT_FLAGS = {
    "method": "method", "heads": "lte.heads", "rank": "lte.rank", "alpha": "lte.alpha",
    "merge_every": "lte.merge_every", "quant": "lte.quant", "rounds": "train.rounds", "lr": "train.lr",
    "seed": "train.seed", "device": "train.device", "output": "output", "address": "ray.address",
    "mlflow_uri": "tracking.mlflow_uri", "run_name": "ray.run_name",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    """The config flags `train` and `tune` share."""
    p.add_argument("--config", metavar="FILE", help="YAML config (see jobs/configs/)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: runs/<method>-<time>)")
    p.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set lte.rank=16 (repeatable)")
    p.add_argument("--method", choices=["lte", "full", "lora", "lora-merge", "galore"])
    p.add_argument("--heads", type=int, help="number of LoRA heads (lte.heads)")
    p.add_argument("--rank", type=int, help="LoRA rank (lte.rank)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scaling is alpha/rank (lte.alpha)")
    p.add_argument("--merge-every", type=int, help="local steps per round, T (lte.merge_every)")
    p.add_argument("--quant", choices=["none", "int8", "nf4"], help="broadcast quantization (lte.quant)")
    p.add_argument("--rounds", type=int, help="rounds to train (train.rounds)")
    p.add_argument("--lr", type=float, help="learning rate of the LoRA factors (train.lr)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with LTE (or a baseline)",
                       description="Train a model with LoRA-the-Explorer. With no --config: LTE on the digits "
                                   "data set (shipped with scikit-learn) with a small ViT.")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: one actor per head and a coordinator actor (default); "
                        "local: every head in this process (core.simulate)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    p.add_argument("--resume", metavar="DIR", help="continue the killed run in DIR from its last checkpoint")
    p.add_argument("--run-name", help="the run's name on the cluster, for `lte-ray join` (default: output folder name)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<output>/mlflow.db)")
    _config_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train)


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="sweep LTE settings with Ray Tune (grid or random, optional ASHA)",
                       description="Sweep config fields with Ray Tune, e.g. --grid lte.rank=4,8 --grid lte.heads=2,4. "
                                   "Each trial is one run on Ray in its own placement group and its own MLflow "
                                   "child run; the ranking and best config go to OUTPUT/best_config.json.")
    _config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="grid over these values")
    p.add_argument("--choice", action="append", default=[], metavar="KEY=V1,V2", help="random choice")
    p.add_argument("--loguniform", action="append", default=[], metavar="KEY=LO,HI")
    p.add_argument("--uniform", action="append", default=[], metavar="KEY=LO,HI")
    p.add_argument("--samples", type=int, default=1, help="random draws (with --grid: repeats of the grid)")
    p.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on the eval metric)")
    p.add_argument("--metric", help="default: eval_accuracy (images), eval_loss (text)")
    p.add_argument("--mode", choices=["max", "min"])
    p.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (0: as fit)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite:///<output>/mlflow.db)")
    p.set_defaults(func=cmd_tune, resume=None)


def _join_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("join", help="add a head, hosted by this process, to a running run",
                       description="Add one LoRA head to a running run. The head lives as long as this "
                                   "command: it waits until the run ends (Ctrl-C withdraws the head).")
    p.add_argument("--run", required=True, help="the run's name (printed by `lte-ray train`)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    p.add_argument("--namespace", default="lte-ray")
    p.set_defaults(func=cmd_join)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: quality (LTE vs baselines) and system (time, bytes, memory)")
    kinds = p.add_subparsers(dest="bench", required=True)
    q = kinds.add_parser("quality", help="LTE against full-rank, LoRA, LoRA-merge and GaLore on digits and text",
                         description="Train every setting on digits (ViT) and Shakespeare (char-level GPT) with "
                                     "the same sample budget and evaluation points, over several seeds; write "
                                     "quality.json, quality.md and quality.png. Defaults take about 15 minutes on "
                                     "2 CPU cores.")
    q.add_argument("--datasets", type=_csv, help="comma-separated: digits,shakespeare (default: both)")
    q.add_argument("--methods", type=_csv, help="comma-separated setting keys (default: all; see docs/benchmarks.md)")
    q.add_argument("--seeds", type=int, help="seeds per setting (default: 3 on digits, 2 on shakespeare)")
    q.add_argument("--samples", type=int, help="sample budget per run (default: 76800 digits, 25600 shakespeare)")
    q.add_argument("--evals", type=int, help="evaluation points per run (default: 15 digits, 10 shakespeare)")
    q.add_argument("--budget-factor", type=int, default=1,
                   help="give every setting but full-rank this many times the budget, to measure how many "
                        "samples it needs to reach full-rank (default: 1, the same budget)")
    q.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (default: 2)")
    q.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    q.add_argument("--output", default=None, help="folder (default: runs/bench-quality-<time>)")
    q.set_defaults(func=cmd_bench_quality)
    y = kinds.add_parser("system", help="where a Ray run's time, bytes and memory go",
                         description="Run the default config on Ray and split each round's wall time (head "
                                     "compute, quantize, transfer, merge, eval); compare its traffic with "
                                     "data-parallel all-reduce; measure one head's memory with fp32/int8/nf4 "
                                     "base weights against a full-rank AdamW worker; and compare samples per "
                                     "second on Ray with core.simulate. Writes system.json and system.md.")
    y.add_argument("--config", metavar="FILE", help="YAML config (default: the built-in digits config)")
    y.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set train.rounds=20 (repeatable)")
    y.add_argument("--rounds", type=int, help="rounds of the timed runs (default: the config's, 60 by default)")
    y.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    y.add_argument("--output", default=None, help="folder (default: runs/bench-system-<time>)")
    y.set_defaults(func=cmd_bench_system)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lte-ray", description="LoRA-the-Explorer on Ray: train from scratch "
                                     "with many parallel low-rank heads.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _tune_parser(sub)
    _join_parser(sub)
    _bench_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    from lte_ray.config import load_config, parse_set

    overrides = parse_set(args.sets)
    overrides.update({key: getattr(args, flag) for flag, key in SHORT_FLAGS.items()
                      if getattr(args, flag, None) is not None})
    if args.resume:
        return load_config(_resumable(args.resume), {**overrides, "output": args.resume})
    return load_config(args.config, overrides)


def _resumable(run_dir: str) -> str:
    """The config of a run that can be resumed, or a one-line reason why not."""
    from pathlib import Path

    from lte_ray.checkpoint import CHECKPOINT

    d = Path(run_dir)
    if not (d / "config.yaml").exists():
        raise UserError(f"--resume: {run_dir!r} holds no run (no config.yaml)")
    if (d / "summary.json").exists():
        raise UserError(f"--resume: the run in {run_dir!r} has already finished")
    if not (d / CHECKPOINT).exists():
        raise UserError(f"--resume: {run_dir!r} has no checkpoint yet; start the run again")
    return str(d / "config.yaml")


def cmd_train(args: argparse.Namespace) -> int:
    from lte_ray.checkpoint import checkpoint_meta
    from lte_ray.outputs import RunOutput, make_summary
    from lte_ray.progress import RoundProgress, stdout_console, summary_table
    from lte_ray.tracking import Tracker

    cfg = config_from_args(args)
    if cfg.method in ("full", "galore") and args.backend == "ray":
        print(f"lte-ray: the {cfg.method} baseline is one worker with no heads; it runs in this process",
              file=sys.stderr)
        args.backend = "local"
    if args.backend == "ray":
        _loopback_if_local(cfg)
    if args.resume and args.backend != "ray":
        raise UserError("--resume: only --backend ray writes checkpoints")
    out = RunOutput(cfg, resume=bool(args.resume))
    meta = checkpoint_meta(out.dir) if args.resume else None
    if meta:
        out.truncate_after(meta["round"])  # rounds after the checkpoint will be trained again
    run_name = cfg.ray.run_name or out.dir.name
    tracker = Tracker(cfg, out.dir, run_name, run_id=meta and meta.get("mlflow_run_id"), backend=args.backend)
    title = f"{cfg.method} x{cfg.lte.heads}" if cfg.method == "lte" else cfg.method
    if not args.quiet:
        print(f"run {run_name!r} ({args.backend}); output {out.dir}; MLflow {tracker.uri} run {tracker.run_id}",
              file=sys.stderr)

    def on_round(rec: dict[str, Any]) -> None:
        out.record(rec)
        tracker.log_round(rec)
        if bar:
            bar.update(rec)

    def run():
        if args.backend == "local":
            from lte_ray.core.simulate import simulate

            return simulate(cfg, on_round)
        from lte_ray.runtime.launch import train

        return train(cfg, run_name=run_name, output_dir=str(out.dir), on_round=on_round,
                     mlflow_run_id=tracker.run_id, resume=bool(meta))

    bar = None
    try:
        if args.quiet:
            result = run()
        else:
            with RoundProgress(cfg.rounds, title, start=meta["round"] if meta else 0) as bar:
                result = run()
    except KeyboardInterrupt:
        out.close()
        tracker.finish(out.dir, None, status="KILLED")
        print(f"lte-ray: interrupted; the rounds so far are in {out.dir / 'metrics.jsonl'}"
              + (f"; continue with --resume {out.dir}" if args.backend == "ray" else ""), file=sys.stderr)
        return 130
    except BaseException:
        out.close()
        tracker.finish(out.dir, None, status="FAILED")
        raise
    summary = out.finish(make_summary(cfg, method=result.method, rounds=result.rounds, heads=result.heads,
                                      samples_seen=result.samples_seen, wall_seconds=result.wall_seconds,
                                      final=result.final, **result.extra, mlflow_run_id=tracker.run_id,
                                      mlflow_uri=tracker.uri), result.state)
    tracker.finish(out.dir, summary)
    stdout_console().print(summary_table(summary))
    return 0


def _loopback_if_local(cfg) -> None:
    """If we are about to start a local cluster, keep it on 127.0.0.1 (Ray otherwise binds to the
    routable address). Ray reads this at import, so it is set before anything imports ray."""
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.method in ("full", "galore"):
        raise UserError(f"method: tune sweeps LTE runs on Ray; {cfg.method} has no heads to place")
    output = cfg.output or f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    _loopback_if_local(cfg)
    from lte_ray import tune as sweeps
    from lte_ray.progress import stdout_console
    from lte_ray.runtime.launch import connect

    sweeps.check_space(cfg, args.grid, args.choice)
    space = sweeps.parse_space(args.grid, args.choice, args.loguniform, args.uniform)
    started = connect(cfg)
    try:
        report = sweeps.sweep(cfg, space, output=output, samples=args.samples, asha=args.asha, metric=args.metric,
                              mode=args.mode, max_concurrent=args.max_concurrent)
    finally:
        if started:
            import ray

            ray.shutdown()
    stdout_console().print(sweeps.ranking_table(report))
    best = report["best"]
    if best is None:
        print("lte-ray: every trial failed; see the table above", file=sys.stderr)
        return 1
    print(f"best: {best['trial_id']} {best['params']} {report['metric']}={best[report['metric']]:.4f}; "
          f"written to {output}/best_config.json", file=sys.stderr)
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from lte_ray.runtime.launch import join

    def show(status: dict[str, Any]) -> None:
        if not status["done"]:
            print(f"head {status['head_id']} in run {args.run!r}: round {status['round']}/{status['rounds']}, "
                  f"{status['active_heads']} heads active", file=sys.stderr)

    try:
        status = join(args.run, address=args.address, namespace=args.namespace, on_status=show)
    except KeyboardInterrupt:
        print("lte-ray: head withdrawn", file=sys.stderr)
        return 130
    print(f"run {args.run!r} ended; head {status['head_id']} took part", file=sys.stderr)
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from lte_ray.bench.quality import bench_quality, markdown, problems

    for name in ("seeds", "samples", "evals", "jobs", "budget_factor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(args, name)})")
    output = args.output or f"runs/bench-quality-{time.strftime('%Y%m%d-%H%M%S')}"
    report = bench_quality(output, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                           samples=args.samples, evals=args.evals, jobs=args.jobs, device=args.device,
                           budget_factor=args.budget_factor)
    print(markdown(report))
    print(f"written: {output}/quality.json, quality.md, quality.png", file=sys.stderr)
    bad = problems(report)
    if bad:
        print(f"lte-ray: bench quality: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_system(args: argparse.Namespace) -> int:
    from lte_ray.bench.system import bench_system, markdown
    from lte_ray.config import load_config, parse_set

    overrides = parse_set(args.sets)
    overrides.update({k: v for k, v in (("train.rounds", args.rounds), ("ray.address", args.address)) if v is not None})
    cfg = load_config(args.config, overrides)
    if cfg.rounds < 2:
        raise UserError(f"train.rounds: bench system needs at least 2 rounds (got {cfg.rounds})")
    if cfg.method != "lte":
        raise UserError(f"method: bench system measures LTE runs (got {cfg.method})")
    _loopback_if_local(cfg)
    output = args.output or f"runs/bench-system-{time.strftime('%Y%m%d-%H%M%S')}"
    report = bench_system(cfg, output)
    print(markdown(report))
    print(f"written: {output}/system.json, system.md", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"lte-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
