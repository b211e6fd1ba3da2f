"""Normalisations and reductions. Where an op would see a removed channel's zero (a mean, a softmax, a
LayerNorm's statistics), only the whole reduced set may go; sums and p-norms ignore zeros."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import meta
from ..labels import CHANNEL, Block, Labels, block_on
from .common import dims_of, drop_dims, whole_rows
from .registry import OpCall, register_op

_aten = torch.ops.aten


def _couple_param(ctx, param: Any, block: Block | None, param_dim: int, why_unlabeled: str) -> None:
    """Couple a per-channel parameter's dim ``param_dim`` with an activation block (shared over its rows)."""
    if param is None:
        return
    p_block = block_on(ctx.labels(param), param_dim)
    if p_block is None:
        return
    if block is None:
        ctx.freeze(p_block.ids, why_unlabeled)
        return
    shared = ctx.ch.union_within(block.ids, tuple(block.row_dims()))
    ctx.ch.union(shared.reshape(-1), p_block.ids.reshape(-1))


_STATISTICS = "normalised over these channels: removing some would change the statistics"


def _normalises_a_stream(block: Block, ndim: int, normalized: tuple) -> bool:
    """A norm over the last dim whose channels form one row (a residual stream, not a head's channels):
    if its group is a residual stream, the pruned norm normalises over the kept channels (``STREAM_NORM``)."""
    return len(normalized) == 1 and block.level == CHANNEL and block.dim == ndim - 1 and not block.row_dims()


def _resize_norm(node: fx.Node, call: OpCall, old: tuple, new: tuple) -> None:
    """A norm over a residual stream that lost channels normalises over the kept ones: its normalized_shape
    (an argument, or a module attribute) becomes the new trailing sizes."""
    normalized = call.args.get("normalized_shape") or ()
    count = 1 if isinstance(normalized, int) else len(normalized)
    shape = tuple(new[len(new) - count:])
    if tuple(old[len(old) - count:]) == shape:
        return
    if node.op == "call_module":
        node.graph.owning_module.get_submodule(str(node.target)).normalized_shape = shape
    elif "normalized_shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "normalized_shape": list(shape)}
    else:
        node.args = (node.args[0], list(shape), *node.args[2:])


@register_op("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"), functions=[F.layer_norm],
             aten=[_aten.layer_norm.default], resize=_resize_norm,
             modules={nn.LayerNorm: lambda module, ref: {"normalized_shape": module.normalized_shape,
                                                          "weight": ref("weight"), "bias": ref("bias")}})
def rule_layer_norm(ctx, call: OpCall) -> Labels:
    x = call.args["input"]
    labels = ctx.labels(x)
    ndim = len(ctx.shape(x))
    normalized = call.args.get("normalized_shape") or ()
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    first = ndim - len(normalized)
    dims = list(range(first, ndim))
    for block in labels:
        if block.dim >= first or any(block.ids.shape[d] > 1 for d in dims):
            if _normalises_a_stream(block, ndim, normalized):
                ctx.stream_norm(block.rows(), _STATISTICS)
            else:
                whole_rows(ctx, block, dims, _STATISTICS)
    for pdim in range(len(normalized)):
        block = block_on(labels, first + pdim)
        per_row = block is not None and block.row_dims() and all(d < first for d in block.row_dims())
        for param in (call.args.get("weight"), call.args.get("bias")):
            p_block = block_on(ctx.labels(param), pdim) if per_row and param is not None else None
            if p_block is not None:
                # one weight for every row (head) it normalises (timm's qk_norm, Gemma4's q/k norm): each row
                # goes whole or stays, so the weight keeps its width and the rows keep their own ids
                ctx.freeze(p_block.ids, "a norm weight every head shares keeps its width (heads go whole)")
            else:
                _couple_param(ctx, param, block, pdim, "normalised features are not prunable channels")
    return labels


@register_op("rms_norm", ("input", "normalized_shape", "weight", "eps"), functions=[F.rms_norm],
             aten=[_aten.rms_norm.default], resize=_resize_norm,
             modules={nn.RMSNorm: lambda module, ref: {"normalized_shape": module.normalized_shape,
                                                        "weight": ref("weight")}})
def rule_rms_norm(ctx, call: OpCall) -> Labels:
    """RMSNorm: the mean of squares counts every channel (a zeroed one too), so as LayerNorm: whole sets only."""
    return rule_layer_norm(ctx, call)


