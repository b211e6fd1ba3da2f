"""What a removal does to sizes, from the analysis alone: each node's new shape and each parameter's kept
indices. Budgets estimate with these; the rewrite carries them out."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from .. import meta
from ..capture import TensorValue
from .labels import CHANNEL, Block
from ..errors import RewriteError


def _rows_kept(alive: torch.Tensor, r: int, inner: bool) -> int:
    """How many rows along dim ``r`` survive: every position along ``r`` where some row survives; along the
    inner of several row dims, as many as every line along ``r`` that keeps any keeps (copies of k per query
    head, (kv heads, n_rep): each kv group keeps its own query heads, the same number) when they agree."""
    if inner:
        per_line = alive.sum(dim=r).reshape(-1)
        per_line = per_line[per_line > 0]
        if per_line.numel() and int(per_line.min()) == int(per_line.max()):
            return int(per_line[0])
    return int(alive.movedim(r, 0).reshape(alive.shape[r], -1).any(1).sum())


def _tensor_shape(node_name: str, value: TensorValue, labels: Any, atom_of: torch.Tensor, removed: torch.Tensor) -> tuple:
    """Channel dims shrink to the channels each (surviving) row keeps; head dims to the heads kept."""
    shape = list(value.shape)
    blocks = [b for b in labels or () if isinstance(b, Block)]
    decided: dict[int, int] = {}
    row_sizes: dict[int, int] = {}
    for block in (b for b in blocks if b.level == CHANNEL):
        kept = ~removed[atom_of[block.ids]]
        counts = kept.sum(dim=block.dim)
        alive = counts[counts > 0]
        if alive.numel() == 0:
            raise RewriteError(f"fxprune: the plan removes every channel of node '{node_name}' along dim {block.dim}")
        low, high = int(alive.min()), int(alive.max())
        if low != high:
            raise RewriteError(f"fxprune: the plan leaves node '{node_name}' ragged along dim {block.dim} "
                               f"({low}..{high} channels per row); every head must keep the same count")
        decided[block.dim] = low
        row_dims = block.row_dims()
        for r in row_dims:  # a row (head) whose channels are all removed disappears
            row_sizes[r] = _rows_kept(kept.any(dim=block.dim, keepdim=True), r, inner=r == max(row_dims) > min(row_dims))
    for block in (b for b in blocks if b.level != CHANNEL):
        if block.dim in decided:
            continue
        kept = ~removed[atom_of[block.ids]]
        counts = kept.sum(dim=block.dim)
        if block.row_dims():  # free copies laid out per head (expand_as): a removed head's row keeps none
            counts = counts[counts > 0]
            if counts.numel() == 0:
                continue
        low, high = int(counts.min()), int(counts.max())
        if low != high:
            raise RewriteError(f"fxprune: the plan keeps different head counts along dim {block.dim} of node '{node_name}'")
        if block.ids.shape[block.dim] == shape[block.dim]:
            decided[block.dim] = low
    for dim, size in row_sizes.items():
        if dim in decided and decided[dim] != size:
            raise RewriteError(f"fxprune: node '{node_name}' keeps {size} rows of channels but {decided[dim]} heads on dim {dim}")
        decided.setdefault(dim, size)
    for dim, size in decided.items():
        shape[dim] = size
    return tuple(shape)


def new_shapes(gm: fx.GraphModule, atom_of: torch.Tensor, removed: torch.Tensor) -> dict[str, Any]:
    """node name -> new shape (tuple) or list of shapes for tuple outputs."""
    out: dict[str, Any] = {}
    for node in gm.graph.nodes:
        value = node.meta.get(meta.VALUE)
        labels = node.meta.get(meta.LABELS)
        if isinstance(value, TensorValue):
            out[node.name] = _tensor_shape(node.name, value, labels, atom_of, removed)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, TensorValue) for v in value) \
                and not isinstance(value, torch.Size):
            labels = labels if isinstance(labels, list) else [()] * len(value)
            out[node.name] = [_tensor_shape(node.name, v, l, atom_of, removed) for v, l in zip(value, labels)]
    return out


def kept_indices(analysis, removed: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """parameter name -> dim -> indices kept, for every parameter dim that loses channels."""
    keep: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for space in analysis.ids.param_spaces:
        ids = torch.arange(space.start, space.start + space.size)
        gone = removed[analysis.atoms.atom_of[ids]]
        if gone.any():
            keep[space.param][space.dim] = torch.nonzero(~gone).flatten()
    return dict(keep)
