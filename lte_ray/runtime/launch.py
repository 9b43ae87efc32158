"""The driver behind `lte-ray train --backend ray` and `lte-ray join`.

It connects to a cluster (`--address` / `ray.address` / RAY_ADDRESS, else it starts a local one
on 127.0.0.1), starts the coordinator as a named actor, streams the coordinator's per-round
records to the caller, and returns the result. Killing the coordinator also ends the head actors
it spawned (Ray ties an actor's fate to its owner).

Where the coordinator runs: on the driver's node (so checkpoints land in the driver's output
folder), unless it asks for GPUs (`ray.coordinator_gpus`): then wherever they are, and the output
folder must be on storage that node sees too; the coordinator checks a token the driver wrote
there and stops with a one-line error if it cannot read it. In a Tune trial it shares bundle 0
with the trial's own process, or takes bundle 1 when it reserves CPUs or GPUs.

Supervision: if the coordinator's process dies (node lost, OOM, killed), the driver starts a new
one from the newest readable checkpoint (`ray.max_coordinator_restarts` times); it spawns new
heads, and the records it replays from the checkpoint fill any round the driver had not shown, so
every merged round is shown exactly once (MLflow never gets a step twice). A dead driver is what
`--resume` is for. Joining needs the run's secret, which the driver writes to OUTPUT/join-secret
(mode 600) and keeps across resumes.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from lte_ray.checkpoint import checkpoint_meta
from lte_ray.config import Config
from lte_ray.core.history import RoundCallback
from lte_ray.core.methods import get_method
from lte_ray.core.protocol import RoundRecord, RunResult
from lte_ray.errors import UserError
from lte_ray.redact import redact, scrub
from lte_ray.runtime.coordinator import Coordinator
from lte_ray.runtime.where import sign_output
from lte_ray.runtime.worker import head_actor

POLL_S = 0.5
JOIN_SECRET = "join-secret"  # in the output folder; `lte-ray join --secret-file` reads it
log = logging.getLogger("lte_ray.launch")


def connect(cfg: Config, address: str | None = None) -> bool:
    """Make sure this process is a Ray driver; True if it started a local cluster itself."""
    if ray.is_initialized():
        return False
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, namespace=cfg.ray.namespace)
        except (ConnectionError, RuntimeError, ValueError) as e:
            # A Ray Client address may carry credentials (ray://user:token@host): never printed.
            raise UserError(f"ray.address: cannot connect to Ray at {redact(address)!r}: {scrub(str(e), address)}") \
                from None
        return False
    # A local cluster for this run, with enough logical CPUs for every head and spare. (`lte-ray train`
    # sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported so it binds to 127.0.0.1.)
    heads = cfg.lte.heads + cfg.ray.spare_heads
    cpus = max(os.cpu_count() or 1, math.ceil(heads * cfg.ray.cpus_per_head + cfg.ray.coordinator_cpus))
    ray.init(address="local", num_cpus=cpus, namespace=cfg.ray.namespace, include_dashboard=False)
    return True


def _take_gpu(free: list[float], want: float) -> bool:
    """Place one actor's GPU request as Ray does: a fraction on one GPU, a whole number on whole GPUs."""
    if want >= 1:
        whole = [i for i, f in enumerate(free) if f >= 1 - 1e-9][:round(want)]
        if len(whole) < round(want):
            return False
        for i in whole:
            free[i] = 0.0
        return True
    slot = next((i for i, f in enumerate(free) if f + 1e-9 >= want), None)
    if slot is not None:
        free[slot] -= want
    return slot is not None


