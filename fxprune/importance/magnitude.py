"""Group magnitude: a channel's score is the norm of every weight slice coupled to it (all members)."""
from __future__ import annotations

import torch

from . import heads_from_channels, register


def _atom_sums(analysis, power: float) -> torch.Tensor:
    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    for space in analysis.ids.param_spaces:
        tensor = analysis.tensor(space.param).detach()
        if not tensor.is_floating_point():  # index buffers coupled to channels (LeViT's attention_bias_idxs)
            tensor = tensor.to(torch.float64)
        others = [d for d in range(tensor.ndim) if d != space.dim]
        # one reduction in the weights' own dtype, without copies (the float64 copy of ViT-B's weights cost ~1 s)
        norms = torch.linalg.vector_norm(tensor, ord=power, dim=others) if others else tensor.abs()
        per_index = norms.to(torch.float64) ** power
        ids = torch.arange(space.start, space.start + space.size)
        scores.index_add_(0, analysis.atoms.atom_of[ids], per_index)
    return heads_from_channels(analysis, scores)  # a head weighs what its channels weigh


@register("l2")
def l2(analysis, **_) -> torch.Tensor:
    return _atom_sums(analysis, 2.0).sqrt()


@register("l1")
def l1(analysis, **_) -> torch.Tensor:
    return _atom_sums(analysis, 1.0)
