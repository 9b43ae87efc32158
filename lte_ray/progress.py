"""Per-round progress: a rich progress bar in a terminal, plain log lines elsewhere (CI, `ray job logs`)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lte_ray.core.protocol import RoundRecord, Task
from lte_ray.core.task import headline_metric


def _metrics_text(rec: RoundRecord, metric: str) -> str:
    parts = [f"heads {rec.active_heads}", f"loss {rec.train_loss:.4f}"]
    if metric in rec.evals:
        name = metric.removeprefix("eval_").replace("accuracy", "acc")
        parts.append(f"eval {name} {rec.evals[metric]:.4f}")
    return "  ".join(parts)


class RoundProgress:
    """Shows each round as it ends (`update`), with the headline eval metric of the data's task."""

    def __init__(self, total: int, task: Task, title: str = "training", console: Console | None = None,
                 start: int = 0):
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.total, self.title, self.metric = total, title, headline_metric(task)[0]
        self._progress: Progress | None = None
        self._start = start

    def __enter__(self) -> "RoundProgress":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total, completed=self._start, metrics="")
        else:
            self.console.print(f"{self.title}: {self.total} rounds")
        return self

    def update(self, rec: RoundRecord) -> None:
        text = _metrics_text(rec, self.metric)
        if self._progress is not None:
            self._progress.update(self._task, completed=rec.round, metrics=text)
        elif rec.evals or rec.round == 1:
            self.console.print(f"round {rec.round}/{rec.rounds}  samples {rec.samples_seen}  {text}"
                               f"  ({rec.elapsed:.0f}s)", highlight=False)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"lte-ray: {summary['method']} on {summary['config']['data']['name']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    rows = [("method", summary["method"]), ("model", summary["config"]["model"]["name"]),
            ("heads", summary["heads"]),
            ("rank", summary.get("recipe", {}).get("rank", summary["config"]["lte"]["rank"])),
            ("merge every", summary["config"]["lte"]["merge_every"]), ("rounds", summary["rounds"]),
            ("samples seen", f"{summary['samples_seen']:,}")]
    rows += [(k, f"{v:.4f}") for k, v in summary.items() if k.startswith("eval_") and isinstance(v, float)]
    rows += [(k.replace("_", " "), f"{summary[k]:,}") for k in ("bytes_up", "bytes_down", "heads_joined", "heads_lost")
             if k in summary]
    rows += [("wall seconds", f"{summary['wall_seconds']:.1f}"), ("output", summary.get("output", ""))]
    for k, v in rows:
        table.add_row(k, str(v))
    return table


def stdout_console() -> Console:
    return Console(file=sys.stdout)
