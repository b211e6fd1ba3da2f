"""Indexing: ``x[...]`` (basic indexing and ``table[index]`` gathers) and ATen's select and slice."""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from ... import meta
from ...capture.values import TensorValue
from ..labels import Labels
from .registry import OpCall, register_op

_aten = torch.ops.aten


def _example_value(bound: Any) -> Any:
    """A slice bound computed in the graph (a dynamic sequence length) at its example value."""
    return bound.meta.get(meta.VALUE) if isinstance(bound, fx.Node) else bound


def _unsupported_channel_slice(item: slice, width: int) -> str | None:
    """Why a slice of channels by position cannot follow their removal, or None when it can: a range
    (``x[..., :h]``, ``x[..., h:]`` as in rotate_half and partial rotary embeddings, ``x[..., a:b]`` as a fused
    q/k/v projection's k) keeps exactly the surviving channels of its range, and its bounds are rewritten
    from the new size (and, for a middle range, the channels kept before it); a strided
    slice over all channels (``x[..., ::2]``, ``x[..., 1::2]``, interleaved rotary embeddings) keeps them when
    channels go in aligned runs of ``step`` (see ``_couple_strided``)."""
    if item.step not in (None, 1):
        if item.stop is not None or (item.start or 0) >= item.step:
            return "channels are sliced with a step over part of their range"
        if width % item.step:
            return "channels are sliced with a step that does not divide their count"
        return None
    return None


