"""Pass: rewrite the size arguments baked into the graph so they match the smaller tensors.

Reshape/view/expand/unflatten sizes and split sections are replaced where their dim shrank. Python
values computed from shapes (``B, N, C = x.shape``) keep their original value everywhere else, so a
``C ** -0.5`` or a ``reshape(B, N, C)`` on an untouched dim still computes what the original did.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..analysis.ops import LIKE_CREATORS
from ..analysis.propagate import OP_KEY

# node.meta[OP_KEY] describes the analysed graph: its node references point there, not into this copy.
# Only names and recorded values are read from it here.
from ..capture import VALUE_KEY, TensorValue

_SIZED_RESHAPES = {"reshape", "view", "expand"}
_SIZED_FUNCTIONS = {torch.reshape, torch.ops.aten.reshape.default, torch.ops.aten.view.default,
                    torch.ops.aten.expand.default}


def _size_args(node: fx.Node) -> tuple[int, bool]:
    """Position where the size list starts, and whether the sizes are packed in one tuple argument."""
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    return 1, packed


def _rewrite_sizes(node: fx.Node, old: tuple, new: tuple) -> None:
    start, packed = _size_args(node)
    sizes = list(node.args[1] if packed else node.args[start:])
    if len(sizes) != len(old):
        return
    changed = [i for i, (o, n) in enumerate(zip(old, new)) if o != n and not (isinstance(sizes[i], int) and sizes[i] == -1)]
    inferred = any(isinstance(v, int) and v == -1 for v in sizes)
    dynamic = [i for i in changed if isinstance(sizes[i], fx.Node)]
    for i in changed:
        if i in dynamic and len(dynamic) == 1 and not inferred:
            sizes[i] = -1  # a size computed at run time (batch * heads): let reshape infer it, keeping batch dynamic
        else:
            sizes[i] = new[i]
    node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)


def _rewrite_unflatten(node: fx.Node, old: tuple, new: tuple) -> None:
    args = list(node.args)
    dim = args[1] if len(args) > 1 else node.kwargs["dim"]
    key_sizes = "sizes"
    sizes = list(args[2] if len(args) > 2 else node.kwargs[key_sizes])
    dim %= len(old) - len(sizes) + 1  # dim counts in the input, which has len(sizes) - 1 fewer dims
    for i in range(len(sizes)):
        if old[dim + i] != new[dim + i] and sizes[i] != -1:
            sizes[i] = new[dim + i]
    if len(args) > 2:
        args[2] = tuple(sizes)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, key_sizes: tuple(sizes)}


def _give_explicit_size(node: fx.Node, new: tuple) -> None:
    """zeros_like(x) whose channels differ from x's after pruning becomes x.new_zeros(size)."""
    method = LIKE_CREATORS[node.target.__name__]
    node.target, node.op = method, "call_method"
    node.args = (node.args[0], tuple(new))
    node.kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "device", "requires_grad")}


def _rewrite_split(node: fx.Node, call, shapes: dict[str, Any]) -> None:
    old = [v.shape for v in node.meta[VALUE_KEY]]
    new = shapes[node.name]
    ndim = len(old[0])
    dim = call.args.get("dim", 0) % ndim
    old_sizes = [s[dim] for s in old]
    new_sizes = [s[dim] for s in new]
    if old_sizes == new_sizes:
        return
    graph = node.graph
    with graph.inserting_after(node):
        replacement = graph.call_function(torch.split, (node.args[0], new_sizes), {"dim": dim})
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


def _shape_scalar_value(node: fx.Node, shapes: dict[str, Any], new_values: dict[str, Any]) -> Any:
    """The value a shape query (or arithmetic on one) takes after pruning; the old value if unknown."""
    old = node.meta.get(VALUE_KEY)
    call = node.meta.get(OP_KEY)
    if call is not None and call.op == "shape_query":
        source = call.args["input"]
        shape = shapes.get(source.name) if isinstance(source, fx.Node) else None
        if shape is None:
            return old
        if node.op == "call_method" and node.target == "dim":
            return len(shape)
        rest = call.args.get("rest") or []
        if rest:
            return shape[rest[0]]
        return torch.Size(shape)
    if node.op == "call_function" and node.target in _SCALAR_OPS:
        args = [new_values.get(a.name, a.meta.get(VALUE_KEY)) if isinstance(a, fx.Node) else a for a in node.args]
        try:
            return node.target(*args)
        except Exception:
            return old
    return old


_SCALAR_OPS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
               operator.pow, operator.neg, operator.mod}


def fix_sizes(gm: fx.GraphModule, shapes: dict[str, Any]) -> None:
    for node in list(gm.graph.nodes):
        call = node.meta.get(OP_KEY)
        value = node.meta.get(VALUE_KEY)
        if call is None:
            continue
        if isinstance(value, TensorValue):
            old, new = value.shape, shapes[node.name]
            if old == new:
                continue
            if call.op in ("reshape", "expand") and node.op == "call_method" and node.target in _SIZED_RESHAPES:
                _rewrite_sizes(node, old, new)
            elif call.op in ("reshape", "expand") and node.target in _SIZED_FUNCTIONS:
                _rewrite_sizes(node, old, new)
            elif call.op == "reshape" and node.target in ("unflatten", torch.unflatten):
                _rewrite_unflatten(node, old, new)
            elif call.op == "like":
                _give_explicit_size(node, new)
        elif call.op in ("split", "chunk") and node.name in shapes:
            _rewrite_split(node, call, shapes)
    _pin_shape_scalars(gm, shapes)


def _pin_shape_scalars(gm: fx.GraphModule, shapes: dict[str, Any]) -> None:
    """Values derived from shapes that would change keep their original value as a constant."""
    new_values: dict[str, Any] = {}
    for node in list(gm.graph.nodes):
        old = node.meta.get(VALUE_KEY)
        if not isinstance(old, (int, float, torch.Size)) or isinstance(old, bool):
            continue
        new = _shape_scalar_value(node, shapes, new_values)
        new_values[node.name] = new
        if new == old:
            continue
        for user in list(node.users):
            if isinstance(old, torch.Size) and user.op == "call_function" and user.target is operator.getitem:
                continue  # x.shape[i] is pinned (or not) on its own: batch and token sizes stay dynamic
            user.args = map_arg(user.args, lambda n: old if n is node else n)
            user.kwargs = map_arg(user.kwargs, lambda n: old if n is node else n)