def _check_local_gpus(cfg: Config) -> None:
    """A cluster this run started has only this machine's GPUs, and nothing will add more: a request
    that cannot be placed would wait forever, or leave heads pending without a word. (A cluster
    given by address may autoscale: not checked.)"""
    have = ray.cluster_resources().get("GPU", 0.0)
    coordinator, per_head, heads = cfg.ray.coordinator_gpus, cfg.ray.gpus_per_head, cfg.lte.heads + cfg.ray.spare_heads
    for key, want in (("ray.gpus_per_head", per_head), ("ray.coordinator_gpus", coordinator)):
        if want > have:
            raise UserError(f"{key}: {want:g} GPU asked for, but the local Ray cluster has {have:g} GPU"
                            + ("" if have else " (Ray found none on this machine)") + f"; set {key} lower, "
                            "or give ray.address of a cluster with GPUs")
    free = [1.0] * int(have)
    if coordinator and not _take_gpu(free, coordinator):
        raise UserError(f"ray.coordinator_gpus: {coordinator:g} GPU does not fit on one of this machine's GPUs")
    fit = sum(_take_gpu(free, per_head) for _ in range(heads)) if per_head else heads
    if fit < heads:
        beside = f" beside the coordinator's {coordinator:g}" if coordinator else ""
        spares = f" (spares included: ray.spare_heads={cfg.ray.spare_heads})" if cfg.ray.spare_heads else ""
        raise UserError(f"ray.gpus_per_head: {heads} heads{spares} at {per_head:g} GPU{beside} do not fit on this "
                        f"machine's {have:g} GPU (Ray counts fractions per GPU; {fit} fit); lower "
                        f"ray.gpus_per_head or lte.heads{' or ray.spare_heads' if spares else ''}")


def coordinator_bundle(cfg: Config) -> int:
    """The coordinator's bundle in a Tune trial's placement group: its own (1) when it reserves
    anything, else the trial's (0)."""
    return 1 if cfg.ray.coordinator_cpus or cfg.ray.coordinator_gpus else 0


