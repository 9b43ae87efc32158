"""MLflow tracking: params (the resolved config), per-round metrics, and at the end the merged
model, the config and a plot of the eval metric against samples seen.

The default store is a SQLite file in the output folder (`sqlite:///<output>/mlflow.db`, with
artifacts beside it); `tracking.mlflow_uri` / `--mlflow-uri` points at a server instead. The
explicit `MlflowClient` (no global "active run") keeps several runs in one process apart.

Best-effort: every MLflow call runs on a background thread (`tracking_writer`), so a server that
is down or slow never blocks or ends training; rounds wait in a bounded queue (`tracking_backlog`)
and are written, in order, when it answers. Only a URI MLflow cannot use at all is an error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lte_ray.checkpoint import write_json
from lte_ray.config import Config
from lte_ray.core.methods import get_method
from lte_ray.core.protocol import RoundRecord
from lte_ray.core.task import headline_metric
from lte_ray.errors import UserError
from lte_ray.redact import redact, redacted_config
from lte_ray.tracking_backlog import Backlog
from lte_ray.tracking_writer import Writer

log = logging.getLogger("lte_ray.tracking")

START_WAIT_S = 30.0  # at start, how long to wait for the MLflow run to exist (its id is printed, checkpointed)
FLUSH_TIMEOUT_S = 30.0  # at the end, how long to wait for the queue to be written
# One HTTP attempt is quick, and our backoff governs (MLflow's own retries can take minutes). Set
# for the whole process (MLflow reads them at every request); a value the user set wins.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


RUN_ID_FILE = "mlflow_run.json"


def saved_run_id(output_dir: str | Path, uri: str) -> str | None:
    """The id of the MLflow run at `uri` that a tracker wrote into `output_dir` once MLflow
    answered, or None (none written, or written for another store)."""
    try:
        saved = json.loads((Path(output_dir) / RUN_ID_FILE).read_text())
        return saved["run_id"] if saved["uri"] == redact(uri) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_run_id(output_dir: Path, uri: str, run_id: str) -> None:
    try:
        write_json(output_dir / RUN_ID_FILE, {"run_id": run_id, "uri": redact(uri)})
    except Exception as e:  # best-effort, like all tracking; on the writer's thread, which must not die
        log.warning("cannot write %s in %s (%s)", RUN_ID_FILE, output_dir, e)


def default_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


class Tracker:
    def __init__(self, cfg: Config, output_dir: str | Path, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, backend: str = "ray", flush_timeout_s: float | None = None):
        """Start the MLflow run (`run_id`: continue that one) in the background. Waits at most
        START_WAIT_S for it; if MLflow does not answer, training goes on and the run is created
        and filled in when it does. `finish` waits at most `flush_timeout_s` (FLUSH_TIMEOUT_S).
        Raises UserError only for a URI MLflow cannot use."""
        from mlflow.entities import Param

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table-creation chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = cfg.tracking.mlflow_uri or default_uri(output_dir)  # the real one, for MLflow clients only
        self.flush_timeout_s = FLUSH_TIMEOUT_S if flush_timeout_s is None else flush_timeout_s
        parts = urlsplit(self.uri)
        if parts.scheme in ("http", "https") and not parts.hostname:
            raise UserError(f"tracking.mlflow_uri: {redact(self.uri)!r} names no host")
        for name, value in HTTP_ENV.items():
            os.environ.setdefault(name, value)
        self._resumed = run_id
        local = self.uri.startswith("sqlite:") and not cfg.tracking.mlflow_uri
        artifacts = (Path(output_dir).resolve() / "mlartifacts").as_uri() if local else None
        tags = {"backend": backend, "method": cfg.method}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id

        def connect() -> Any:
            from mlflow import MlflowClient

            return MlflowClient(tracking_uri=self.uri)

        def setup(client: Any) -> str:
            if run_id is not None:  # resume: the same run continues
                client.update_run(run_id, status="RUNNING")
                return run_id
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment,
                                                                            artifact_location=artifacts)
            return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id

        # The id goes into the output folder as soon as MLflow answers: a run created late (MLflow was
        # down at start) is missing from the checkpoints written before, and `--resume` reads it here.
        if run_id is None:  # a new run: an id left by an earlier run in this folder is not its own
            (Path(output_dir) / RUN_ID_FILE).unlink(missing_ok=True)
        self._writer = Writer(self.uri, connect, setup, Backlog(Path(output_dir) / "metrics.jsonl"),
                              on_run=lambda rid: _save_run_id(Path(output_dir), self.uri, rid))
        if run_id is None:
            # what the unset defaults resolved to, for the method as it trains
            derived = {f"recipe.{k}": str(v) for k, v in get_method(cfg.method).recipe(cfg).items()}
            items = [Param(k, v) for k, v in {**flatten(redacted_config(cfg.to_dict())), **derived}.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self._writer.add_call(lambda c, r, chunk=items[i:i + 100]: c.log_batch(r, params=chunk))
        self._writer.settled.wait(START_WAIT_S)
        if self._writer.fatal is not None:
            raise UserError(f"tracking.mlflow_uri: MLflow cannot use {redact(self.uri)!r} "
                            f"(e.g. sqlite:///path/mlflow.db or http://host:5000)")

    @property
    def shown_uri(self) -> str:
        """The URI to print or store: credentials redacted."""
        return redact(self.uri)

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id; None while MLflow has not answered yet (a new run)."""
        return self._writer.run_id or self._resumed

    @property
    def client(self) -> Any:
        """The writer's MlflowClient (None until made); call MLflow through `set_tag` etc. instead."""
        return self._writer.client

    def log_round(self, rec: RoundRecord) -> None:
        """Queue the round's metrics; returns at once."""
        self._writer.add_round(rec.round, int(time.time() * 1000), rec.metrics(), rec.elapsed)

    def set_tag(self, key: str, value: str) -> None:
        self._writer.add_call(lambda c, r: c.set_tag(r, key, value))

    def finish(self, output_dir: str | Path, summary: dict[str, Any] | None, status: str = "FINISHED") -> None:
        """Queue the final metrics, the artifacts and the run's end, then wait at most
        `flush_timeout_s` for everything to be written. Never raises for MLflow: it warns."""
        from mlflow.entities import Metric

        out = Path(output_dir)
        if summary is not None:
            now = int(time.time() * 1000)
            finals = [Metric(f"final_{k}", float(v), now, int(summary["rounds"])) for k, v in summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rounds"]
            self._writer.add_call(lambda c, r: c.log_batch(r, metrics=finals))
            plot = plot_curve(out / "metrics.jsonl", out / "eval_curve.png", headline_metric(summary["task"])[0])
            for path in (out / "model.safetensors", out / "config.yaml", out / "summary.json", plot):
                if path and Path(path).exists():
                    self._writer.add_call(lambda c, r, p=str(path): c.log_artifact(r, p))
        self._writer.add_call(lambda c, r: c.set_terminated(r, status=status))
        if not self._writer.drain(self.flush_timeout_s):
            rounds, calls = self._writer.pending()
            log.warning("MLflow at %s: gave up after %.0f s with %d rounds and %d other calls not written "
                        "(metrics.jsonl and the output folder have them all)",
                        self.shown_uri, self.flush_timeout_s, rounds, calls)
        self._writer.stop()


def plot_curve(metrics_path: Path, png_path: Path, metric: str) -> Path | None:
    """`metric` against samples seen, from metrics.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return None
    recs = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if metric in r]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["samples_seen"] for r in recs], [r[metric] for r in recs], marker="o")
    ax.set_xlabel("samples seen")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