def _group_norm_args(module: nn.Module, ref) -> dict:
    return {"num_groups": module.num_groups, "weight": ref("weight"), "bias": ref("bias")}


@register_op("group_norm", ("input", "num_groups", "weight", "bias", "eps"), functions=[F.group_norm],
             aten=[_aten.group_norm.default], modules={nn.GroupNorm: _group_norm_args})
def rule_group_norm(ctx, call: OpCall) -> Labels:
    """GroupNorm: statistics over each group's channels (and positions), so a group's channels go whole; the
    number of groups is fixed in the call, so with several groups the channels stay."""
    x = call.args["input"]
    labels = ctx.labels(x)
    groups = call.args.get("num_groups", 1)
    block = block_on(labels, 1)
    for b in labels:
        if b.dim != 1 or b.level != CHANNEL or any(n > 1 for d, n in enumerate(b.ids.shape) if d >= 2):
            ctx.freeze(b.ids, "group-normalised together with other positions or groups")
        elif groups == 1:
            whole_rows(ctx, b, [1], "normalised over these channels (one group): removing some would change the statistics")
        else:
            ctx.freeze(b.ids, f"normalised in {groups} groups whose count is fixed in the call")
    for param in (call.args.get("weight"), call.args.get("bias")):
        _couple_param(ctx, param, block, 0, "group-normalised features are not prunable channels")
    return labels


def _batch_norm_args(module: nn.Module, ref) -> dict:
    return {name: ref(name) for name in ("running_mean", "running_var", "weight", "bias")}


def _bind_batch_norm(node, args: tuple, kwargs: dict) -> dict | None:
    """F.batch_norm(input, running_mean, running_var, weight, bias, ...) and ATen's
    batch_norm(input, weight, bias, running_mean, running_var, ...), by name."""
    if node.op == "call_module":
        return None
    if node.target is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    else:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    bound = dict(zip(names, args))
    bound.update({("input" if k == "self" else k): v for k, v in kwargs.items()})
    return bound


@register_op("batch_norm", ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
             functions=[F.batch_norm], aten=[_aten.batch_norm.default], bind=_bind_batch_norm,
             modules={nn.BatchNorm1d: _batch_norm_args, nn.BatchNorm2d: _batch_norm_args})
def rule_batch_norm(ctx, call: OpCall) -> Labels:
    x = call.args["input"]
    labels = ctx.labels(x)
    block = block_on(labels, 1)
    for name in ("running_mean", "running_var", "weight", "bias"):
        _couple_param(ctx, call.args.get(name), block, 0, "batch-norm features are not prunable channels")
    return labels


@register_op("softmax", ("input", "dim"), functions=[F.softmax, torch.softmax], methods=["softmax"],
             aten=[_aten.softmax.int, _aten._softmax.default],
             modules={nn.Softmax: lambda module, ref: {"dim": module.dim}})
def rule_softmax(ctx, call: OpCall) -> Labels:
    labels = ctx.labels(call.args["input"])
    dim = call.args.get("dim")
    if dim is None:
        ctx.freeze_labels(labels, "softmax without an explicit dim")
        return ()
    dim %= ctx.out.ndim
    for block in labels:
        if block.dim == dim or block.ids.shape[dim] > 1:
            whole_rows(ctx, block, [dim], "softmax over these ids: removing some would change the normaliser")
    _mark_attention_weights(ctx, labels, dim)
    return labels


def _mark_attention_weights(ctx, labels: Labels, dim: int) -> None:
    """Flag weights over positions (``meta.ATTENTION_WEIGHTS``): normalised over a dim that holds no ids, with
    at most one channel (a one-channel context score); an attention map's heads do not count as channels."""
    if any(b.dim == dim or b.ids.shape[dim] > 1 for b in labels):
        return
    if all(b.level != CHANNEL or b.ids.shape[b.dim] == 1 for b in labels) and not ctx.is_const(ctx.node):
        ctx.node.meta[meta.ATTENTION_WEIGHTS] = True


@register_op("normalize", ("input", "p", "dim", "eps"), functions=[F.normalize])
def rule_normalize(ctx, call: OpCall) -> Labels:
    # F.normalize divides by a norm over `dim`: zeroed (masked) channels add nothing to a p-norm, p > 0
    labels = ctx.labels(call.args["input"])
    p = call.args.get("p", 2.0)
    dim = call.args.get("dim", 1) % ctx.out.ndim
    for block in labels:
        on_dim = block.dim == dim or block.ids.shape[dim] > 1
        if on_dim and (block.level != CHANNEL or not (isinstance(p, (int, float)) and p > 0)):
            whole_rows(ctx, block, [dim], f"normalised (p={p}) over these ids")
    _mark_attention_weights(ctx, labels, dim)
    return labels


