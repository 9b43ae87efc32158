"""`lte-ray train` (and, as they land, `tune | eval | bench | join`).

User mistakes print one line `lte-ray: error: ...` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lte_ray.errors import UserError

# Short flags for the common fields: flag -> dotted config key.
SHORT_FLAGS = {
    "method": "method", "heads": "lte.heads", "rank": "lte.rank", "alpha": "lte.alpha",
    "merge_every": "lte.merge_every", "quant": "lte.quant", "rounds": "train.rounds", "lr": "train.lr",
    "seed": "train.seed", "device": "train.device", "output": "output",
}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with LTE (or a baseline)",
                       description="Train a model with LoRA-the-Explorer. With no --config: LTE on the digits "
                                   "data set (shipped with scikit-learn) with a small ViT.")
    p.add_argument("--backend", choices=["local"], default="local",
                   help="local: every head in this process (core.simulate)")
    p.add_argument("--config", metavar="FILE", help="YAML config (see jobs/configs/)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: runs/<method>-<time>)")
    p.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set lte.rank=16 (repeatable)")
    p.add_argument("--method", choices=["lte", "full", "lora", "lora-merge"])
    p.add_argument("--heads", type=int, help="number of LoRA heads (lte.heads)")
    p.add_argument("--rank", type=int, help="LoRA rank (lte.rank)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scaling is alpha/rank (lte.alpha)")
    p.add_argument("--merge-every", type=int, help="local steps per round, T (lte.merge_every)")
    p.add_argument("--quant", choices=["none", "int8", "nf4"], help="broadcast quantization (lte.quant)")
    p.add_argument("--rounds", type=int, help="rounds to train (train.rounds)")
    p.add_argument("--lr", type=float, help="learning rate of the LoRA factors (train.lr)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train.device")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lte-ray", description="LoRA-the-Explorer on Ray: train from scratch "
                                     "with many parallel low-rank heads.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    from lte_ray.config import load_config, parse_set

    overrides = parse_set(args.sets)
    overrides.update({key: getattr(args, flag) for flag, key in SHORT_FLAGS.items()
                      if getattr(args, flag, None) is not None})
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from lte_ray.core.simulate import simulate
    from lte_ray.outputs import RunOutput, make_summary
    from lte_ray.progress import RoundProgress, stdout_console, summary_table

    cfg = config_from_args(args)
    out = RunOutput(cfg)
    title = f"{cfg.method} x{cfg.lte.heads}" if cfg.method == "lte" else cfg.method

    def on_round(rec: dict[str, Any]) -> None:
        out.record(rec)
        if bar:
            bar.update(rec)

    bar = None
    try:
        if args.quiet:
            result = simulate(cfg, on_round)
        else:
            with RoundProgress(cfg.rounds, title) as bar:
                result = simulate(cfg, on_round)
    except KeyboardInterrupt:
        out.close()
        print(f"lte-ray: interrupted; the rounds so far are in {out.dir / 'metrics.jsonl'}", file=sys.stderr)
        return 130
    summary = out.finish(make_summary(cfg, method=result.method, rounds=result.rounds, heads=result.heads,
                                      samples_seen=result.samples_seen, wall_seconds=result.wall_seconds,
                                      final=result.final), result.state)
    stdout_console().print(summary_table(summary))
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
