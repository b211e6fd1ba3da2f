"""Group magnitude: a channel's score is the norm of every weight slice coupled to it (all members)."""
from __future__ import annotations

import torch

from . import heads_from_channels, register


def _atom_sums(analysis, power: float) -> torch.Tensor:
    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    for space in analysis.ids.param_spaces:
        tensor = analysis.tensor(space.param).detach().to(torch.float64)
        per_index = tensor.movedim(space.dim, 0).reshape(space.size, -1).abs().pow(power).sum(1)
        ids = torch.arange(space.start, space.start + space.size)
        scores.index_add_(0, analysis.atoms.atom_of[ids], per_index)
    return heads_from_channels(analysis, scores)  # a head weighs what its channels weigh


@register("l2")
def l2(analysis, **_) -> torch.Tensor:
    return _atom_sums(analysis, 2.0).sqrt()


@register("l1")
def l1(analysis, **_) -> torch.Tensor:
    return _atom_sums(analysis, 1.0)