def _reduce(ctx, call: OpCall, zero_safe: bool, what: str) -> Labels:
    x = call.args["input"]
    ndim = len(ctx.shape(x))
    dims = dims_of(call.args.get("dim"), ndim)
    keepdim = bool(call.args.get("keepdim", False))
    out = []
    for block in ctx.labels(x):
        if block.dim in dims:
            if not zero_safe or block.level != CHANNEL:
                whole_rows(ctx, block, [block.dim], f"{what} over these ids: removing some would change the result")
            continue
        ids = block.ids
        rows = [d for d in dims if ids.shape[d] > 1]
        if rows:
            ids = ctx.ch.union_within(ids, tuple(rows))
        reduced = Block(ids, block.dim, block.level)
        out.append(reduced if keepdim else drop_dims(reduced, dims))
    return tuple(out)


@register_op("sum", ("input", "dim", "keepdim"), functions=[torch.sum], methods=["sum"], aten=[_aten.sum.dim_IntList])
def rule_sum(ctx, call):
    return _reduce(ctx, call, True, "sum")


@register_op("norm", ("input", "p", "dim", "keepdim"), functions=[torch.norm, torch.linalg.vector_norm],
             methods=["norm"], aten=[_aten.linalg_vector_norm.default])
def rule_norm(ctx, call):
    p = call.args.get("p", 2)
    return _reduce(ctx, call, p is None or p == "fro" or (isinstance(p, (int, float)) and p > 0), "norm")


@register_op("mean", ("input", "dim", "keepdim"), functions=[torch.mean], methods=["mean"], aten=[_aten.mean.dim])
def rule_mean(ctx, call):
    return _reduce(ctx, call, False, "mean")


@register_op("amax", ("input", "dim", "keepdim"), functions=[torch.amax], methods=["amax"], aten=[_aten.amax.default])
def rule_amax(ctx, call):
    return _reduce(ctx, call, False, "max")


# Spatial pooling: each channel is pooled on its own over the trailing spatial dims (a zeroed channel pools
# to zero: averages and maxima of zeros, padding included), so channel ids pass through unchanged.
_POOLS = {1: (F.avg_pool1d, F.max_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, nn.AvgPool1d, nn.MaxPool1d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
          2: (F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, nn.AvgPool2d, nn.MaxPool2d,
              nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
          3: (F.avg_pool3d, F.max_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d, nn.AvgPool3d, nn.MaxPool3d,
              nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)}
_POOL_SPATIAL = {op: n for n, ops in _POOLS.items() for op in ops}
_POOL_ATEN = {getattr(_aten, name).default: n for name, n in [
    ("avg_pool2d", 2), ("adaptive_avg_pool2d", 2), ("_adaptive_avg_pool2d", 2), ("avg_pool1d", 1),
    ("adaptive_avg_pool1d", 1), ("avg_pool3d", 3), ("adaptive_avg_pool3d", 3), ("_adaptive_avg_pool3d", 3)]
    if hasattr(getattr(_aten, name, None), "default")}


def _bind_pool(node, args: tuple, kwargs: dict) -> dict | None:
    if node.op == "call_module":
        return None  # modules go through the module readers
    spatial = _POOL_SPATIAL.get(node.target) or _POOL_ATEN.get(node.target)
    x = args[0] if args else kwargs.get("input", kwargs.get("self"))
    return {"input": x, "spatial": spatial}


@register_op("pool", ("input", "spatial"), bind=_bind_pool,
             functions=[op for op in _POOL_SPATIAL if not isinstance(op, type)], aten=list(_POOL_ATEN),
             modules={cls: (lambda n: lambda module, ref: {"spatial": n})(n)
                      for cls, n in _POOL_SPATIAL.items() if isinstance(cls, type)})
def rule_pool(ctx, call: OpCall) -> Labels:
    x = call.args["input"]
    ndim = len(ctx.shape(x))
    spatial = list(range(ndim - call.args["spatial"], ndim))
    out = []
    for block in ctx.labels(x):
        if block.dim in spatial or any(block.ids.shape[d] > 1 for d in spatial):
            ctx.freeze(block.ids, "pooled over these ids (spatial pooling mixes them)")
            continue
        out.append(block)
    return tuple(out)
