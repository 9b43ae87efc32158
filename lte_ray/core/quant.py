"""Pack the main weights for broadcast, and unpack them: none | int8 | nf4.

The coordinator keeps fp32 master weights and sends Q(W); heads compute with dequant(Q(W)).
Error never accumulates: every round re-quantizes from the master. A packed state is a
`protocol.Broadcast` of CPU tensors, so it crosses process boundaries (Ray, pickle) unchanged.

* int8: blockwise linear (absmax per block of 64), torch-native: ~0.27x fp32 bytes.
* nf4: bitsandbytes `quantize_4bit` (works on CPU and CUDA) with double-quantized block
  statistics; its QuantState travels as `as_dict(packed=True)`: ~0.13x fp32 bytes.
"""

from __future__ import annotations

import math
from typing import Iterable, get_args

import torch

from lte_ray.config import Quant
from lte_ray.core.protocol import Broadcast, QuantizedWeights

METHODS: tuple[str, ...] = get_args(Quant)
BLOCK = 64  # elements per quantization block (absmax scale), for int8 and nf4


def _int8_quantize(flat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    blocks = flat.view(-1, BLOCK)  # `flat` is padded to whole blocks
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    codes = torch.round(blocks / absmax[:, None] * 127).to(torch.int8)
    return codes.flatten().cpu(), {"absmax": absmax.cpu()}


def _int8_dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    # Divide by a tensor on the same device, not by the number 127: PyTorch's CUDA division turns a
    # division by a CPU scalar into a multiplication by its reciprocal, one ulp off true division, and
    # heads on a GPU would then compute with other weights than heads on a CPU (tests/test_gpu.py).
    scale = absmax / absmax.new_full((), 127.0)
    return (codes.float().view(-1, BLOCK) * scale[:, None]).flatten()


def int8_encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any tensor as blockwise int8: (codes, one absmax per block of 64), flattened and padded."""
    flat = t.detach().float().flatten()
    codes, stats = _int8_quantize(torch.nn.functional.pad(flat, (0, _padded(flat.numel()) - flat.numel())))
    return codes, stats["absmax"]


def int8_decode(codes: torch.Tensor, absmax: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return _int8_dequantize(codes, absmax)[:math.prod(shape)].view(shape)


def _nf4_quantize(flat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    import bitsandbytes.functional as bnbf

    data, state = bnbf.quantize_4bit(flat.contiguous(), blocksize=BLOCK, compress_statistics=True, quant_type="nf4")
    return data.cpu(), {k: v.cpu() for k, v in state.as_dict(packed=True).items()}


def _nf4_state(stats: dict[str, torch.Tensor], device: torch.device):
    import bitsandbytes.functional as bnbf

    return bnbf.QuantState.from_dict({k: v.to(device) for k, v in stats.items()}, device=device)


def prepare(method: str) -> None:
    """Import what `method` needs now rather than at its first use. bitsandbytes takes seconds to
    import: paid inside a new head's first round, which the coordinator waits for, it stalls every
    head (about 1.5 s a join on 2 cores); paid while the head starts, it costs the run nothing."""
    if method == "nf4":
        import bitsandbytes.functional  # noqa: F401


def _padded(n: int) -> int:
    return n + (-n) % BLOCK


def quantize(state: dict[str, torch.Tensor], keys: list[str], method: str) -> QuantizedWeights:
    """`state[k]` for k in `keys`, quantized as one flat buffer, each tensor padded to a block
    boundary: no block straddles two tensors (the same error as quantizing them one by one),
    while the per-buffer overhead (code tables, packed state) is paid once, in one call a round."""
    flat = torch.cat([torch.nn.functional.pad(state[k].detach().float().flatten(),
                                              (0, _padded(state[k].numel()) - state[k].numel())) for k in keys])
    codes, stats = (_int8_quantize if method == "int8" else _nf4_quantize)(flat)
    return QuantizedWeights(method, list(keys), [list(state[k].shape) for k in keys], codes, stats)


def pack(state: dict[str, torch.Tensor], quantize_keys: Iterable[str], method: str, full: bool = True) -> Broadcast:
    """The broadcast of `state`: the keys in `quantize_keys` quantized with `method`, all other
    tensors as they are (fp32)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r} (choose from {', '.join(METHODS)})")
    wanted = set(quantize_keys)
    keys = [k for k in state if k in wanted] if method != "none" else []
    plain = {k: v.detach().cpu() for k, v in state.items() if k not in keys}
    return Broadcast(plain, quantize(state, keys, method) if keys else None, full)


