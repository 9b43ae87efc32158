"""The background thread that makes every MLflow call of a `tracking.Tracker`, so that MLflow
being down or slow never blocks or ends training.

The caller only queues: rounds (`tracking_backlog.Backlog`) and other calls (params, tags, the
end of the run). The thread connects, creates (or resumes) the run, then writes the queue in
order, rounds first, many rounds per `log_batch`. A call that fails because MLflow is away is
retried with exponential backoff (`RETRY_FIRST_S` doubling to `RETRY_MAX_S`); one warning when
MLflow stops answering, one when it answers again. A call MLflow refuses as wrong (an error code
in `REFUSED`) is dropped with a warning, since retrying cannot help. Warnings go to the
`lte_ray.tracking` logger with credentials redacted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

from lte_ray.redact import redact, scrub
from lte_ray.tracking_backlog import BATCH_METRICS, Backlog, Pending

log = logging.getLogger("lte_ray.tracking")

RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
# MLflow error codes of a request that is wrong, not of a server that is away or overloaded.
REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                     "INVALID_STATE", "BAD_REQUEST", "MALFORMED_REQUEST"})

Call = Callable[[Any, str], None]  # (client, run_id) -> None


def refused(e: BaseException) -> bool:
    return getattr(e, "error_code", None) in REFUSED


def _why(e: BaseException, uri: str, limit: int = 240) -> str:
    text = str(e).strip().splitlines()
    why = scrub(f"{type(e).__name__}: {text[0] if text else ''}", uri)
    return why if len(why) <= limit else why[:limit - 3] + "..."


class Writer:
    def __init__(self, uri: str, connect: Callable[[], Any], setup: Callable[[Any], str], backlog: Backlog,
                 on_run: Callable[[str], None] | None = None):
        """`connect()` makes the MLflow client; `setup(client)` creates or resumes the run and
        returns its id, which `on_run` is then given (on this thread)."""
        self.uri, self._connect, self._setup, self.backlog, self._on_run = uri, connect, setup, backlog, on_run
        self.client: Any = None
        self.run_id: str | None = None
        self.ops: deque[Call] = deque()
        self.settled = threading.Event()  # the run exists, or the first try failed, or tracking is off
        self.fatal: BaseException | None = None  # why the client could not be made at all (a bad URI)
        self._cv = threading.Condition()
        self._stopped = self._kicked = self._busy = self._away = False
        self._thread = threading.Thread(target=self._loop, name="lte-ray-mlflow", daemon=True)
        self._thread.start()

    # -- the caller's side: queue, never wait (but in `drain`) ----------------------------------
    def add_round(self, step: int, ts_ms: int, metrics: dict[str, float], elapsed: float) -> None:
        with self._cv:
            if not self._stopped:
                self.backlog.add(step, ts_ms, metrics, elapsed)
                self._cv.notify_all()

    def add_call(self, call: Call) -> None:
        with self._cv:
            if not self._stopped:
                self.ops.append(call)
                self._cv.notify_all()

    def pending(self) -> tuple[int, int]:
        """(rounds, other calls) not written yet."""
        with self._cv:
            return len(self.backlog), len(self.ops)

    def drain(self, timeout_s: float) -> bool:
        """Retry now, then wait at most `timeout_s` until everything queued is written (or given up)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._kicked = True
            self._cv.notify_all()
            while not self._stopped and (self._busy or self._has_work()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cv.wait(remaining)
            return True

    def stop(self) -> None:
        """No more calls; whatever is still queued is dropped (the thread ends at its next turn)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    # -- the thread ---------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return self.client is None or self.run_id is None or bool(len(self.backlog) or self.ops)

    def _next(self) -> tuple[str, Any]:
        if self.client is None:
            return "connect", None
        if self.run_id is None:
            return "setup", None
        if self.backlog.spill:
            return "spill", (self.backlog.spill, self.backlog.spill_pos)
        batch = self.backlog.take()
        if batch:
            return "rounds", batch
        return "call", self.ops[0]

    def _loop(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
                while not self._stopped and not self._has_work():
                    self._cv.wait()
                if self._stopped:
                    return
                kind, arg = self._next()
                self._busy = True
            if kind == "spill":
                try:  # outside the lock: a file read
                    arg = self.backlog.read_spill(*arg)
                except OSError as e:
                    log.warning("MLflow: cannot read back the rounds held in %s (%s); they stay out of MLflow",
                                self.backlog.jsonl, _why(e, self.uri))
                    with self._cv:
                        self.backlog.spill_written([], self.backlog.spill_pos)
                    continue
            try:
                result = self._attempt(kind, arg)
            except Exception as e:  # MLflow, requests, SQLAlchemy, OSError: anything it may raise
                if self._failed(kind, arg, e):
                    with self._cv:  # away: wait, unless `drain` asks for a try now
                        self._cv.wait_for(lambda: self._stopped or self._kicked, timeout=delay)
                        self._kicked = False
                    delay = min(2 * delay, RETRY_MAX_S)
                continue
            with self._cv:
                self._done(kind, arg, result)
            if kind == "setup" and self._on_run:  # outside the lock: the caller's rounds never wait for it
                self._on_run(result)
            if self._away:
                self._away = False
                log.warning("MLflow at %s answers again; writing the %d rounds held back",
                            redact(self.uri), len(self.backlog))
            delay = RETRY_FIRST_S

    def _attempt(self, kind: str, arg: Any) -> Any:
        if kind == "connect":
            return self._connect()
        if kind == "setup":
            return self._setup(self.client)
        if kind in ("rounds", "spill"):
            return self._log_rounds(arg if kind == "rounds" else arg[0])
        return arg(self.client, self.run_id)

    def _log_rounds(self, batch: list[Pending]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, ts, step) for step, ts, values in batch for k, v in values.items()]
        for i in range(0, len(metrics), BATCH_METRICS):  # one round alone may hold more than a batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH_METRICS])

    def _done(self, kind: str, arg: Any, result: Any) -> None:
        """Book a call that went through (or that MLflow refused: it is dropped alike)."""
        if kind == "connect":
            self.client = result
        elif kind == "setup":
            self.run_id = result
            self.settled.set()
        elif kind == "spill":
            self.backlog.spill_written(*arg)
        elif kind == "call":
            self.ops.popleft()

    def _failed(self, kind: str, arg: Any, e: Exception) -> bool:
        """Book a failed attempt; True if MLflow seems away (retry after a pause)."""
        if refused(e):
            if kind in ("connect", "setup"):  # no run to write to: tracking is off
                with self._cv:
                    self.fatal = e if kind == "connect" else None
                    self._stopped = True
                if kind == "setup":
                    log.warning("MLflow at %s refused the run (%s); training goes on without MLflow tracking",
                                redact(self.uri), _why(e, self.uri))
            else:
                with self._cv:
                    self._done(kind, arg, None)
                log.warning("MLflow at %s refused a call, dropped (%s)", redact(self.uri), _why(e, self.uri))
            self.settled.set()
            return False
        if kind == "rounds":
            with self._cv:
                self.backlog.put_back(arg)
        if not self._away:
            self._away = True
            log.warning("MLflow at %s does not answer (%s); training goes on, its metrics wait in a queue "
                        "(metrics.jsonl has every round) and are written when it answers",
                        redact(self.uri), _why(e, self.uri))
        if kind in ("connect", "setup"):
            self.settled.set()
        return True
