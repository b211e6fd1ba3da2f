"""New shapes after removal, computed from each node's channel labels (no re-execution needed)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..analysis.labels import Block
from ..analysis.propagate import LABELS_KEY
from ..capture import VALUE_KEY, TensorValue
from ..errors import RewriteError


def _tensor_shape(node_name: str, value: TensorValue, labels: Any, atom_of: torch.Tensor, removed: torch.Tensor) -> tuple:
    shape = list(value.shape)
    for block in labels or ():
        if not isinstance(block, Block):
            continue
        kept = ~removed[atom_of[block.ids]]
        counts = kept.sum(dim=block.dim)
        low, high = int(counts.min()), int(counts.max())
        if low != high:
            raise RewriteError(f"fxprune: the plan leaves node '{node_name}' ragged along dim {block.dim} "
                               f"({low}..{high} channels per row); every head must keep the same count")
        shape[block.dim] = low
    return tuple(shape)


def new_shapes(gm: fx.GraphModule, atom_of: torch.Tensor, removed: torch.Tensor) -> dict[str, Any]:
    """node name -> new shape (tuple) or list of shapes for tuple outputs."""
    out: dict[str, Any] = {}
    for node in gm.graph.nodes:
        value = node.meta.get(VALUE_KEY)
        labels = node.meta.get(LABELS_KEY)
        if isinstance(value, TensorValue):
            out[node.name] = _tensor_shape(node.name, value, labels, atom_of, removed)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, TensorValue) for v in value) \
                and not isinstance(value, torch.Size):
            labels = labels if isinstance(labels, list) else [()] * len(value)
            out[node.name] = [_tensor_shape(node.name, v, l, atom_of, removed) for v, l in zip(value, labels)]
    return out
