"""Training-image augmentation: every image of a batch moved by its own random offset.

torchvision's transforms draw one set of parameters per call, so on a batch tensor every image
would move alike, and a call per image would be a Python loop per batch and draw from torch's
global generator; this is one gather per batch, drawn from the batch stream's own generator, so
a run's batches stay the same for the same seed in any process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """`x` (N, C, H, W), each image moved by (dy, dx) drawn uniformly from [-max_shift, max_shift]
    (pixels moved in from outside repeat the edge's)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    k = max_shift
    padded = F.pad(x, (k, k, k, k), mode="replicate").permute(0, 2, 3, 1)  # (N, H+2k, W+2k, C)
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), generator=generator).to(x.device)
    rows = dy[:, None, None] + torch.arange(h, device=x.device)[None, :, None]
    cols = dx[:, None, None] + torch.arange(w, device=x.device)[None, None, :]
    picked = padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]  # (N, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()
