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
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..analysis.rules import spec_of
from ..capture import TensorValue

# node.meta[meta.OP] describes the analysed graph: its node references point there, not into this copy.
# Only names and recorded values are read from it here.


def _old_shape(value: Any) -> Any:
    if isinstance(value, TensorValue):
        return value.shape
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, TensorValue) for v in value):
        return [v.shape for v in value]
    return None


def _shape_scalar_value(node: fx.Node, shapes: dict[str, Any], new_values: dict[str, Any]) -> Any:
    """The value a shape query (or arithmetic on one) takes after pruning; the old value if unknown."""
    old = node.meta.get(meta.VALUE)
    call = node.meta.get(meta.OP)
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
        args = [new_values.get(a.name, a.meta.get(meta.VALUE)) if isinstance(a, fx.Node) else a for a in node.args]
        try:
            return node.target(*args)
        except Exception:
            return old
    return old


_SCALAR_OPS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
               operator.pow, operator.neg, operator.mod}


def fix_sizes(gm: fx.GraphModule, shapes: dict[str, Any]) -> PassResult:
    """Every op that bakes sizes into the graph (its registration's ``resize``) gets the new sizes."""
    modified = False
    for node in list(gm.graph.nodes):
        call = node.meta.get(meta.OP)
        spec = spec_of(call)
        if spec is None or spec.resize is None or node.name not in shapes:
            continue
        old, new = _old_shape(node.meta.get(meta.VALUE)), shapes[node.name]
        if old is not None and (old != new or node.meta.get(meta.SLICE_START)):  # a range may move, not shrink
            spec.resize(node, call, old, new)
            modified = True
    return PassResult(gm, _pin_shape_scalars(gm, shapes) or modified)


def _pin_shape_scalars(gm: fx.GraphModule, shapes: dict[str, Any]) -> bool:
    """Values derived from shapes that would change keep their original value as a constant."""
    new_values: dict[str, Any] = {}
    pinned = False
    for node in list(gm.graph.nodes):
        old = node.meta.get(meta.VALUE)
        if not isinstance(old, (int, float, torch.Size)) or isinstance(old, bool):
            continue
        new = _shape_scalar_value(node, shapes, new_values)
        new_values[node.name] = new
        if new == old:
            continue
        for user in list(node.users):
            if isinstance(old, torch.Size) and user.op == "call_function" and user.target is operator.getitem:
                continue  # x.shape[i] is pinned (or not) on its own: batch and token sizes stay dynamic
            if isinstance(old, torch.Size) and _takes_the_new_shape(user, node, new, shapes):
                continue  # y.reshape(x.shape) where the output shrinks as x does (timm's interleaved rotary)
            user.args = map_arg(user.args, lambda n: old if n is node else n)
            user.kwargs = map_arg(user.kwargs, lambda n: old if n is node else n)
            pinned = True
    return pinned


def _takes_the_new_shape(user: fx.Node, size: fx.Node, new: Any, shapes: dict[str, Any]) -> bool:
    """A reshape/view/expand whose whole size argument is ``size`` and whose output's new shape is the new
    value of ``size``: it computes the right shape by itself, at any batch size."""
    call = user.meta.get(meta.OP)
    if call is None or call.op not in ("reshape", "expand") or list(user.args[1:]) != [size]:
        return False
    return tuple(shapes.get(user.name) or ()) == tuple(new)
