"""Budgets: MACs and parameter counts of a plan, computed from the analysed shapes without building the model.

MACs follow FlopCounterMode's formulas (linear, matmul, convolution, scaled_dot_product_attention; FLOPs / 2),
so an estimate equals what ``fxprune.count_macs`` measures on the pruned model.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .analysis.propagate import OP_KEY
from .capture import VALUE_KEY
from .rewrite.shapes import new_shapes
from .rewrite.slice_parameters import kept_indices


def _shape(shapes: dict[str, Any], x: Any) -> tuple | None:
    if hasattr(x, "name") and x.name in shapes and isinstance(shapes[x.name], tuple):
        return shapes[x.name]
    return None


def macs(analysis, removed: torch.Tensor) -> int:
    """MACs of one forward pass at the example input size after removing ``removed`` atoms."""
    shapes = new_shapes(analysis.gm, analysis.atoms.atom_of, removed)
    total = 0
    for node in analysis.gm.graph.nodes:
        call = node.meta.get(OP_KEY)
        out = shapes.get(node.name)
        if call is None or not isinstance(out, tuple):
            continue
        if call.op == "linear":
            x = _shape(shapes, call.args["input"])
            total += math.prod(out) * x[-1] if x else 0
        elif call.op == "matmul":
            a = _shape(shapes, call.args["input"])
            total += math.prod(out) * a[-1] if a and len(a) >= 2 else 0
        elif call.op == "conv":
            x = _shape(shapes, call.args["input"])
            weight = call.args["weight"]
            w_shape = weight.shape if hasattr(weight, "shape") else node.meta.get(VALUE_KEY)
            groups = call.args.get("groups", 1) or 1
            original_in = analysis.captured.gm.get_submodule(str(node.target)).in_channels if node.op == "call_module" else None
            depthwise = groups > 1 and original_in == groups
            per_output = (1 if depthwise else x[1] // groups) * math.prod(w_shape[2:])
            total += math.prod(out) * per_output
        elif call.op == "sdpa":
            q, k, v = (_shape(shapes, call.args[n]) for n in ("query", "key", "value"))
            if q and k and v:
                batch = math.prod(q[:-2])
                total += batch * q[-2] * k[-2] * (q[-1] + v[-1])
    return total


def params(analysis, removed: torch.Tensor) -> int:
    """Parameter count after removing ``removed`` atoms (every parameter of the captured model)."""
    keep = kept_indices(analysis, removed)
    total = 0
    for name, tensor in analysis.gm.named_parameters():
        if name in keep:
            total += math.prod(len(keep[name][d]) if d in keep[name] else n for d, n in enumerate(tensor.shape))
        else:
            total += tensor.numel()
    return total
