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


# --- RMSNorm written out of elementary ops -------------------------------------------------------------------
#
# Hugging Face's Llama / Qwen / Mistral RMSNorm is ``x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``
# (between dtype casts, then ``weight * that``). Read op by op, its mean of squares is a reduction over every
# channel, which freezes the residual stream. As one ``rms_norm`` op (weight-less: the casts and the weight's
# multiply stay as they were) the norm rule sees a norm over the stream, so the residual machinery narrows it
# and normalises over the kept channels.

_POW = (torch.ops.aten.pow.Tensor_Scalar, torch.pow, operator.pow)
_MEAN = (torch.ops.aten.mean.dim, torch.mean)
_ADD = (torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar, torch.add, operator.add)
_RSQRT = (torch.ops.aten.rsqrt.default, torch.rsqrt)
_MUL = (torch.ops.aten.mul.Tensor, torch.mul, operator.mul)


def _calls(node: object, functions: tuple, method: str) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in functions)
                                          or (node.op == "call_method" and node.target == method))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _mean_over_last_dim(node: fx.Node, ndim: int) -> bool:
    args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("dim", "keepdim") if k in node.kwargs]
    if len(args) != 2:
        return False
    dim, keepdim = args
    dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
    return keepdim is True and len(dims) == 1 and isinstance(dims[0], int) and dims[0] % ndim == ndim - 1


def _match_rms_norm(pow_node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, the final multiply, eps) where ``pow_node`` starts ``x * rsqrt(mean(x ** 2, -1, keepdim) + eps)``."""
    if not _calls(pow_node, _POW, "pow") or len(pow_node.args) != 2 or pow_node.args[1] != 2 or pow_node.kwargs:
        return None
    x = pow_node.args[0]
    value = x.meta.get(meta.VALUE) if isinstance(x, fx.Node) else None
    if not isinstance(value, TensorValue) or not value.dtype.is_floating_point or not value.shape:
        return None
    mean = _only_user(pow_node)
    if not _calls(mean, _MEAN, "mean") or mean.args[0] is not pow_node or not _mean_over_last_dim(mean, len(value.shape)):
        return None
    add = _only_user(mean)
    if not _calls(add, _ADD, "add") or add.kwargs or len(add.args) != 2:
        return None
    eps = add.args[1] if add.args[0] is mean else add.args[0]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        return None
    rsqrt = _only_user(add)
    if not _calls(rsqrt, _RSQRT, "rsqrt") or rsqrt.args != (add,):
        return None
    mul = _only_user(rsqrt)
    if not _calls(mul, _MUL, "mul") or mul.kwargs or set(mul.args) != {x, rsqrt} or len(mul.args) != 2:
        return None
    out = mul.meta.get(meta.VALUE)
    if not isinstance(out, TensorValue) or tuple(out.shape) != tuple(value.shape) or out.dtype != value.dtype:
        return None  # a broadcast or promotion the plain norm would not do
    return x, mul, float(eps)


def fuse_rms_norm(gm: fx.GraphModule) -> PassResult:
    """Pass: every ``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)`` becomes one ``rms_norm`` over the last dim
    (``aten.rms_norm`` in an ATen graph, ``F.rms_norm`` in a symbolic one)."""
    count = 0
    for node in list(gm.graph.nodes):
        match = _match_rms_norm(node)
        if match is None:
            continue
        x, mul, eps = match
        aten = node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        width = x.meta[meta.VALUE].shape[-1]
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(torch.ops.aten.rms_norm.default if aten else torch.nn.functional.rms_norm,
                                           (x, [width], None, eps))
        mul.replace_all_uses_with(fused)
        chain = [mul]
        while chain[-1] is not node:  # mul <- rsqrt <- add <- mean <- pow
            chain.append(next(a for a in chain[-1].all_input_nodes if a is not x))
        for dead in chain:
            gm.graph.erase_node(dead)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, count > 0)