def _dequantize_flat(q: QuantizedWeights, device: torch.device | str) -> torch.Tensor:
    device = torch.device(device)
    if q.method == "int8":
        return _int8_dequantize(q.codes.to(device), q.stats["absmax"].to(device))
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(q.codes.to(device), _nf4_state(q.stats, device)).float().flatten()


def unpack(broadcast: Broadcast, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor a broadcast carries, dense, on `device`."""
    out = {k: v.to(device) for k, v in broadcast.plain.items()}
    q = broadcast.quantized
    if q:
        flat, offset = _dequantize_flat(q, device), 0
        for key, shape in zip(q.keys, q.shapes):
            n = math.prod(shape)
            out[key] = flat[offset:offset + n].view(shape)
            offset += _padded(n)
    return out


class PackedWeight:
    """One main weight kept in its broadcast form (int8 codes or NF4 nibbles, plus one fp32
    absmax per block) and dequantized on use: a head that keeps these instead of fp32 weights
    holds ~0.28x (int8) or ~0.16x (nf4) of the bytes, and dequantizes the same values that
    `unpack` would (the blocks never straddle two tensors)."""

    def __init__(self, method: str, shape: list[int], codes: torch.Tensor, absmax: torch.Tensor,
                 code: torch.Tensor | None = None):
        self.method, self.shape, self.codes, self.absmax = method, list(shape), codes, absmax
        self.state = None
        if method == "nf4":  # built once: dequantize runs in every forward and backward
            import bitsandbytes.functional as bnbf

            self.state = bnbf.QuantState(absmax=absmax, shape=torch.Size([_padded(math.prod(shape))]), code=code,
                                         blocksize=BLOCK, quant_type="nf4", dtype=torch.float32)

    def dequantize(self) -> torch.Tensor:
        n = math.prod(self.shape)
        if self.method == "int8":
            return _int8_dequantize(self.codes, self.absmax)[:n].view(self.shape)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.codes, self.state).flatten()[:n].view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.absmax.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.absmax]


def packed_weights(broadcast: Broadcast, device: torch.device | str = "cpu") -> dict[str, PackedWeight]:
    """The quantized tensors of a broadcast, each kept packed (see `PackedWeight`)."""
    q = broadcast.quantized
    if not q:
        return {}
    device = torch.device(device)
    codes, code = q.codes.to(device), None
    if q.method == "int8":
        absmax = q.stats["absmax"].to(device)
    else:
        import bitsandbytes.functional as bnbf

        state = _nf4_state(q.stats, device)
        absmax, code = state.absmax, state.code
        if state.nested:  # the block statistics are themselves quantized: expand them once, to fp32
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    per_byte = 1 if q.method == "int8" else 2  # NF4 packs two values per byte
    out, offset = {}, 0
    for key, shape in zip(q.keys, q.shapes):
        size = _padded(math.prod(shape))
        out[key] = PackedWeight(q.method, shape, codes[offset // per_byte:(offset + size) // per_byte],
                                absmax[offset // BLOCK:(offset + size) // BLOCK], code)
        offset += size
    return out


def relative_error(original: torch.Tensor, restored: torch.Tensor) -> float:
    return float((original.float() - restored.float()).norm() / original.float().norm().clamp_min(1e-12))


def report(state: dict[str, torch.Tensor], broadcast: Broadcast) -> dict[str, dict[str, float]]:
    """Per quantized tensor: fp32 bytes, its share of the quantized bytes, the ratio, and the
    relative error."""
    q = broadcast.quantized
    if not q:
        return {}
    restored = unpack(broadcast)
    padded = sum(_padded(math.prod(s)) for s in q.shapes)
    out = {}
    for key in q.keys:
        fp32 = state[key].numel() * 4
        share = q.nbytes * _padded(state[key].numel()) / padded
        out[key] = {"fp32_bytes": fp32, "bytes": share, "ratio": share / fp32,
                    "rel_error": relative_error(state[key], restored[key])}
    return out