def _couple_strided(ctx, ids: torch.Tensor, dim: int, step: int) -> None:
    """``x[..., j::step]`` still picks the j-th of every run of ``step`` channels after pruning only if runs go
    whole: channels ``step * i`` to ``step * i + step - 1`` are removed together (a rotation pair of an
    interleaved rotary embedding, ``x[..., ::2]`` and ``x[..., 1::2]``)."""
    runs = ids.unflatten(dim, (ids.shape[dim] // step, step))
    ctx.ch.union_within(runs, (dim + 1,))


def _edge_slice(item: slice, new_size: int, new_start: int | None = None) -> slice:
    """The slice of ``new_size`` items that ``item`` becomes after pruning: leading or trailing, or from
    ``new_start`` for a middle range; a strided slice over every channel stays as it is (runs of ``step`` go
    whole)."""
    if item.step not in (None, 1):
        return slice(item.start, None, item.step)
    if new_start is not None:
        return slice(new_start, new_start + new_size)
    return slice(0, new_size) if item.start in (None, 0) else slice(-new_size, None)


def _record_prefix(ctx, block, item: slice, out_dim: int) -> None:
    """A range ``x[..., a:b]`` (or ``x[..., a:]``) of channels starts after the channels kept before ``a`` once
    pruned: remember those ids (``rewrite/slice_starts.py`` counts them); every row must keep as many of them.
    A trailing range needs it too: its own channels may all stay while those before it go (a fused q/k/v
    projection's v after query heads were removed), and only the new start says where it now begins."""
    width = block.ids.shape[block.dim]
    start, stop, _ = item.indices(width)
    if start == 0:
        return
    prefix = block.ids.narrow(block.dim, 0, start)
    if block.row_dims():
        region = torch.zeros(width, dtype=torch.bool)
        region[:start] = True
        ctx.ch.record_region(block.rows(), region)
    ctx.node.meta.setdefault(meta.SLICE_PREFIX, {})[out_dim] = block.moved(prefix, block.dim)


def _resize_getitem(node: fx.Node, call: OpCall, old: tuple, new: tuple) -> None:
    """x[..., :h] whose channels shrank: the slice bounds follow the new size (see ``_edge_slice``).

    The index is read from ``node`` itself: the recorded call's arguments may be nodes of the analysed graph,
    not of this copy. Full slices cover any size, and an index tensor (a gather) bakes in no size."""
    index = node.args[1] if len(node.args) > 1 else None
    source = node.args[0] if node.args else None
    value = source.meta.get(meta.VALUE) if isinstance(source, fx.Node) else None
    if not isinstance(value, TensorValue) or not isinstance(old, tuple):
        return  # an element of a tuple, not an index into a tensor
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(item, (fx.Node, torch.Tensor, list)) for item in items):
        return
    if Ellipsis in items:
        at = items.index(Ellipsis)
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (value.ndim - n_real)
    out_dim, changed = 0, False
    starts = node.meta.get(meta.SLICE_START) or {}
    for position, item in enumerate(items):
        if isinstance(item, int):
            continue
        if isinstance(item, slice) and item != slice(None) and (old[out_dim] != new[out_dim] or out_dim in starts):
            items[position], changed = _edge_slice(item, new[out_dim], starts.get(out_dim)), True
        out_dim += 1
    if changed:
        node.args = (node.args[0], tuple(items))


def _resize_slice(node: fx.Node, call: OpCall, old: tuple, new: tuple) -> None:
    """aten.slice over channels that shrank: its bounds follow the new size (see ``_edge_slice``)."""
    dim = call.args.get("dim", 0) % len(old)
    new_start = (node.meta.get(meta.SLICE_START) or {}).get(dim)
    if old[dim] == new[dim] and new_start is None:
        return
    item = _edge_slice(slice(call.args.get("start") or None, None, call.args.get("step")), new[dim], new_start)
    node.args = (node.args[0], dim, item.start, item.stop if item.stop is not None else _END, *node.args[4:])
    node.kwargs = {k: v for k, v in node.kwargs.items() if k == "step"}


_END = 9223372036854775807  # what torch.export writes for an open end


@register_op("getitem", ("input", "index"), functions=[operator.getitem], resize=_resize_getitem)
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
                item = slice(*(_example_value(v) for v in (item.start, item.stop, item.step)))
                full = item.start in (None, 0) and item.stop is None and item.step in (None, 1)
                if not full and d == block.dim:
                    unsupported = _unsupported_channel_slice(item, block.ids.shape[block.dim])
                    if unsupported:
                        ctx.freeze(block.ids, unsupported)
                        ok = False
                        break
                    if item.step not in (None, 1):
                        _couple_strided(ctx, block.ids, block.dim, item.step)
                    else:
                        _record_prefix(ctx, block, item, offset)
                    if item.step in (None, 1) and block.row_dims():  # every row (head) must keep as many channels inside the slice
                        width = block.ids.shape[block.dim]
                        region = torch.zeros(width, dtype=torch.bool)
                        region[item] = True
                        ctx.ch.record_region(block.rows(), region)
                if not full and result.shape[offset] > 1:
                    result = result[(slice(None),) * offset + (item,)]
                if d == block.dim:
                    new_dim = offset
                offset += 1
                continue
            ctx.freeze(block.ids, f"index {item!r} is not supported")
            ok = False
            break
        if ok and new_dim is not None and result.numel() > 0:  # an empty slice (x[..., d:] of width d) holds nothing
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


@register_op("slice", ("input", "dim", "start", "end", "step"), aten=[_aten.slice.Tensor], resize=_resize_slice)
def rule_slice(ctx, call: OpCall) -> Labels:
    """aten.slice(x, dim, start, end, step): x[..., start:end:step, ...] on one dim."""
    x = call.args["input"]
    shape = ctx.shape(x)
    dim = call.args.get("dim", 0) % len(shape)
    end = _example_value(call.args.get("end"))
    end = None if end is None or (isinstance(end, int) and end >= shape[dim]) else end
    item = slice(_example_value(call.args.get("start")) or None, end, _example_value(call.args.get("step", 1)))
    return rule_getitem(ctx, OpCall("getitem", call.node, {"input": x, "index": (slice(None),) * dim + (item,)}))


def _bind_index(node, args: tuple, kwargs: dict) -> dict | None:
    """aten.index.Tensor(x, [i, ...]) is x[i, ...]: a gather by index tensors (None skips a dim)."""
    indices = args[1] if len(args) > 1 else kwargs.get("indices")
    if not isinstance(indices, (list, tuple)):
        return None
    return {"input": args[0], "index": tuple(slice(None) if i is None else i for i in indices)}


@register_op("index", ("input", "index"), aten=[_aten.index.Tensor], bind=_bind_index)
def rule_index(ctx, call: OpCall) -> Labels:
    return rule_getitem(ctx, OpCall("getitem", call.node, call.args))


@register_op("gather", ("input", "dim", "index"), functions=[torch.gather], methods=["gather"],
             aten=[_aten.gather.default])
def rule_gather(ctx, call: OpCall) -> Labels:
    """torch.gather(x, dim, index): ``index`` picks positions of ``x`` element by element (BERT's token type ids
    by position). Along ``dim`` the picked channels are read by position; along the other dims the output
    follows ``index``'s size, not ``x``'s: neither can lose channels, and the output has none of its own."""
    ctx.freeze_labels(ctx.labels(call.args["input"]), "torch.gather reads them by position")
    ctx.freeze_labels(ctx.labels(call.args["index"]), "torch.gather's index sets the output's size")
    return ()


def _gather(ctx, labels: Labels, index: tuple, shape: Sequence[int]) -> Labels:
    """``table[..., idx, ...]`` with one index tensor, after full slices only (relative position tables:
    ``table[idx]``; TinyViT's per-head biases: ``biases[:, idx]``): the gathered dim becomes the index's
    dims, every other dim keeps its ids (heads stay heads)."""
    at = next((p for p, item in enumerate(index) if not (isinstance(item, slice) and item == slice(None))), None)
    if at is None or not isinstance(index[at], fx.Node) or any(
            not (isinstance(item, slice) and item == slice(None)) for item in index[at + 1:]):
        ctx.freeze_labels(labels, "advanced indexing other than table[..., index] is not supported")
        return ()
    gathered = ctx.shape(index[at])
    if gathered is None:
        ctx.freeze_labels(labels, "indexing with a non-tensor index")
        return ()
    out = []
    for block in labels:
        if block.dim == at or block.ids.shape[at] > 1:
            ctx.freeze(block.ids, "channels along a gathered dim")
            continue
        ids = block.ids.squeeze(at)
        ids = ids.reshape(tuple(ids.shape[:at]) + (1,) * len(gathered) + tuple(ids.shape[at:]))
        out.append(block.moved(ids, block.dim if block.dim < at else block.dim - 1 + len(gathered)))
    return tuple(out)


def _optional(module: str, name: str) -> list:
    """A function of timm that fx keeps whole (a "notrace" function), when timm provides it."""
    try:
        return [getattr(__import__(module, fromlist=[name]), name)]
    except (ImportError, AttributeError):  # pragma: no cover - timm is optional
        return []


@register_op("rel_pos_table", ("q_size", "k_size", "rel_pos"),
             functions=_optional("timm.models.vision_transformer_sam", "get_rel_pos"))
def rule_rel_pos_table(ctx, call: OpCall) -> Labels:
    """timm's ``get_rel_pos(q_size, k_size, rel_pos)`` (SAM-ViT's decomposed relative positions): rows of the
    (L, C) table resampled along L and gathered to (q_size, k_size, C); each channel C is read on its own."""
    out = []
    for block in ctx.labels(call.args["rel_pos"]):
        if block.dim == 0 or block.ids.shape[0] > 1:
            ctx.freeze(block.ids, "relative positions are resampled and gathered along this dim")
            continue
        out.append(block.moved(block.ids.reshape(1, 1, -1), 2))
    return tuple(out)
