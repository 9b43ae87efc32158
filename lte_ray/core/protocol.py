"""The messages between LTE's components, typed, in one place so that every hop reads the same.

Down, coordinator -> head, once per round: `Broadcast`. Up, head -> coordinator: `HeadResult`,
whose `FactorUpload` carries the head's LoRA factors (`core.upload` encodes and decodes it).
Per merged round: `RoundRecord` (progress bar, metrics.jsonl, MLflow, Tune). At the end:
`RunResult`, with the run's history and counters. The in-process simulator, the Ray runtime and
the benchmarks all pass these. Inside they hold plain CPU tensors, numbers and strings, so they
cross Ray's object store (pickle) unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Literal

import torch

from lte_ray.config import Upload as Encoding  # how a head uploads its factors

Task = Literal["classify", "lm"]  # what the data asks of a model: image classes, or the next token
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # main-weight key -> (U, V); the delta is U @ V


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors)


@dataclass
class QuantizedWeights:
    """Main weights quantized together (`core.quant`): one flat buffer in which every tensor
    starts on a block boundary, so no block straddles two tensors."""

    method: str  # "int8" | "nf4"
    keys: list[str]
    shapes: list[list[int]]
    codes: torch.Tensor  # int8 codes, or NF4 codes two to a byte
    stats: dict[str, torch.Tensor]  # int8: {"absmax"}; nf4: bitsandbytes' QuantState.as_dict(packed=True)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + _nbytes(self.stats.values())


@dataclass
class Broadcast:
    """Down: the merged weights every head starts its round from."""

    plain: dict[str, torch.Tensor]  # fp32: replica parameters, and the main weights when not quantized
    quantized: QuantizedWeights | None = None  # the main weights, when quantized
    # Carries the whole shared state. Frozen replica parameters never change, so they travel only
    # in a head's first broadcast; the others of a round leave them out (full=False).
    full: bool = True

    @property
    def nbytes(self) -> int:
        return _nbytes(self.plain.values()) + (self.quantized.nbytes if self.quantized else 0)


@dataclass
class Encoded:
    """One tensor as a head uploads it: fp32 as it is, bf16, or int8 codes with one fp32 absmax
    per block of 64 (`core.quant`'s int8)."""

    encoding: Encoding
    shape: list[int]
    data: torch.Tensor
    absmax: torch.Tensor | None = None  # int8 only

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.absmax.nbytes if self.absmax is not None else 0)


@dataclass
class FactorUpload:
    """Up: a head's LoRA factors (B, A) per main-weight key after its round.

    The coordinator keeps every head's factors as of its last accepted upload. When it holds the
    ones this head started the round from (`base_round`), B and A travel at rank r: as they are
    in fp32, or as their change since then (`relative`) in bf16 or int8. Otherwise (a head's
    first round, or after a missed one) the round's starting factors travel too, in fp32
    (`b_prev`, `a_prev`). In reset mode a round starts from fresh factors: B and A only."""

    encoding: Encoding
    base_round: int | None  # the round whose accepted factors this upload builds on
    relative: bool  # b and a are changes since base_round's factors
    b: dict[str, Encoded]
    a: dict[str, Encoded]
    b_prev: dict[str, torch.Tensor] = field(default_factory=dict)
    a_prev: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return (sum(e.nbytes for e in (*self.b.values(), *self.a.values()))
                + _nbytes(self.b_prev.values()) + _nbytes(self.a_prev.values()))


@dataclass
class HeadResult:
    """Up: what one head sends after its round, its factors and what it trained locally."""

    head_id: int
    round: int
    upload: FactorUpload
    replicas: dict[str, torch.Tensor] = field(default_factory=dict)  # averaged replica parameters
    loss: float = float("nan")  # mean training loss over the round's steps
    samples: int = 0
    seconds: float = 0.0  # receive + local steps

    @property
    def nbytes(self) -> int:
        return self.upload.nbytes + _nbytes(self.replicas.values())


