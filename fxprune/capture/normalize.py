"""Capture-time graph normalisation: numerically identical rewrites that make channels freer to prune.

``unpack_stacked_heads``: ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`` stacks q, k and v
in one tensor, which forces them to keep the same head_dim. It becomes ``qkv.split(C, -1)`` followed by one
reshape and permute per part, so q/k and v widths can differ (and v can shrink when q/k are frozen).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from .values import TensorValue

_RESHAPES = {"reshape", "view"}


_ATEN_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default)


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPES) or \
        (node.op == "call_function" and (node.target is torch.reshape or node.target in _ATEN_RESHAPES))


def _sizes(node: fx.Node) -> list:
    args = node.args[1:]
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)


def _permute_dims(node: fx.Node) -> list[int] | None:
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target in (torch.permute, torch.ops.aten.permute.default):
        dims = node.args[1:]
    else:
        return None
    dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else list(dims)
    return dims if all(isinstance(d, int) for d in dims) else None


def _unbind_dim(node: fx.Node) -> int | None:
    if (node.op == "call_method" and node.target == "unbind") or \
            (node.op == "call_function" and node.target in (torch.unbind, torch.ops.aten.unbind.int)):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return dim if isinstance(dim, int) else None
    return None


@dataclass
class _StackedSplit:
    """``node = x.reshape(*lead, parts, ...)``, optionally permuted, whose parts are taken one by one."""

    reshape: fx.Node
    permute: fx.Node | None
    unbind: fx.Node | None
    getters: list[fx.Node]
    order: list[int]  # the permutation (identity without a permute)
    lead: int  # the dim that stacks the parts
    parts: int
    width: int  # the channel width of the stacked input (parts * part width)


def _match_stacked_split(node: fx.Node) -> _StackedSplit | None:
    """The stacked q/k/v split starting at ``node``, or None when ``node`` starts none."""
    if not _is_reshape(node):
        return None
    src = node.args[0].meta.get(meta.VALUE) if isinstance(node.args[0], fx.Node) else None
    out = node.meta.get(meta.VALUE)
    if not (isinstance(src, TensorValue) and isinstance(out, TensorValue)):
        return None
    lead = len(src.shape) - 1
    if len(out.shape) < lead + 2 or out.shape[:lead] != src.shape[:lead]:
        return None
    parts = out.shape[lead]
    sizes = _sizes(node)
    if parts < 2 or len(sizes) != len(out.shape) or not isinstance(sizes[lead], int):
        return None
    chain = list(node.users)
    if len(chain) != 1:
        return None
    order = _permute_dims(chain[0])
    if order is not None:
        permute, order, stacked = chain[0], [d % len(out.shape) for d in order], chain[0]
    else:
        permute, order, stacked = None, list(range(len(out.shape))), node
    users = list(stacked.users)
    if len(users) == 1 and _unbind_dim(users[0]) is not None:
        unbind = users[0]  # q, k, v = qkv.unbind(dim)
        if order[_unbind_dim(unbind) % len(out.shape)] != lead:
            return None
        getters = list(unbind.users)
    elif users and order[0] == lead:
        unbind, getters = None, users  # q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        return None
    if not all(g.op == "call_function" and g.target is operator.getitem and isinstance(g.args[1], int) for g in getters):
        return None
    return _StackedSplit(node, permute, unbind, getters, order, lead, parts, src.shape[-1])


def _split_stacked(graph: fx.Graph, match: _StackedSplit) -> None:
    """x.split(width / parts, -1), then one reshape (and permute) per part, in place of the stacked tensor."""
    node, lead = match.reshape, match.lead
    sizes = _sizes(node)
    part_order = [d - (1 if d > lead else 0) for d in match.order if d != lead]
    with graph.inserting_after(node):
        pieces = graph.call_function(torch.split, (node.args[0], match.width // match.parts), {"dim": -1})
    replacements: dict[int, fx.Node] = {}
    for g in match.getters:
        i = g.args[1] % match.parts
        if i not in replacements:
            with graph.inserting_before(g):
                piece = graph.call_function(operator.getitem, (pieces, i))
                shaped = graph.call_method("reshape", (piece, *(sizes[:lead] + sizes[lead + 1:])))
                replacements[i] = graph.call_method("permute", (shaped, *part_order)) if match.permute is not None else shaped
        g.replace_all_uses_with(replacements[i])
    for dead in match.getters + [n for n in (match.unbind, match.permute) if n is not None] + [node]:
        graph.erase_node(dead)


def unpack_stacked_heads(gm: fx.GraphModule) -> PassResult:
    """Pass: rewrite every stacked q/k/v split (reshape -> [permute] -> unbind)."""
    count = 0
    for node in list(gm.graph.nodes):
        match = _match_stacked_split(node)
        if match is not None:
            _split_stacked(gm.graph, match)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, count > 0)
