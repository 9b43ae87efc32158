"""`lte-ray bench quality | system | merge | chaos`: the benchmarks' command line."""

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
    q = kinds.add_parser("quality", help="LTE against full-rank, LoRA, LoRA-merge, multi-head LoRA, GaLore and Fira",
                         description="Train every setting on digits and MNIST (ViT), Shakespeare (char-level GPT) "
                                     "and the King James Bible (BPE GPT) with the same sample budget and evaluation "
                                     "points, over several seeds; write quality.json, quality.md and quality.png, and "
                                     "each run's folder under runs/. With --vary, a sweep. Defaults take about 35 "
                                     "minutes on 2 CPU cores.")
    q.add_argument("--datasets", type=_csv, help="comma-separated: digits,mnist,shakespeare,kjv,shakespeare-nano,"
                                                 "kjv-nano,shakespeare-gpt-s (default: the first four)")
    q.add_argument("--methods", type=_csv, help="comma-separated setting keys: full,lora,lora-merge,mhlora,galore,"
                                                "fira,lte (the default) and lte-8,lte-t10")
    q.add_argument("--seeds", type=int,
                   help="seeds per setting (default: 3 on the four default data sets, 1 on the larger models)")
    q.add_argument("--samples", type=int, help="sample budget per run (default: the data set's, docs/benchmarks.md)")
    q.add_argument("--evals", type=int, help="evaluation points per run (default: the data set's)")
    q.add_argument("--budget-factor", type=float, default=1,
                   help="give every setting but full-rank this many times the budget (1.5 or 2, say), to measure "
                        "how many samples it needs to reach full-rank (default: 1, the same budget); it writes "
                        "quality_x<factor>.* and may share the 1x run's --output, whose full-rank runs it reads back")
    q.add_argument("--vary", metavar="KEY=V1,V2", action="append", default=[],
                   help="run every chosen setting but full-rank once per value (repeatable; several cross): "
                        "e.g. --vary lte.merge_every=1,5,10; keys joined by + vary together: "
                        "--vary lte.alpha+train.lr=64+2e-3,256+5e-4")
    q.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config field for every setting, full-rank too (repeatable): e.g. "
                        "--set train.warmup_rounds=20")
    q.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (default: 2)")
    q.add_argument("--device", choices=get_args(Device), default="cpu")
    q.add_argument("--output", default=None, help="folder (default: runs/bench-quality-<time>)")
    q.set_defaults(func=cmd_bench_quality)
    y = kinds.add_parser("system", help="where a Ray run's time, bytes and memory go",
                         description="Run the default config on Ray and split each round's wall time (head "
                                     "compute, quantize, transfer, merge, eval); compare its traffic with "
                                     "data-parallel all-reduce; measure one head's memory and step time with "
                                     "fp32/int8/nf4 base weights against a full-rank AdamW worker, per precision "
                                     "and activation-checkpointing setting; time image-folder loading; and "
                                     "compare samples per second on Ray with core.simulate. Writes system.json "
                                     "and system.md.")
    y.add_argument("--config", metavar="FILE", help="YAML config (default: the built-in digits config)")
    y.add_argument("--preset", choices=["vit-s", "gpt-s"],
                   help="model size on top of the config (--set wins): vit-s = ViT-S (width 384, depth 12) with "
                        "4 heads of rank 64, alpha 512, batch 16; gpt-s = GPT width 384, depth 6, context 256 on "
                        "Shakespeare, same LTE settings")
    y.add_argument("--only-workers", action="store_true",
                   help="skip the timed Ray and core.simulate runs: only memory, step time (and image loading)")
    y.add_argument("--precisions", type=_csv, metavar="P1,P2",
                   help="train.precision values to measure the workers with (default: the config's)")
    y.add_argument("--checkpointing", type=_csv, metavar="off,on",
                   help="activation checkpointing settings to measure the workers with (default: the config's)")
    y.add_argument("--loader-workers", type=_csv, metavar="N1,N2",
                   help="image folders: DataLoader worker counts to time (default: 0,2)")
    y.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set train.rounds=20 (repeatable)")
    y.add_argument("--rounds", type=int, help="rounds of the timed runs (default: the config's, 60 by default; "
                                              "clears train.total_samples)")
    y.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    y.add_argument("--output", default=None, help="folder (default: runs/bench-system-<time>)")
    y.set_defaults(func=cmd_bench_system)
    m = kinds.add_parser("merge", help="the coordinator's validate + merge seconds for N synthetic heads, and the "
                                       "scaling model",
                         description="Build N synthetic head results for a transformer (ViT-S by default), time the "
                                     "coordinator's validation and merge the way it was before rank-r uploads and the "
                                     "way it is now (on CUDA too where available), check the scaling model against "
                                     "the measurements and project it to 1,024 heads and 1B weights. Writes "
                                     "merge.json and merge.md. About 20 s at the defaults on 2 CPU cores.")
    m.add_argument("--heads", type=_csv, default=["8", "32"], metavar="N1,N2", help="head counts (default: 8,32)")
    m.add_argument("--width", type=int, default=384, help="model width (default: 384, ViT-S)")
    m.add_argument("--depth", type=int, default=12, help="transformer blocks (default: 12, ViT-S)")
    m.add_argument("--rank", type=int, default=64, help="LoRA rank (default: 64)")
    m.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    m.add_argument("--project", type=_csv, default=["8", "32", "128", "1024"], metavar="N1,N2",
                   help="head counts of the projection table (default: 8,32,128,1024)")
    m.add_argument("--output", default=None, help="folder (default: runs/bench-merge-<time>)")
    m.set_defaults(func=cmd_bench_merge)
    c = kinds.add_parser("chaos", help="the default run calm, with a straggler, and with every fault at once",
                         description="Run the default digits config on a loopback cluster of several Ray nodes "
                                     "(127.0.0.1) with a real MLflow server: calm; with one head 10x slower; and "
                                     "with heads SIGKILLed every few rounds, a node killed, the coordinator killed "
                                     "once, a straggler, a head poisoning every upload and MLflow down for a "
                                     "stretch. Checks that no merged round is lost, that MLflow holds every round "
                                     "once, and the accuracy and wall time against calm; writes chaos.json and "
                                     "chaos.md. About 5 minutes on 2 CPU cores.")
    c.add_argument("--rounds", type=int, help="rounds per run (default: the default config's, 60)")
    c.add_argument("--nodes", type=int, default=3, help="Ray nodes, the head node included (default: 3)")
    c.add_argument("--scenarios", type=_csv, metavar="S1,S2",
                   help="comma-separated: calm,straggler,chaos (default: all three; calm is what the others "
                        "are compared with)")
    c.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field of every run, e.g. --set lte.heads=6 (repeatable)")
    c.add_argument("--output", default=None, help="folder (default: runs/bench-chaos-<time>)")
    c.set_defaults(func=cmd_bench_chaos)
    g = kinds.add_parser("share", help="1..8 heads sharing one GPU against full-rank and the official batched heads",
                         description="On a GPU machine: for each head count k, run the config on Ray with k heads at "
                                     "(1 - 0.1) / k of the GPU each and the coordinator on 0.1 of it, and time a "
                                     "full-rank AdamW worker on the whole GPU at the k heads' combined batch and, "
                                     "with --anchor-src, the official LTE code's k batched heads in one process. "
                                     "Writes share.json and share.md.")
    g.add_argument("--config", metavar="FILE", help="YAML config (default: the built-in digits config)")
    g.add_argument("--preset", choices=["vit-s", "gpt-s"], help="model size on top of the config (as bench system)")
    g.add_argument("--heads", type=_csv, default=["1", "2", "4", "8"], metavar="N1,N2",
                   help="head counts (default: 1,2,4,8)")
    g.add_argument("--rounds", type=int, default=20, help="rounds of each Ray run (default: 20; 2..R are timed)")
    g.add_argument("--anchor-src", metavar="DIR",
                   help="a checkout of github.com/minyoungg/LTE: also time its batched heads")
    g.add_argument("--steps", type=int, default=30, help="timed steps of the full-rank and official runs (default: 30)")
    g.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set train.precision=bf16 (repeatable)")
    g.add_argument("--output", default=None, help="folder (default: runs/bench-share-<time>)")
    g.set_defaults(func=cmd_bench_share)


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from lte_ray.bench.quality import bench_quality, markdown, problems, report_name
    from lte_ray.outputs import default_output

    for name in ("seeds", "samples", "evals", "jobs", "budget_factor"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(args, name):g})")
    output = args.output or str(default_output("bench-quality"))
    report = bench_quality(output, datasets=args.datasets, methods=args.methods, seeds=args.seeds,
                           samples=args.samples, evals=args.evals, jobs=args.jobs, device=args.device,
                           budget_factor=args.budget_factor, vary=args.vary, set_items=args.sets)
    print(markdown(report))
    name = report_name(args.budget_factor)
    print(f"written: {output}/{name}.json, {name}.md, {name}.png", file=sys.stderr)
    bad = problems(report)
    if bad:
        print(f"lte-ray: bench quality: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_system(args: argparse.Namespace) -> int:
    from lte_ray.bench.system import PRESETS, bench_system, markdown
    from lte_ray.config import Precision, parse_set, rounds_override
    from lte_ray.core.methods import LTE, get_method
    from lte_ray.outputs import default_output
    from lte_ray.resolve import load_config
    from lte_ray.run import loopback_if_local

    overrides = {**PRESETS.get(args.preset, {}), **parse_set(args.sets)}
    if args.address is not None:
        overrides["ray.address"] = args.address
    if args.rounds is not None:
        overrides.update(rounds_override(args.rounds))
    cfg = load_config(args.config, overrides)
    precisions = args.precisions
    bad = [p for p in precisions or [] if p not in get_args(Precision)]
    if bad:
        raise UserError(f"--precisions: {bad[0]!r} is not one of {', '.join(get_args(Precision))}")
    switches = {"off": False, "on": True}
    if any(c not in switches for c in args.checkpointing or []):
        raise UserError(f"--checkpointing: give off and/or on (got {','.join(args.checkpointing)})")
    checkpointing = [switches[c] for c in args.checkpointing] if args.checkpointing else None
    try:
        loader_workers = [int(n) for n in args.loader_workers] if args.loader_workers else None
    except ValueError:
        loader_workers = [-1]
    if loader_workers and min(loader_workers) < 0:
        raise UserError(f"--loader-workers: give whole numbers >= 0 (got {','.join(args.loader_workers)})")
    if cfg.rounds < 2 and not args.only_workers:
        raise UserError(f"train.rounds: bench system needs at least 2 rounds (got {cfg.rounds})")
    if get_method(cfg.method) is not LTE:
        raise UserError(f"method: bench system measures LTE runs (got {cfg.method})")
    loopback_if_local(cfg)
    output = args.output or str(default_output("bench-system"))
    report = bench_system(cfg, output, runs=not args.only_workers, precisions=precisions,
                          checkpointing=checkpointing, loader_workers=loader_workers)
    print(markdown(report))
    print(f"written: {output}/system.json, system.md", file=sys.stderr)
    return 0


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _counts(flag: str, items: list[str]) -> list[int]:
    try:
        values = [int(x) for x in items]
    except ValueError:
        values = [0]
    if not values or min(values) < 1:
        raise UserError(f"--{flag}: give whole numbers >= 1 (got {','.join(items)})")
    return values


def cmd_bench_merge(args: argparse.Namespace) -> int:
    from lte_ray.bench.merge import bench_merge, markdown
    from lte_ray.outputs import default_output

    heads, project = _counts("heads", args.heads), _counts("project", args.project)
    for name in ("width", "depth", "rank", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: must be >= 1 (got {getattr(args, name)})")
    output = args.output or str(default_output("bench-merge"))
    report = bench_merge(output, heads, args.width, args.depth, args.rank, threads=args.threads, project=project)
    print(markdown(report))
    print(f"written: {output}/merge.json, merge.md", file=sys.stderr)
    return 0


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    # Read when Ray is imported: nodes bind to 127.0.0.1, and the clusters started here use token
    # auth (Ray's default for new local clusters), so this process must present the token too.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from lte_ray.bench.chaos import SCENARIOS, bench_chaos, markdown
    from lte_ray.config import parse_set
    from lte_ray.outputs import default_output
    from lte_ray.resolve import build_config

    if args.rounds is not None and args.rounds < 10:
        raise UserError(f"--rounds: the faults need at least 10 rounds to spread over (got {args.rounds})")
    if args.nodes < 2:
        raise UserError(f"--nodes: a node is killed, so at least 2 (got {args.nodes})")
    scenarios = tuple(args.scenarios or SCENARIOS)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        raise UserError(f"--scenarios: {(bad or [''])[0]!r} is not one of {', '.join(SCENARIOS)}")
    overrides = parse_set(args.sets)
    build_config({}, overrides)  # a bad --set is the user's one-line error now, not a traceback mid-bench
    output = args.output or str(default_output("bench-chaos"))
    report = bench_chaos(output, rounds=args.rounds, nodes=args.nodes, scenarios=scenarios, overrides=overrides,
                         progress=lambda line: print(line, file=sys.stderr))
    print(markdown(report))
    print(f"written: {output}/chaos.json, chaos.md", file=sys.stderr)
    if report["problems"]:
        print(f"lte-ray: bench chaos: {'; '.join(report['problems'])}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_share(args: argparse.Namespace) -> int:
    from lte_ray.bench.anchor import import_official_lte
    from lte_ray.bench.share import bench_share, markdown
    from lte_ray.bench.system import PRESETS
    from lte_ray.config import parse_set, rounds_override
    from lte_ray.outputs import default_output
    from lte_ray.resolve import load_config
    from lte_ray.run import loopback_if_local

    heads = _counts("heads", args.heads)
    if not torch_cuda_available():
        raise UserError("bench share: needs a CUDA GPU (torch.cuda.is_available() is False here)")
    if args.rounds < 2 or args.steps < 1:
        raise UserError(f"--rounds must be >= 2 and --steps >= 1 (got {args.rounds}, {args.steps})")
    if args.anchor_src:
        import_official_lte(args.anchor_src)  # a wrong folder is a one-line error before any run
    cfg = load_config(args.config, {**PRESETS.get(args.preset, {}), **parse_set(args.sets),
                                    **rounds_override(args.rounds)})
    loopback_if_local(cfg)
    output = args.output or str(default_output("bench-share"))
    report = bench_share(cfg, output, heads, anchor_src=args.anchor_src, anchor_steps=args.steps,
                         full_steps=args.steps)
    print(markdown(report))
    print(f"written: {output}/share.json, share.md", file=sys.stderr)
    return 0
