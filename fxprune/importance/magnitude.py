"""Group magnitude: a channel's score is the norm of every weight slice coupled to it (all members)."""
from __future__ import annotations

import torch

from . import heads_from_channels, register


def _atom_sums(analysis, power: float) -> torch.Tensor:
    """Per atom, the sum of |w| ** power over every weight slice coupled to it; only atoms of prunable groups
    are scored (the others stay 0: nothing reads them). Skipping the spaces of frozen groups (a decoder's
    residual stream: every projection's input columns, the embedding and the head) saves the slowest
    reductions, across rows, which took most of the plan's 10-20 s at 1B."""
    scored = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    for group in analysis.groups:
        if group.prunable:
            scored[torch.tensor(group.atoms, dtype=torch.long)] = True
    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    for space in analysis.ids.param_spaces:
        atoms = analysis.atoms.atom_of[space.start:space.start + space.size]
        if not bool(scored[atoms].any()):
            continue
        tensor = analysis.tensor(space.param).detach()
        if not tensor.is_floating_point():  # index buffers coupled to channels (LeViT's attention_bias_idxs)
            tensor = tensor.to(torch.float64)
        others = [d for d in range(tensor.ndim) if d != space.dim]
        per_index = _power_sums(tensor, power, others)
        scores.index_add_(0, atoms, per_index)
    return heads_from_channels(analysis, scores)  # a head weighs what its channels weigh


def _power_sums(tensor: torch.Tensor, power: float, dims: list[int]) -> torch.Tensor:
    """Σ |w| ** power over ``dims``, float64. Over trailing dims one ``vector_norm`` in the weights' own dtype
    (the float64 copy of ViT-B's weights cost ~1 s); over leading dims (a Linear's input columns) a strided
    norm is 25x slower than powers summed row by row, which is what is done there (in float32 at least)."""
    if not dims:
        return tensor.abs().to(torch.float64) ** power
    if dims == list(range(tensor.ndim - len(dims), tensor.ndim)):
        return torch.linalg.vector_norm(tensor, ord=power, dim=dims).to(torch.float64) ** power
    powered = tensor * tensor if power == 2.0 else tensor.abs() ** power
    return powered.sum(dim=dims, dtype=torch.promote_types(tensor.dtype, torch.float32)).to(torch.float64)


@register("l2")
def l2(analysis, **_) -> torch.Tensor:
    return _atom_sums(analysis, 2.0).sqrt()


@register("l1")
def l1(analysis, **_) -> torch.Tensor:
    return _atom_sums(analysis, 1.0)
