"""What `lte-ray bench chaos` breaks, and the stage it breaks it on: a Ray cluster of several
raylets on 127.0.0.1 (`ray.cluster_utils.Cluster`, so a node can be killed and its heads with
it), a real MLflow server that can be stopped and started again, and `Faults`, which injects the
faults of a schedule into a running run as its coordinator reaches their rounds and writes down
what it did."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster
from ray.exceptions import RayError

from lte_ray.core.protocol import RoundRecord

# A dead raylet is noticed in about 3 s instead of 15 (Ray's default health checks: 5 x 3 s).
FAST_HEALTH = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
NODE_CPUS = 2  # logical CPUs per node: with 1 CPU per head, each node fits two heads


def ensure_auth_token() -> None:
    """With token auth on, make sure a token exists before raylets start: `ray.init` creates
    ~/.ray/auth_token for a new local cluster, `cluster_utils.Cluster` does not, and its GCS then
    dies at start (on a fresh machine `bench chaos` failed so). Ray's own CLI makes it, as
    cluster/local.sh does; an existing token, in the environment or the file, is left alone."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    old_mask = os.umask(0o077)  # the token is a secret: readable by this user only
    try:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       check=True, stdout=subprocess.DEVNULL)
    finally:
        os.umask(old_mask)


def loopback_cluster(nodes: int) -> tuple[Cluster, list[Any]]:
    """A cluster of `nodes` raylets on 127.0.0.1 (the first is the head node: driver, coordinator,
    and heads too). Returns it and its worker nodes (the ones that may be killed). Ray must have
    been imported with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and RAY_AUTH_MODE=token (`bench.cli`)."""
    ensure_auth_token()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "_system_config": FAST_HEALTH})
    workers = [cluster.add_node(num_cpus=NODE_CPUS) for _ in range(nodes - 1)]
    return cluster, workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1, in a subprocess, stopped and started again on the same port
    and store (an outage the tracker must ride out)."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--default-artifact-root", str(self.folder / "artifacts")]
        with open(self.folder / "server.log", "ab") as log:  # the server keeps its own copy of the handle
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited (see {self.folder / 'server.log'})")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer in {timeout:.0f} s (see {self.folder / 'server.log'})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers: nothing answers any more
            self.proc.wait()
        self.proc = None


@dataclass
class Schedule:
    """Rounds (1-based: the coordinator has merged this many) at which each fault is injected; None: never."""

    slow_from: int | None = None  # one head `slow_factor` x slower from this round
    poison_from: int | None = None  # one head poisoning every upload from this round
    head_kills: tuple[int, ...] = ()  # SIGKILL of a head's process
    node_kill: int | None = None
    coordinator_kill: int | None = None
    tracking_down: tuple[int, int] | None = None  # MLflow stopped at the first round, started at the second
    slow_factor: float = 10.0


def chaos_schedule(rounds: int) -> Schedule:
    """Every fault of the chaos scenario, spread over a run of `rounds` rounds."""
    at = lambda frac: max(2, round(rounds * frac))  # noqa: E731
    return Schedule(slow_from=2, poison_from=2, head_kills=tuple(sorted({at(f) for f in (0.15, 0.45, 0.75, 0.9)})),
                    node_kill=at(0.3), coordinator_kill=at(0.6), tracking_down=(at(0.2), at(0.4)))


