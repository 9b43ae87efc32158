"""One run's bookkeeping, the same for `lte-ray train`, a Tune trial and the benchmarks.

`Run` owns the output folder (metrics.jsonl as rounds finish; summary.json, model.safetensors
and config.yaml at the end, see `outputs`), the MLflow run when tracking is on, any further
per-round sinks (a progress bar, Tune's reporter), and the choice of backend: Ray (one actor per
head, `runtime.launch`) or this process (`core.simulate`). Methods without heads always run in
this process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from lte_ray.checkpoint import checkpoint_meta
from lte_ray.config import Config
from lte_ray.core.methods import get_method
from lte_ray.core.protocol import RoundRecord, RunResult
from lte_ray.core.simulate import simulate
from lte_ray.datasets import DataBundle
from lte_ray.errors import UserError
from lte_ray.outputs import RunOutput
from lte_ray.redact import redacted_config
from lte_ray.tracking import Tracker, default_uri, saved_run_id

Sink = Callable[[RoundRecord], None]


class Run:
    def __init__(self, cfg: Config, *, backend: str = "ray", resume: bool = False, tracking: bool = True,
                 sinks: Iterable[Sink] = ()):
        """`cfg` is resolved (`lte_ray.resolve`). With `resume`, `cfg.output` holds a killed Ray run
        to continue from its checkpoint, into the same MLflow run."""
        self.cfg, self.method = cfg, get_method(cfg.method)
        self.backend = backend if self.method.on_ray else "local"
        if resume and self.backend != "ray":
            raise UserError("--resume: only --backend ray writes checkpoints")
        self.out = RunOutput(cfg, resume=resume)
        self.meta = checkpoint_meta(self.out.dir) if resume else None
        self.recorded = 0  # rounds metrics.jsonl holds already (a resumed run's, up to its checkpoint)
        if self.meta:
            self.recorded = self.out.truncate_after(self.meta["round"])  # later rounds will be trained again
        self.name = cfg.ray.run_name or self.out.dir.name
        # A checkpoint names the MLflow run unless MLflow was down when the run started; then the
        # tracker wrote the id into the folder once it answered.
        uri = cfg.tracking.mlflow_uri or default_uri(self.out.dir)
        run_id = (self.meta.get("mlflow_run_id") or saved_run_id(self.out.dir, uri)) if self.meta else None
        self.tracker = Tracker(cfg, self.out.dir, self.name, run_id=run_id, backend=self.backend) if tracking else None
        self.sinks = list(sinks)

    @property
    def dir(self) -> Path:
        return self.out.dir

    @property
    def start_round(self) -> int:
        """Rounds already done: 0, or the checkpoint's round when resuming."""
        return self.meta["round"] if self.meta else 0

    def record(self, rec: RoundRecord) -> None:
        self.out.record(rec)
        if self.tracker:
            self.tracker.log_round(rec)
        for sink in self.sinks:
            sink(rec)

    def train(self, *, address: str | None = None, placement_group: Any = None,
              data: DataBundle | None = None) -> RunResult:
        """Train, recording every round as it ends. `data`, already loaded, saves loading it again
        in this process (Ray actors load their own)."""
        if self.backend == "local":
            return simulate(self.cfg, on_round=self.record, data=data)
        if data is not None:
            raise ValueError("Run.train: `data` is for the local backend; Ray actors load their own")
        from lte_ray.runtime.launch import train  # Ray is imported only by runs that use it

        return train(self.cfg, run_name=self.name, output_dir=str(self.out.dir), on_round=self.record,
                     mlflow_run_id=self.tracker.run_id if self.tracker else None, resume=self.meta is not None,
                     address=address, placement_group=placement_group, shown_upto=self.recorded)

    def finish(self, result: RunResult) -> dict[str, Any]:
        """Write summary.json, the weights and the MLflow artifacts; returns the summary."""
        tracking = ({"mlflow_run_id": self.tracker.run_id, "mlflow_uri": self.tracker.shown_uri}
                    if self.tracker else {})
        summary = self.out.finish({**result.summary(), **tracking, "config": redacted_config(self.cfg.to_dict()),
                                   "recipe": get_method(self.cfg.method).recipe(self.cfg)},
                                  result.state)
        if self.tracker:
            self.tracker.finish(self.out.dir, summary)
        return summary

    def abort(self, status: str = "FAILED") -> None:
        """The run ended without a result (KILLED, FAILED): what it wrote so far stays."""
        self.out.close()
        if self.tracker:
            self.tracker.finish(self.out.dir, None, status=status)


def loopback_if_local(cfg: Config) -> None:
    """If a local Ray cluster is about to be started, keep it on 127.0.0.1 (Ray otherwise binds
    to the routable address). Ray reads this when it is imported, so call it before that."""
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
