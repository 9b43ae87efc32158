"""A head's factors on the way up: the head encodes them after its round (`export`), the
coordinator checks and reads them back (`problem`, `FactorStore`).

A reset-less head's delta is s (B A - B' A'), with (B', A') its factors at the start of the
round. The coordinator keeps every head's factors as of its last accepted upload, so a head whose
(B', A') it holds sends only (B, A): rank r, not the rank-2r pair of products. In bf16 or int8 a
head sends the *change* (B - B', A - A'), never B A and B' A' (the delta is small against both,
so their rounding errors would swamp it: ~14% error in bf16), and then sets its own factors to
exactly B' + decode(encode(B - B')), the values the coordinator reconstructs: the two never drift.
In reset mode a round starts from fresh factors, so B and A travel as they are, in the encoding.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lte_ray.core import quant
from lte_ray.core.lora import LTELinear, delta_uv
from lte_ray.core.protocol import Encoded, Encoding, Factors, FactorUpload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
Pair = tuple[torch.Tensor, torch.Tensor]  # (B, A) of one layer, fp32 on the CPU


def encode(t: torch.Tensor, encoding: Encoding) -> Encoded:
    t = t.detach().float().cpu()
    if encoding == "int8":
        codes, absmax = quant.int8_encode(t)
        return Encoded("int8", list(t.shape), codes, absmax)
    return Encoded(encoding, list(t.shape), t.to(DTYPES[encoding]).contiguous().clone())


def decode(e: Encoded) -> torch.Tensor:
    """fp32 on the CPU, the same values on every machine (exact conversions, one rounding per op)."""
    if e.encoding == "int8":
        return quant.int8_decode(e.data, e.absmax, e.shape)
    return e.data.float()


@torch.no_grad()
def export(layers: dict[str, LTELinear], encoding: Encoding, base_round: int | None) -> FactorUpload:
    """The upload of a head whose layers (by main-weight key) finished a round. `base_round`: the
    round whose factors the coordinator holds for this head and the head started from, or None.
    A lossy relative upload snaps the head's factors to what the coordinator will decode."""
    resetless = all(layer.resetless for layer in layers.values())
    if resetless and base_round is None:  # the coordinator lacks (B', A'): everything, exactly
        return FactorUpload("fp32", None, False,
                            {k: encode(x.lora_B, "fp32") for k, x in layers.items()},
                            {k: encode(x.lora_A, "fp32") for k, x in layers.items()},
                            {k: x.lora_B_prev.detach().cpu().clone() for k, x in layers.items()},
                            {k: x.lora_A_prev.detach().cpu().clone() for k, x in layers.items()})
    if not resetless or encoding == "fp32":  # rank r as they are (fp32: the change would be no smaller)
        return FactorUpload(encoding, base_round if resetless else None, False,
                            {k: encode(x.lora_B, encoding) for k, x in layers.items()},
                            {k: encode(x.lora_A, encoding) for k, x in layers.items()})
    b, a = {}, {}
    for key, layer in layers.items():
        for param, prev, out in ((layer.lora_B, layer.lora_B_prev, b), (layer.lora_A, layer.lora_A_prev, a)):
            start = prev.detach().cpu()
            out[key] = encode(param.detach().cpu() - start, encoding)
            param.copy_(start + decode(out[key]))  # snap: the head now holds what the coordinator will
    return FactorUpload(encoding, base_round, True, b, a)


