"""Budgets: MACs and parameter counts of a plan, computed from the analysed shapes without building the model.

Each op declares its MACs at registration (``register_op(..., macs=...)``), following FlopCounterMode's
formulas (linear, matmul, convolution, scaled_dot_product_attention; FLOPs / 2), so an estimate equals what
``fxprune.count_macs`` measures on the pruned model.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from . import meta
from .analysis.rules import ParamRef, spec_of
from .analysis.shapes import kept_indices, new_shapes


def macs(analysis, removed: torch.Tensor, dropped: frozenset[str] | set[str] = frozenset()) -> int:
    """MACs of one forward pass at the example input size after removing ``removed`` atoms and the nodes of
    residual branches removed whole (``dropped``, node names)."""
    shapes = new_shapes(analysis.gm, analysis.atoms.atom_of, removed)
    return sum(count for name, count in node_macs(analysis, shapes).items() if name not in dropped)


def node_macs(analysis, shapes: dict[str, Any]) -> dict[str, int]:
    """MACs of every node whose op declares them, at the node output shapes ``shapes`` (``new_shapes``)."""

    def shape_of(x: Any) -> tuple | None:
        if isinstance(x, ParamRef):
            return x.shape
        shape = shapes.get(getattr(x, "name", None))
        return shape if isinstance(shape, tuple) else None

    counts = {}
    for node in analysis.gm.graph.nodes:
        call = node.meta.get(meta.OP)
        spec = spec_of(call)
        out = shapes.get(node.name)
        if spec is not None and spec.macs is not None and isinstance(out, tuple):
            counts[node.name] = spec.macs(call, out, shape_of)
    return counts


def params(analysis, removed: torch.Tensor, dropped: frozenset[str] | set[str] = frozenset()) -> int:
    """Parameter count after removing ``removed`` atoms (every parameter of the captured model) and the
    parameters only removed residual branches read (``dropped``, parameter names)."""
    keep = kept_indices(analysis, removed)
    total = 0
    for name, tensor in analysis.gm.named_parameters():
        if name in dropped:
            continue
        if name in keep:
            total += math.prod(len(keep[name][d]) if d in keep[name] else n for d, n in enumerate(tensor.shape))
        else:
            total += tensor.numel()
    return total