@dataclass
class Faults:
    """Injects `schedule` into the run `run_name` from a thread that follows the coordinator's
    round (not the driver's records, which may lag behind), and records what it did. Also a
    per-round sink: `shown` is every round the driver showed, in order."""

    schedule: Schedule
    run_name: str
    output: str
    cluster: Cluster
    workers: list[Any] = field(default_factory=list)  # nodes that may be killed
    mlflow: MlflowServer | None = None
    shown: list[int] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    slow: int | None = None
    poisoner: int | None = None
    redone: int = 0
    tracking_down_s: float = 0.0
    _down_since: float | None = None
    _done_upto: int = 0  # faults of rounds up to this one are injected
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _restart: threading.Thread | None = None  # the MLflow server starting again

    def __call__(self, rec: RoundRecord) -> None:
        self.shown.append(rec.round)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="chaos-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop injecting; returns once a restarting MLflow server answers (the run's last points go there)."""
        self._stop.set()
        for thread in (self._thread, self._restart):
            if thread is not None:
                thread.join()

    def _coordinator(self) -> Any:
        return ray.get_actor(self.run_name, namespace="lte-ray")

    def _follow(self) -> None:
        while not self._stop.wait(0.1):
            try:
                merged = ray.get(self._coordinator().status.remote(), timeout=10)["round"]
            except (ValueError, RayError):  # not started yet, or being restarted
                continue
            for r in range(self._done_upto + 1, merged + 1):  # a restarted coordinator redoes rounds: not again
                if self._stop.is_set():
                    return
                self._inject(r)
                self._done_upto = r

    def _inject(self, r: int) -> None:
        s = self.schedule
        if s.tracking_down and self.mlflow is not None:
            self._tracking(r, *s.tracking_down)
        steps = [
            (self._due(s.slow_from, r, self.slow) or self._due(s.poison_from, r, self.poisoner), self._slow_and_poison),
            (r in s.head_kills, self._kill_head),
            (r == s.node_kill and bool(self.workers), self._kill_node),
            (r == s.coordinator_kill, self._kill_coordinator),
        ]
        for due, step in steps:
            if not due:
                continue
            try:
                step(r)
            except (ValueError, RayError) as e:  # no coordinator to ask (it is being restarted): skipped
                self.log.append(f"round {r}: {step.__name__.strip('_')} skipped ({type(e).__name__})")

    def _tracking(self, r: int, down: int, up: int) -> None:
        if r == down:
            self.mlflow.stop()
            self._down_since = time.monotonic()
            self.log.append(f"round {r}: MLflow server stopped")
        elif r == up and self._down_since is not None:
            # In the background: on a busy machine the server takes tens of seconds to answer, and
            # the faults due meanwhile must not wait for it.
            self._restart = threading.Thread(target=self._start_mlflow, args=(r,), name="chaos-mlflow", daemon=True)
            self._restart.start()

    def _start_mlflow(self, r: int) -> None:
        self.mlflow.start()
        self.tracking_down_s = time.monotonic() - self._down_since
        self.log.append(f"round {r}: MLflow server started again (down {self.tracking_down_s:.0f} s in all)")

    @staticmethod
    def _due(start: int | None, r: int, picked: int | None) -> bool:
        return start is not None and r >= start and picked is None

    def _infos(self) -> dict[int, dict[str, Any]]:
        return ray.get(self._coordinator().workers.remote())

    def _slow_and_poison(self, r: int) -> None:
        """One head slowed, one poisoning (once, and again with the new heads of a new coordinator;
        a straggler's replacement is a new head on other hardware, and not slowed)."""
        handles = ray.get(self._coordinator().worker_handles.remote())
        killable = {n.node_id for n in self.workers}
        infos = self._infos()
        # Heads on the head node first: they outlive the node kill, so the faults stay in the run.
        steady = sorted(infos, key=lambda h: (infos[h]["node_id"] in killable, h))
        s = self.schedule
        if self._due(s.slow_from, r, self.slow) and steady:
            self.slow = steady[0]
            ray.get(handles[self.slow].slow_down.remote(self.schedule.slow_factor))
            self.log.append(f"round {r}: head {self.slow} made {self.schedule.slow_factor:g}x slower")
        if self._due(s.poison_from, r, self.poisoner) and len(steady) > 1:
            self.poisoner = steady[1]
            ray.get(handles[self.poisoner].corrupt_next.remote("poison", every_round=True))
            self.log.append(f"round {r}: head {self.poisoner} poisons every upload (B x -10)")

    def _kill_head(self, r: int) -> None:
        honest = {h: i for h, i in self._infos().items() if h not in (self.slow, self.poisoner)}
        for victim in sorted(honest, reverse=True):  # the newest first
            try:
                os.kill(honest[victim]["pid"], signal.SIGKILL)  # loopback: every head is a process of this machine
            except ProcessLookupError:  # already dead (its node was killed), not yet noticed
                continue
            self.log.append(f"round {r}: head {victim} SIGKILLed")
            return

    def _kill_node(self, r: int) -> None:
        infos = self._infos()
        node = max(self.workers, key=lambda n: sum(i["node_id"] == n.node_id for i in infos.values()))
        heads = sorted(h for h, i in infos.items() if i["node_id"] == node.node_id)
        self.cluster.remove_node(node, allow_graceful=False)  # its raylet and workers, SIGKILLed
        self.workers.remove(node)
        self.log.append(f"round {r}: node {node.node_id[:8]} killed with heads {heads}")

    def _kill_coordinator(self, r: int) -> None:
        coord = self._coordinator()
        merged = ray.get(coord.status.remote())["round"]
        ray.kill(coord, no_restart=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it is dead: then its checkpoint is final
            try:
                ray.get(coord.status.remote(), timeout=5)
                time.sleep(0.2)
            except RayError:
                break
        from lte_ray.runtime.launch import checkpoint_round

        self.redone += merged - checkpoint_round(self.output)
        self.slow = self.poisoner = None  # the new coordinator starts new heads: slow one and poison one again
        self.log.append(f"round {r}: coordinator killed with {merged} rounds merged, "
                        f"{checkpoint_round(self.output)} in its checkpoint")
