"""The output folder of a run: metrics.jsonl as rounds finish, then summary.json, the merged
weights (model.safetensors) and the resolved config (config.yaml)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from lte_ray.checkpoint import save_weights, write_json
from lte_ray.config import Config
from lte_ray.core.protocol import RoundRecord
from lte_ray.errors import UserError
from lte_ray.redact import redacted_config


def default_output(kind: str) -> Path:
    """Where a run, sweep or benchmark writes when no --output is given: `runs/<kind>-<time>`."""
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunOutput:
    def __init__(self, cfg: Config, resume: bool = False):
        self.dir = Path(cfg.output) if cfg.output else default_output(cfg.method)
        if not resume and (self.dir / "summary.json").exists():
            raise UserError(f"output: {str(self.dir)!r} already holds a finished run; choose another --output")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Credentials masked: `lte-ray train --resume` asks for them again (cli.config_from_args).
            config = redacted_config(cfg.to_dict())
            (self.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            self._metrics = open(self.dir / "metrics.jsonl", "a" if resume else "w")
        except OSError as e:
            raise UserError(f"output: cannot write to {str(self.dir)!r}: {e.strerror or e}") from None

    def truncate_after(self, round_: int) -> int:
        """Drop records of rounds after `round_` (not in the checkpoint; they will be redone).
        Returns the last round kept: a killed driver may not have written every checkpointed round."""
        self._metrics.close()
        path = self.dir / "metrics.jsonl"
        keep, last = [], 0
        for line in path.read_text().splitlines():
            try:
                if (r := json.loads(line)["round"]) <= round_:
                    keep.append(line)
                    last = max(last, r)
            except (ValueError, KeyError):  # a line cut short when the driver was killed
                continue
        path.write_text("".join(line + "\n" for line in keep))
        self._metrics = open(path, "a")
        return last

    def record(self, rec: RoundRecord) -> None:
        """Append one round's record right away, so an interrupted run keeps its curve."""
        self._metrics.write(json.dumps(rec.to_json(), default=float) + "\n")
        self._metrics.flush()

    def finish(self, summary: dict[str, Any], state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        self._metrics.close()
        summary = {**summary, "output": str(self.dir)}
        if state:
            save_weights(self.dir / "model.safetensors", state, metadata={"method": summary["method"]})
        write_json(self.dir / "summary.json", summary)
        return summary

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()


def finished_run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The summary and the per-round records (as metrics.jsonl holds them) of the finished run in
    `folder`, or None if it holds none."""
    if not (folder / "summary.json").exists():
        return None
    summary = json.loads((folder / "summary.json").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines if line.strip()]