def _unwrap(e: RayTaskError) -> BaseException:
    """A user mistake raised inside an actor comes back as the one-line error it is."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, UserError) else e


def _named_actor_exists(name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False


def train(cfg: Config, *, run_name: str, output_dir: str, on_round: RoundCallback | None = None,
          mlflow_run_id: str | None = None, resume: bool = False, address: str | None = None,
          placement_group: Any = None, shown_upto: int | None = None) -> RunResult:
    """Run `cfg` (a resolved config) on Ray. With `placement_group` (a Tune trial's), the
    coordinator takes its first bundle and every head is scheduled inside it. A coordinator that
    dies is restarted from its checkpoint, up to `ray.max_coordinator_restarts` times; rounds the
    caller has seen are not shown again. `shown_upto`: with `resume`, the last round the caller
    has (default: the checkpoint's); later ones the checkpoint carries are shown."""
    run_cfg = get_method(cfg.method).lte_config(cfg)  # the LoRA baselines are LTE special cases (one head)
    started_local = connect(cfg, address)
    output = os.path.abspath(output_dir)
    # the caller has every round up to this one
    shown = {"round": (checkpoint_round(output) if shown_upto is None else shown_upto) if resume else 0}

    def show_new(rec: RoundRecord) -> None:
        if rec.round > shown["round"]:
            shown["round"] = rec.round
            if on_round:
                on_round(rec)

    try:
        if started_local:
            _check_local_gpus(run_cfg)
        if _named_actor_exists(run_name, cfg.ray.namespace):
            raise UserError(f"ray.run_name: a run named {run_name!r} is already running in namespace "
                            f"{cfg.ray.namespace!r}")
        secret = join_secret(output, resume)
        restarts = 0
        while True:
            coord = _start_coordinator(run_cfg, run_name, output, mlflow_run_id, resume, placement_group, secret,
                                       restarts)
            try:
                return _follow(coord, show_new)
            except RayActorError as e:  # the coordinator's process died (not an error raised by it)
                _stop(coord, run_name, cfg.ray.namespace)
                if restarts >= cfg.ray.max_coordinator_restarts:
                    raise RuntimeError(f"the coordinator of {run_name!r} died {restarts + 1} times "
                                       f"(ray.max_coordinator_restarts={cfg.ray.max_coordinator_restarts}): {e}") from e
                restarts += 1
                resume = checkpoint_round(output) > 0
                log.warning("the coordinator of %r died; restarting it (%d of %d) from %s", run_name, restarts,
                            cfg.ray.max_coordinator_restarts,
                            f"its checkpoint of round {checkpoint_round(output)}" if resume else "the start")
            except BaseException:
                _stop(coord, run_name, cfg.ray.namespace)
                raise
    except RayTaskError as e:
        raise _unwrap(e) from None
    finally:
        if started_local:
            ray.shutdown()


def checkpoint_round(output: str) -> int:
    """The round of the newest readable checkpoint in `output`, 0 if none."""
    try:
        meta = checkpoint_meta(output)
    except UserError:  # checkpoints there, none readable: start over
        return 0
    return meta["round"] if meta else 0


def join_secret(output: str, resume: bool) -> str:
    """The run's join secret: kept across a resume, else new; in OUTPUT/join-secret, readable by its owner only."""
    path = os.path.join(output, JOIN_SECRET)
    if resume and os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    os.makedirs(output, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return secret


def _start_coordinator(cfg: Config, run_name: str, output: str, mlflow_run_id: str | None, resume: bool,
                       placement_group: Any, secret: str, restarts: int) -> Any:
    if placement_group is not None:  # its own bundle (see `tune.trial_resources`)
        where = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=coordinator_bundle(cfg))
    elif cfg.ray.coordinator_gpus > 0:  # wherever the GPUs are (the head node may have none)
        where = "DEFAULT"
    else:  # on this node, so checkpoints land in this output folder
        where = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    # Off the driver's node the coordinator must prove it sees the output folder.
    token = None if isinstance(where, NodeAffinitySchedulingStrategy) else sign_output(output)
    own_bundle = placement_group is None or coordinator_bundle(cfg) > 0
    return ray.remote(Coordinator).options(
        name=run_name, namespace=cfg.ray.namespace, max_concurrency=8, max_restarts=0, scheduling_strategy=where,
        num_cpus=cfg.ray.coordinator_cpus if own_bundle else 0, num_gpus=cfg.ray.coordinator_gpus if own_bundle else 0,
    ).remote(cfg, run_name, output, mlflow_run_id, resume, placement_group, token, secret, restarts)


def _follow(coord: Any, show: Callable[[RoundRecord], None]) -> RunResult:
    """Run the coordinator's rounds, showing its records as they come; its result."""
    run_ref = coord.run.remote()
    seen = 0
    while True:
        finished = bool(ray.wait([run_ref], timeout=POLL_S)[0])
        for rec in ray.get(coord.records_since.remote(seen)):
            seen += 1
            show(rec)
        if finished:
            return ray.get(run_ref)


def _stop(coord: Any, run_name: str, namespace: str) -> None:
    """Kill the coordinator (its heads go with it) and wait until its name is free again."""
    ray.kill(coord)
    deadline = time.monotonic() + 60
    while _named_actor_exists(run_name, namespace) and time.monotonic() < deadline:
        time.sleep(0.2)


def join(run_name: str, *, secret: str, address: str | None = None, namespace: str = "lte-ray", wait: bool = True,
         on_status: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Add one head, hosted by this process, to a running run; `secret` is the run's join secret
    (OUTPUT/join-secret). With `wait`, stay until the run ends (the head's actor belongs to this
    process: leaving withdraws the head)."""
    if not ray.is_initialized():
        try:
            ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=namespace)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--address: cannot connect to Ray at {address or 'auto'!r}: {e}") from None
    try:
        coord = ray.get_actor(run_name, namespace=namespace)
    except ValueError:
        raise UserError(f"--run: no run named {run_name!r} is running in namespace {namespace!r}") from None
    cfg: Config = ray.get(coord.config.remote())
    head_id = ray.get(coord.join_ticket.remote(secret))
    if isinstance(head_id, str):
        raise UserError(f"--run: {run_name!r} did not take the head: {head_id}")
    here = ray.get_runtime_context().get_node_id()
    handle = head_actor(cfg, head_id, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True))
    try:  # a head that cannot start here (no data on this node, say) is this command's error, not the run's
        ray.get(handle.info.remote())
    except RayTaskError as e:
        ray.kill(handle)
        raise UserError(f"the head cannot start here: {_unwrap(e)}") from None
    refused = ray.get(coord.add_worker.remote(head_id, handle, secret))
    if refused:
        ray.kill(handle)
        raise UserError(f"--run: {run_name!r} did not take the head: {refused}")
    status: dict[str, Any] = {"head_id": head_id, "done": False}
    while wait:
        try:
            status = {"head_id": head_id, **ray.get(coord.status.remote())}
        except RayActorError:  # the driver ended the run and its coordinator
            status = {"head_id": head_id, "done": True}
        if on_status:
            on_status(status)
        if status["done"]:
            break
        time.sleep(2 * POLL_S)
    return status
