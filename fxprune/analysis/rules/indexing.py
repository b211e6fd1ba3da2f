"""Indexing: ``x[...]`` (basic indexing and ``table[index]`` gathers) and ATen's select and slice."""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..labels import Labels
from .registry import OpCall, register_op

_aten = torch.ops.aten


@register_op("getitem", ("input", "index"), functions=[operator.getitem])
def rule_getitem(ctx, call: OpCall) -> Any:
    x, index = call.args["input"], call.args["index"]
    labels = ctx.labels(x)
    if isinstance(labels, list):  # element of a tuple output (unbind, split)
        return labels[index] if isinstance(index, int) else ()
    shape = ctx.shape(x)
    if shape is None:
        return ()
    index = index if isinstance(index, tuple) else (index,)
    if index.count(Ellipsis) > 1:
        ctx.freeze_labels(labels, "indexing with several ellipses")
        return ()
    tensors = [i for i in index if isinstance(i, (fx.Node, torch.Tensor, list))]
    if tensors:
        return _gather(ctx, labels, index, shape)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - n_real) + index[at + 1:]
    index = index + (slice(None),) * (len(shape) - sum(1 for i in index if i is not None))
    out = []
    for block in labels:
        result, offset, src, new_dim, ok = block.ids, 0, 0, None, True
        for item in index:
            if item is None:
                result = result.unsqueeze(offset)
                offset += 1
                continue
            d, src = src, src + 1
            if isinstance(item, int):
                if d == block.dim:
                    ctx.freeze(block.ids, "a single channel is indexed out")
                    ok = False
                    break
                result = result.select(offset, item if result.shape[offset] > 1 else 0)
                continue
            if isinstance(item, slice):
                full = item.start in (None, 0) and item.stop is None and item.step in (None, 1)
                if not full and d == block.dim:
                    ctx.freeze(block.ids, "channels are sliced by position")
                    ok = False
                    break
                if not full and result.shape[offset] > 1:
                    result = result[(slice(None),) * offset + (item,)]
                if d == block.dim:
                    new_dim = offset
                offset += 1
                continue
            ctx.freeze(block.ids, f"index {item!r} is not supported")
            ok = False
            break
        if ok and new_dim is not None:
            out.append(block.moved(result, new_dim))
    return tuple(out)


@register_op("select", ("input", "dim", "index"), aten=[_aten.select.int])
def rule_select(ctx, call: OpCall) -> Labels:
    """aten.select(x, dim, index): x[..., index, ...] on one dim."""
    x = call.args["input"]
    ndim = len(ctx.shape(x))
    dim = call.args.get("dim", 0) % ndim
    index = (slice(None),) * dim + (call.args.get("index", 0),)
    return rule_getitem(ctx, OpCall("getitem", call.node, {"input": x, "index": index}))


@register_op("slice", ("input", "dim", "start", "end", "step"), aten=[_aten.slice.Tensor])
def rule_slice(ctx, call: OpCall) -> Labels:
    """aten.slice(x, dim, start, end, step): x[..., start:end:step, ...] on one dim."""
    x = call.args["input"]
    shape = ctx.shape(x)
    dim = call.args.get("dim", 0) % len(shape)
    end = call.args.get("end")
    end = None if end is None or (isinstance(end, int) and end >= shape[dim]) else end
    item = slice(call.args.get("start") or None, end, call.args.get("step", 1))
    return rule_getitem(ctx, OpCall("getitem", call.node, {"input": x, "index": (slice(None),) * dim + (item,)}))


def _gather(ctx, labels: Labels, index: tuple, shape: Sequence[int]) -> Labels:
    """``table[idx]`` with one index tensor on dim 0 (relative position tables): other dims keep their ids."""
    if len(index) != 1 or not isinstance(index[0], fx.Node):
        ctx.freeze_labels(labels, "advanced indexing other than table[index] is not supported")
        return ()
    gathered = ctx.shape(index[0])
    if gathered is None:
        ctx.freeze_labels(labels, "indexing with a non-tensor index")
        return ()
    out = []
    for block in labels:
        if block.dim == 0 or block.ids.shape[0] > 1:
            ctx.freeze(block.ids, "channels along a gathered dim")
            continue
        ids = block.ids.squeeze(0).reshape((1,) * len(gathered) + tuple(block.ids.shape[1:]))
        out.append(block.moved(ids, block.dim - 1 + len(gathered)))
    return tuple(out)
