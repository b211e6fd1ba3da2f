"""DIMAP, data-free and module-aware (He & Zhou, "Data-independent Module-aware Pruning for Hierarchical Vision
Transformers", ICLR 2024), adapted from single weights to channels.

The original scores every weight of a layer by its information distortion, w² / Σ_{|w_i| ≥ |w|} w_i² (the
squared weight over the energy of the layer's weights at least as large), so that scores of different
layers are comparable, and prunes single weights with one threshold per module kind (all qkv layers, all
projections, all MLP layers) across the hierarchy.

Adapted here: a channel (an atom, removed with every weight coupled to it) scores the mean distortion of
the weights it removes, each weight scored within its own layer (parameter tensor). Only weight matrices
and kernels are scored (biases and normalisation parameters follow their channel, as DIMAP never prunes
them). Global budgets then compare channels within a kind (qk, v, mlp) by these scores: one threshold per
kind, as in DIMAP. What changes from the original: whole channels go instead of single weights, so the
pruned model is physically smaller, and a channel's score averages the distortion of several layers'
weights (e.g. the v rows of qkv and the columns of the projection) rather than judging each alone.
"""
from __future__ import annotations

import torch

from . import heads_from_channels, register


def distortion(weight: torch.Tensor) -> torch.Tensor:
    """w² / Σ_{|w_i| ≥ |w|} w_i² for every element of one layer's weight (same shape as ``weight``)."""
    squared = weight.detach().to(torch.float64).flatten() ** 2
    order = torch.argsort(squared, descending=True, stable=True)
    energy_above = torch.cumsum(squared[order], 0)
    scores = torch.empty_like(squared)
    scores[order] = squared[order] / energy_above.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.reshape(weight.shape)


@register("dimap", comparable_across_groups=True)
def dimap(analysis, **_) -> torch.Tensor:
    sums = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    counts = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    cache: dict[str, torch.Tensor] = {}
    for space in analysis.ids.param_spaces:
        tensor = analysis.tensor(space.param)
        if tensor.ndim < 2 or not tensor.is_floating_point():
            continue
        if space.param not in cache:
            cache[space.param] = distortion(tensor)
        per_index = cache[space.param].movedim(space.dim, 0).reshape(space.size, -1)
        atoms = analysis.atoms.atom_of[torch.arange(space.start, space.start + space.size)]
        sums.index_add_(0, atoms, per_index.sum(1))
        counts.index_add_(0, atoms, torch.full((space.size,), float(per_index.shape[1]), dtype=torch.float64))
    scores = sums / counts.clamp_min(1)
    return heads_from_channels(analysis, scores, reduce="mean")