@dataclass
class RoundRecord:
    """One merged round, as the driver sees it. A measurement a backend does not make (no
    checkpoints in-process, no traffic for a full-rank worker) stays None and is left out."""

    round: int  # rounds done, 1-based
    rounds: int  # rounds planned
    samples_seen: int
    train_loss: float  # mean over the merged heads of their mean training loss
    head_losses: dict[int, float]
    active_heads: int  # heads whose results were merged
    elapsed: float  # seconds since the run started (continued across a resume)
    evals: dict[str, float] = field(default_factory=dict)  # eval_* metrics, on evaluation rounds
    bytes_up: int | None = None
    bytes_down: int | None = None
    heads_rejected: int | None = None
    round_seconds: float | None = None  # on Ray: the round's critical path, from quantize to merged
    head_seconds: float | None = None  # the slowest merged head's
    quantize_seconds: float | None = None
    collect_seconds: float | None = None  # receiving and checking the heads' results
    merge_seconds: float | None = None  # decoding the uploads, bounding their norms, the merge
    # On Ray these two run in the background, overlapping the next round (not in round_seconds).
    evaluation_seconds: float | None = None
    checkpoint_seconds: float | None = None

    def _measured(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "evals" and getattr(self, f.name) is not None}

    def as_dict(self) -> dict[str, Any]:
        """Every field, nested as here (for a checkpoint's metadata; `from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundRecord":
        """A record as `as_dict` wrote it, after a trip through JSON (head ids became strings)."""
        return cls(**{**data, "head_losses": {int(k): v for k, v in data["head_losses"].items()}})

    def to_json(self) -> dict[str, Any]:
        """Flat, as metrics.jsonl holds it: the eval metrics at the top level, head ids as strings."""
        out = self._measured()
        out["head_losses"] = {str(k): v for k, v in self.head_losses.items()}
        return {**out, **self.evals}

    def metrics(self) -> dict[str, float]:
        """The numbers MLflow and Tune get: what was measured this round, and each head's loss."""
        skip = ("round", "rounds", "elapsed", "head_losses")
        out = {k: float(v) for k, v in self._measured().items() if k not in skip}
        out.update(self.evals)
        out.update({f"train_loss_head_{h}": v for h, v in self.head_losses.items()})
        return out


@dataclass
class RunCounters:
    """What crossed the wire and what happened to heads, over a whole run."""

    bytes_up: int = 0
    bytes_down: int = 0
    heads_joined: int = 0
    heads_lost: int = 0
    heads_rejected: int = 0
    late_results: int = 0
    heads_clipped: int = 0  # results merged with an update clipped to the robust bound
    heads_reset: int = 0  # heads told to restart from fresh factors after a rejected upload
    heads_replaced_late: int = 0  # heads late `ray.max_late_rounds` rounds in a row, replaced
    heads_replaced_rejected: int = 0  # heads rejected `ray.max_rejected_rounds` rounds in a row, replaced or dropped
    start_failures: int = 0  # heads that could not start once the run had begun
    coordinator_restarts: int = 0  # the driver restarted a dead coordinator from its checkpoint


@dataclass
class RunResult:
    """A finished run: final metrics, the merged weights, and how it got there."""

    method: str
    task: Task
    rounds: int
    heads: int
    samples_seen: int
    wall_seconds: float
    final: dict[str, float]  # the last evaluation
    history: list[RoundRecord] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the final merged weights
    counters: RunCounters | None = None  # None: a run without heads (nothing to send, nobody to lose)

    def summary(self) -> dict[str, Any]:
        """The run's numbers, as summary.json starts."""
        return {"method": self.method, "task": self.task, **self.final, "rounds": self.rounds,
                "samples_seen": self.samples_seen, "heads": self.heads, "wall_seconds": round(self.wall_seconds, 3),
                **(asdict(self.counters) if self.counters else {})}