def problem(upload: Any, shapes: dict[str, tuple[int, int]], rank: int, resetless: bool,
            base_round: int | None) -> str | None:
    """Why `upload` cannot be read (wrong type, keys, encodings, dtypes, shapes or base round,
    NaN/Inf), or None. `shapes`: main-weight key -> (d_out, d_in); `base_round`: the round of the
    factors the coordinator holds for this head."""
    if not isinstance(upload, FactorUpload):
        return f"upload is a {type(upload).__name__}, not a FactorUpload"
    if not all(isinstance(d, dict) for d in (upload.b, upload.a, upload.b_prev, upload.a_prev)):
        return "its factors are not dicts of tensors"
    if not isinstance(upload.encoding, str) or upload.encoding not in DTYPES:
        return f"unknown encoding {upload.encoding!r}"
    if set(upload.b) != set(shapes) or set(upload.a) != set(shapes):
        return f"factors for {len(upload.b)} layers, expected {len(shapes)}"
    full = resetless and upload.base_round is None
    if resetless and not full and upload.base_round != base_round:
        return f"built on round {upload.base_round}'s factors; the coordinator holds round {base_round}'s"
    if upload.relative and (not resetless or full):
        return "a change of the factors, but the coordinator holds none to add it to"
    if full and (set(upload.b_prev) != set(shapes) or set(upload.a_prev) != set(shapes)):
        return "a first or catch-up upload must carry the round's starting factors"
    if not full and (upload.b_prev or upload.a_prev):
        return "starting factors the coordinator already holds"
    for key, (d_out, d_in) in shapes.items():
        for name, e, shape in (("B", upload.b[key], [d_out, rank]), ("A", upload.a[key], [rank, d_in])):
            why = _encoded_problem(e, shape, "fp32" if full else upload.encoding)
            if why:
                return f"{key} {name}: {why}"
        if full:
            for name, t, shape in (("B'", upload.b_prev[key], (d_out, rank)), ("A'", upload.a_prev[key], (rank, d_in))):
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
                    return f"{key} {name}: expected an fp32 tensor {shape}"
                if not torch.isfinite(t).all():
                    return f"{key} {name}: holds NaN or Inf"
    return None


def _encoded_problem(e: Any, shape: list[int], encoding: str) -> str | None:
    dims = 1 if encoding == "int8" else 2  # int8 codes travel flat, padded to whole blocks
    if not isinstance(e, Encoded) or not isinstance(e.data, torch.Tensor) or e.data.dim() != dims \
            or not isinstance(e.shape, (list, tuple)):
        return "not an encoded tensor"
    if e.encoding != encoding or list(e.shape) != shape:
        return f"{e.encoding} {list(e.shape)}, expected {encoding} {shape}"
    n = math.prod(shape)
    if encoding == "int8":
        blocks = -(-n // quant.BLOCK)
        ok = (e.data.dtype == torch.int8 and e.data.numel() == blocks * quant.BLOCK
              and isinstance(e.absmax, torch.Tensor) and e.absmax.dtype == torch.float32
              and list(e.absmax.shape) == [blocks])
        values = e.absmax if ok else None
    else:
        ok = e.data.dtype == DTYPES[encoding] and list(e.data.shape) == shape and e.absmax is None
        values = e.data if ok else None
    if not ok:
        return f"its {encoding} payload has the wrong dtype or size"
    if not torch.isfinite(values).all():
        return "holds NaN or Inf"
    return None


class FactorStore:
    """The coordinator's copy of every head's factors as of its last accepted upload: what a
    rank-r upload builds on. About r (d_in + d_out) fp32 numbers per layer per head."""

    def __init__(self, scaling: float, resetless: bool):
        self.scaling, self.resetless = scaling, resetless
        self.factors: dict[int, tuple[int, dict[str, Pair]]] = {}  # head id -> (round, key -> (B, A))

    def base_round(self, head_id: int) -> int | None:
        """The round whose factors a head's next upload may build on (None: it sends them all)."""
        held = self.factors.get(head_id)
        return held[0] if held and self.resetless else None

    def read(self, head_id: int, upload: FactorUpload) -> tuple[dict[str, Pair], Factors]:
        """A checked upload (see `problem`) -> the head's (B, A) per key, and its delta as (U, V)."""
        base = self.factors[head_id][1] if self.resetless and upload.base_round is not None else {}
        pairs, deltas = {}, {}
        for key in upload.b:
            b, a = decode(upload.b[key]), decode(upload.a[key])
            if upload.relative:
                b, a = base[key][0] + b, base[key][1] + a
            pairs[key] = (b, a)
            if not self.resetless:
                deltas[key] = delta_uv(b, a, None, None, self.scaling)
            else:
                b_prev, a_prev = (upload.b_prev[key], upload.a_prev[key]) if upload.base_round is None else base[key]
                deltas[key] = delta_uv(b, a, b_prev, a_prev, self.scaling)
        return pairs, deltas

    def accept(self, head_id: int, round_idx: int, pairs: dict[str, Pair]) -> None:
        if self.resetless:
            self.factors[head_id] = (round_idx, pairs)

    def forget(self, head_id: int) -> None:
        self.factors.pop(head_id, None)

    def keep_only(self, head_ids: set[int]) -> None:
        """Drop the factors of heads that left the run."""
        for head_id in set(self.factors) - head_ids:
            self.forget(head_id)
