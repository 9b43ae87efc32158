"""MLflow tracking: params (the resolved config), per-round metrics, and at the end the merged
model, the config and a plot of the eval metric against samples seen.

The default store is a SQLite file in the output folder (`sqlite:///<output>/mlflow.db`, with
artifacts beside it); `tracking.mlflow_uri` / `--mlflow-uri` points at a server instead. The
explicit `MlflowClient` (no global "active run") keeps several runs in one process apart.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lte_ray.config import Config
from lte_ray.core.protocol import RoundRecord
from lte_ray.core.task import headline_metric


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
                 parent_run_id: str | None = None, backend: str = "ray"):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table-creation chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = cfg.tracking.mlflow_uri or default_uri(output_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:  # resume: the same run continues
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            local = self.uri.startswith("sqlite:") and not cfg.tracking.mlflow_uri
            location = (Path(output_dir).resolve() / "mlartifacts").as_uri() if local else None
            exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        tags = {"backend": backend, "method": cfg.method}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        params = flatten(cfg.to_dict())
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_round(self, rec: RoundRecord) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, rec.round) for k, v in rec.metrics().items()])

    def finish(self, output_dir: str | Path, summary: dict[str, Any] | None, status: str = "FINISHED") -> None:
        from mlflow.entities import Metric

        out = Path(output_dir)
        if summary is not None:
            now = int(time.time() * 1000)
            finals = [Metric(f"final_{k}", float(v), now, int(summary["rounds"])) for k, v in summary.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "rounds"]
            self.client.log_batch(self.run_id, metrics=finals)
            plot = plot_curve(out / "metrics.jsonl", out / "eval_curve.png", headline_metric(summary["task"])[0])
            for path in (out / "model.safetensors", out / "config.yaml", out / "summary.json", plot):
                if path and Path(path).exists():
                    self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=status)


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
