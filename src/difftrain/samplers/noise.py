"""Per-sample random streams: sample i drawn with seed s is the same whatever the batch size."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` in a run seeded with `seed` (distinct streams per index)."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


class PerSampleNoise:
    """One torch.Generator per sample; `randn_like(x)` draws row i from generator i.

    Generators live on the CPU so results do not depend on the device either.
    """

    def __init__(self, seed: int, indices: range | list[int]):
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} generators")
        out = torch.empty(x.shape)  # float32 on the CPU: each row drawn in place, no list of rows to stack
        for row, g in zip(out, self.generators):
            torch.randn(x.shape[1:], generator=g, out=row)
        return out.to(device=x.device, dtype=x.dtype)
