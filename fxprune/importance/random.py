"""Random scores: the baseline every criterion must beat. Deterministic under ``seed``."""
from __future__ import annotations

import torch

from . import register


@register("random")
def random(analysis, seed: int = 0, **_) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(analysis.atoms.count, generator=generator, dtype=torch.float64)
