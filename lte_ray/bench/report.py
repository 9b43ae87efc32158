"""What both benchmarks share: the machine they ran on, a process pool with a progress bar,
markdown tables and the JSON they write."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on, as its tables should state it."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), **_packages()}


def _packages() -> dict[str, str]:
    """Versions of the packages that change results besides torch: timm builds the image models
    (their initialisation), scikit-learn ships digits."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("timm", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    packages = "".join(f", {name} {m[name]}" for name in ("timm", "scikit-learn") if m.get(name))
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB{gpu}; torch {m['torch']}{packages}, "
            f"Python {m['python']}")


def _die_with_parent(parent: int) -> None:
    """Stop this worker when the bench process dies, however it dies (SIGTERM, SIGKILL), instead of
    training on into run folders nobody reads: Linux's PR_SET_PDEATHSIG, as Python's process pool
    has no way to stop its workers before 3.14 (`terminate_workers`). Elsewhere, nothing."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the bench died before prctl took effect
        os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def run_pool(fn: Callable[[Any], dict[str, Any]], jobs: Sequence[Any], workers: int, label: Callable[[Any], str],
             title: str, console: Console | None = None, log: Path | None = None) -> list[dict[str, Any]]:
    """Run `fn(job)` for every job in `workers` fresh processes (one torch thread each when there
    are several), with a progress bar in a terminal and a line per finished job elsewhere.
    Results come back in the order of `jobs`; a job that raised comes back as {"error": ...}
    and the others go on. With `log`, each result is also appended there (JSON lines) as it
    arrives, so an interrupted benchmark keeps the runs it finished."""
    console = console or Console(stderr=True)
    workers = max(1, min(workers, len(jobs)))
    threads = 1 if workers > 1 else max(1, os.cpu_count() or 1)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console,
                        disable=not console.is_terminal)
    with progress, ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                       initargs=(threads, os.getpid())) as pool:
        task = progress.add_task(title, total=len(jobs), last="")
        pending = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        done_count = 0
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    results[i] = fut.result()
                    text = f"{label(jobs[i])} ({results[i].get('wall_seconds', 0):.0f}s)"
                except Exception as e:  # noqa: BLE001 (reported, and the benchmark goes on)
                    results[i] = {"error": f"{type(e).__name__}: {e}"}
                    text = f"{label(jobs[i])} FAILED: {results[i]['error']}"
                    console.print(f"{title}: {text}", highlight=False, markup=False)
                done_count += 1
                if log is not None:
                    with open(log, "a") as f:
                        f.write(json.dumps({"job": jobs[i], **results[i]}, default=float) + "\n")
                progress.update(task, advance=1, last=text)
                if not console.is_terminal:
                    console.print(f"{title}: {done_count}/{len(jobs)} done: {text}", highlight=False)
    return results  # type: ignore[return-value]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from lte_ray.checkpoint import write_json

    write_json(out / f"{name}.json", report)
    (out / f"{name}.md").write_text(markdown + "\n")


