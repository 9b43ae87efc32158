"""A model of one coordinator's per-round load as heads, rank and model size grow (docs/scaling.md).

For a model whose LTE layers have shapes (m_l, n_l), with P = sum m n weights and
F = sum (m + n) numbers per unit of rank, N heads of rank r:

* ingress (uploads): N r F x bytes per number (fp32 4, bf16 2, int8 1 + 4/64), each head's factor
  change once the coordinator holds its previous factors; before: N 2r F x 4.
* merge: one product per layer over all heads, 2 P (2r N) FLOPs. Before it, the norm checks:
  each head's k x k Gram matrices U^T U and V V^T (k = 2r), 2 N k^2 F FLOPs, k F / P of the
  merge's.
* egress (broadcast, NF4): P (1/2 + 1/64 + 4/(64 x 256)) bytes per node (heads on a node share
  one copy in its object store): 4-bit codes, a double-quantized absmax per block of 64 (one
  byte, plus one fp32 per 256 blocks). `egress_bytes` assumes a head a node, the worst case.
* past one coordinator: a node that hosts k heads can pre-aggregate them into one dense delta
  (P x 2 bytes in bf16) instead of forwarding k uploads; that pays once k r F b > 2 P, i.e.
  k > 2 P / (r F b). A tree of such reducers with fan-in f gives the root f dense deltas a round.

Replica parameters (biases, norms, embeddings outside nn.Linear) are left out: they are a small
share at these sizes and travel in fp32 both ways.
"""

from __future__ import annotations

import math
from typing import Any

HEADS_PER_NODE = 8  # e.g. one head per GPU of an 8-GPU node
UPLOAD_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / 64}
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)

# Transformer shapes by (width, depth, MLP ratio): per block qkv, proj, fc1, fc2. ViT-S is the
# paper's ImageNet model; "1B" a GPT-style model of width 2048 and depth 20 (1.0 billion weights).
MODELS = {"ViT-S": (384, 12, 4), "ViT-B": (768, 12, 4), "1B": (2048, 20, 4)}


def transformer_shapes(width: int, depth: int, mlp_ratio: int = 4) -> list[tuple[int, int]]:
    hidden = mlp_ratio * width
    return [(3 * width, width), (width, width), (hidden, width), (width, hidden)] * depth


def load(shapes: list[tuple[int, int]], heads: int, rank: int, upload: str = "bf16",
         heads_per_node: int = HEADS_PER_NODE) -> dict[str, float]:
    """One round's coordinator load for `heads` heads of rank `rank` over LTE layers `shapes`.
    `ingress_preaggregated_bytes`: with `heads_per_node` heads a node, each node sending the
    smaller of its heads' uploads and one dense bf16 delta."""
    p = sum(m * n for m, n in shapes)
    f = sum(m + n for m, n in shapes)
    k = 2 * rank
    per_head = rank * f * UPLOAD_BYTES[upload]
    nodes = math.ceil(heads / heads_per_node)
    return {"params": p, "heads": heads, "rank": rank,
            "ingress_bytes": heads * per_head,
            "ingress_bytes_before": heads * 2 * rank * f * 4.0,
            "ingress_preaggregated_bytes": nodes * min(2.0 * p, min(heads, heads_per_node) * per_head),
            "merge_flops": 2.0 * p * k * heads,
            "check_flops": 2.0 * heads * k * k * f,
            "egress_bytes": heads * p * NF4_BYTES_PER_WEIGHT,
            "dense_delta_bytes": 2.0 * p,
            "preaggregate_above_heads_per_node": 2.0 * p / (rank * f * UPLOAD_BYTES[upload])}


def projection(heads: list[int], rank: int, upload: str, flops_per_s: float) -> list[dict[str, Any]]:
    """`load` for every model of MODELS and head count, with the merge seconds at `flops_per_s`."""
    rows = []
    for name, (width, depth, ratio) in MODELS.items():
        for n in heads:
            row = {"model": name, **load(transformer_shapes(width, depth, ratio), n, rank, upload)}
            row["merge_seconds_at_measured_rate"] = row["merge_flops"] / flops_per_s
            rows.append(row)
    return rows
