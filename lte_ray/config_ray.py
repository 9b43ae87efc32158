"""The Ray section of the config: how a run sits on a Ray cluster (`--backend ray`), in a file of
its own to keep `config.py` short, with `Section`, the base every section of `lte_ray.config`
shares (it refuses unknown keys)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    # Unknown keys are typos, not extensions: refuse them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    """How the run sits on a Ray cluster (`--backend ray`)."""

    address: str | None = None  # None: RAY_ADDRESS if set, else start a local cluster on 127.0.0.1
    namespace: str = "lte-ray"
    run_name: str | None = None  # the coordinator's actor name (default: the output folder's name)
    cpus_per_head: float = Field(1.0, gt=0)
    gpus_per_head: float = Field(0.0, ge=0)  # fractional: 0.25 puts four heads on one GPU
    coordinator_gpus: float = Field(0.0, ge=0)  # merge, quantize, evaluation; the coordinator goes where GPUs are
    # CPUs reserved for it, and its torch threads (at least 1). 0: none reserved, so it fits on a
    # head node that offers no CPUs (cluster/kuberay), and uses one thread.
    coordinator_cpus: float = Field(0.0, ge=0)
    min_heads: int = Field(1, ge=1)  # quorum: a round merges if at least this many heads reported
    max_heads: int | None = Field(None, ge=1)  # cap on heads incl. joiners (default: twice lte.heads, `head_cap`)
    round_timeout_s: float = Field(600.0, gt=0)  # the hard deadline: later results are discarded (staleness 0)
    # Once min_heads results are in and half the heads arrived, wait at most this x their median
    # arrival time (+0.5 s; a head's first round is waited for), then merge without the rest.
    # None: wait for every head, up to round_timeout_s.
    straggler_grace: float | None = Field(2.0, ge=1)
    # a head late this many rounds in a row (a round it sits out, still busy with a late task, counts) is replaced
    max_late_rounds: int = Field(3, ge=1)
    # a head whose uploads were rejected this many rounds in a row is replaced (a joiner: dropped)
    max_rejected_rounds: int = Field(3, ge=1)
    max_start_failures: int = Field(3, ge=0)  # heads that fail to start mid-run before no more are tried
    # heads started ahead of need, warm, each taking a lost head's place at the next round (each
    # reserves a head's CPUs and GPU share)
    spare_heads: int = Field(0, ge=0)
    start_grace_s: float = Field(30.0, ge=0)  # at start, how long to wait for heads beyond the quorum
    checkpoint_every: int = Field(1, ge=1)  # rounds
    max_delta_ratio: float | None = Field(5.0, gt=0)  # bound a head's |D|_F by ratio * |W|_F
    # ... and a head's whole delta by ratio x the median head's (this round's and the last rounds'
    # accepted heads); a young head (new to the run) over it is clipped to the median, not refused
    # (`core.robust`). None: off. Settled honest heads of the default digits run reached 3.6x.
    max_median_ratio: float | None = Field(8.0, gt=1)
    outliers: Literal["reject", "clip"] = "reject"  # a head over a bound: left out, or clipped to it
    max_coordinator_restarts: int = Field(3, ge=0)  # the driver restarts a dead coordinator from its checkpoint
    max_failed_rounds: int = Field(10, ge=1)  # rounds in a row without quorum before giving up
