"""`lte-ray bench quality | system`: the benchmarks' command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import get_args

from lte_ray.config import Device
from lte_ray.errors import UserError


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: quality (LTE vs baselines) and system (time, bytes, memory)")
    kinds = p.add_subparsers(dest="bench", required=True)
    q = kinds.add_parser("quality", help="LTE against full-rank, LoRA, LoRA-merge and GaLore on digits and text",
                         description="Train every setting on digits (ViT) and Shakespeare (char-level GPT) with "
                                     "the same sample budget and evaluation points, over several seeds; write "
                                     "quality.json, quality.md and quality.png, and each run's folder under runs/. "
                                     "Defaults take about 15 minutes on 2 CPU cores.")
    q.add_argument("--datasets", type=_csv, help="comma-separated: digits,shakespeare (default: both)")
    q.add_argument("--methods", type=_csv, help="comma-separated setting keys (default: all; see docs/benchmarks.md)")
    q.add_argument("--seeds", type=int, help="seeds per setting (default: 3 on digits, 2 on shakespeare)")
    q.add_argument("--samples", type=int, help="sample budget per run (default: 76800 digits, 25600 shakespeare)")
    q.add_argument("--evals", type=int, help="evaluation points per run (default: 15 digits, 10 shakespeare)")
    q.add_argument("--budget-factor", type=int, default=1,
                   help="give every setting but full-rank this many times the budget, to measure how many "
                        "samples it needs to reach full-rank (default: 1, the same budget)")
    q.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (default: 2)")
    q.add_argument("--device", choices=get_args(Device), default="cpu")
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
    y.add_argument("--rounds", type=int, help="rounds of the timed runs (default: the config's, 60 by default; "
                                              "clears train.total_samples)")
    y.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    y.add_argument("--output", default=None, help="folder (default: runs/bench-system-<time>)")
    y.set_defaults(func=cmd_bench_system)


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from lte_ray.bench.quality import bench_quality, markdown, problems
    from lte_ray.outputs import default_output

    for name in ("seeds", "samples", "evals", "jobs", "budget_factor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(args, name)})")
    output = args.output or str(default_output("bench-quality"))
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
    from lte_ray.config import parse_set, rounds_override
    from lte_ray.core.methods import LTE, get_method
    from lte_ray.outputs import default_output
    from lte_ray.resolve import load_config
    from lte_ray.run import loopback_if_local

    overrides = parse_set(args.sets)
    if args.address is not None:
        overrides["ray.address"] = args.address
    if args.rounds is not None:
        overrides.update(rounds_override(args.rounds))
    cfg = load_config(args.config, overrides)
    if cfg.rounds < 2:
        raise UserError(f"train.rounds: bench system needs at least 2 rounds (got {cfg.rounds})")
    if get_method(cfg.method) is not LTE:
        raise UserError(f"method: bench system measures LTE runs (got {cfg.method})")
    loopback_if_local(cfg)
    output = args.output or str(default_output("bench-system"))
    report = bench_system(cfg, output)
    print(markdown(report))
    print(f"written: {output}/system.json, system.md", file=sys.stderr)
    return 0
