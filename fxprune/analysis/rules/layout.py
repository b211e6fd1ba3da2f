"""Layout ops: views, permutations, broadcasting, concatenation and splitting, padding and rolling.

They move ids with the positions they describe. Those that bake sizes into the graph (reshape, expand,
split) declare how the rewrite shrinks those sizes (``resize``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import meta
from ..labels import CHANNEL, FREE, Block, Labels, make_block, merge, reshape_block, reshape_groups
from .common import dims_of, drop_dims
from .registry import OpCall, register_op

_aten = torch.ops.aten
_SIZED = {"reshape", "view", "expand", torch.reshape, _aten.reshape.default, _aten.view.default, _aten.expand.default}


def _rewrite_sizes(node: fx.Node, old: tuple, new: tuple) -> None:
    """reshape(x, *sizes) / view / expand: the sizes of dims that shrank take their new value."""
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if packed else node.args[1:])
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
    sizes = list(args[2] if len(args) > 2 else node.kwargs["sizes"])
    dim %= len(old) - len(sizes) + 1  # dim counts in the input, which has len(sizes) - 1 fewer dims
    for i in range(len(sizes)):
        if old[dim + i] != new[dim + i] and sizes[i] != -1:
            sizes[i] = new[dim + i]
    if len(args) > 2:
        args[2] = tuple(sizes)
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "sizes": tuple(sizes)}


def _resize_view(node: fx.Node, call: OpCall, old: tuple, new: tuple) -> None:
    if node.target in _SIZED and node.op in ("call_method", "call_function"):
        _rewrite_sizes(node, old, new)
    elif node.target in ("unflatten", torch.unflatten):
        _rewrite_unflatten(node, old, new)


def _resize_split(node: fx.Node, call: OpCall, old: list, new: list) -> None:
    """split / chunk: explicit section sizes along the split dim."""
    dim = call.args.get("dim", 0) % len(old[0])
    new_sizes = [s[dim] for s in new]
    if [s[dim] for s in old] == new_sizes:
        return
    graph = node.graph
    with graph.inserting_after(node):
        replacement = graph.call_function(torch.split, (node.args[0], new_sizes), {"dim": dim})
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


# --- views and permutations ------------------------------------------------------------------------------


@register_op("reshape", ("input", "*shape"),
             functions=[torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten],
             methods=["reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"],
             aten=[_aten.reshape.default, _aten.view.default, _aten.flatten.using_ints, _aten.unflatten.int,
                   _aten.unsqueeze.default, _aten.squeeze.dim],
             modules={nn.Flatten: lambda module, ref: {"shape": []}}, resize=_resize_view)
def rule_reshape(ctx, call: OpCall) -> Labels:
    src = ctx.shape(call.args["input"])
    dst = ctx.out.shape
    out = []
    groups = reshape_groups(src, dst)
    for block in ctx.labels(call.args["input"]):
        merged = next((gi for gi, _ in groups if block.dim in gi), [])
        inner = tuple(d for d in merged if d > block.dim and block.ids.shape[d] > 1)
        if block.level == CHANNEL and inner:
            # rows merged *inside* the channel dim ((C', heads) -> C' * heads, NesT): flat position i * heads + h
            # holds channel i of row h, which stays in ascending parameter order only if every row keeps the
            # same offsets
            block = Block(ctx.ch.union_within(block.ids, inner), block.dim, block.level)
        moved = reshape_block(block, src, dst)
        if moved is None:
            ctx.freeze(block.ids, f"reshape {tuple(src)} -> {tuple(dst)} mixes channel dim {block.dim} irregularly")
        else:
            out.append(moved)
    return merge(ctx.ch, out)


def _permute(labels: Labels, order: Sequence[int]) -> Labels:
    return tuple(b.moved(b.ids.permute(*order), list(order).index(b.dim)) for b in labels)


@register_op("permute", ("input", "*dims"), functions=[torch.permute], methods=["permute"],
             aten=[_aten.permute.default])
def rule_permute(ctx, call: OpCall) -> Labels:
    ndim = ctx.out.ndim
    return _permute(ctx.labels(call.args["input"]), [d % ndim for d in call.args["dims"]])


@register_op("transpose", ("input", "dim0", "dim1"), functions=[torch.transpose], methods=["transpose"],
             aten=[_aten.transpose.int, _aten.t.default])
def rule_transpose(ctx, call: OpCall) -> Labels:
    ndim = ctx.out.ndim
    order = list(range(ndim))
    if ndim >= 2:
        d0 = call.args.get("dim0", 0) % ndim
        d1 = call.args.get("dim1", 1) % ndim
        order[d0], order[d1] = order[d1], order[d0]
    return _permute(ctx.labels(call.args["input"]), order)


@register_op("expand", ("input", "*sizes"), methods=["expand", "expand_as"],
             aten=[_aten.expand.default, _aten.expand_as.default], resize=_resize_view)
def rule_expand(ctx, call: OpCall) -> Labels:
    """Broadcast copies. A constant expanded to a literal size (a mask repeated per head), or anything
    expanded to another tensor's shape (``expand_as``: no size is baked in), gets free ids where it is
    copied, so the copies can shrink with whatever they meet (a norm broadcast back over the channels)."""
    x = call.args["input"]
    src = ctx.shape(x)
    dst = ctx.out.shape
    pad = len(dst) - len(src)
    blocks = [b.unsqueezed(pad) for b in ctx.labels(x)]
    sizes = call.args.get("sizes") or []
    like = ()  # expand_as: the labels of the tensor whose shape is taken
    if ctx.node.target in ("expand_as", _aten.expand_as.default):
        like = ctx.labels(sizes[0]) if sizes and isinstance(sizes[0], fx.Node) else ()
        sizes = list(dst)
    if not ctx.is_const(x):
        blocks = [_copies(ctx, b, src, dst, pad) for b in blocks]
    if (ctx.is_const(x) or ctx.node.target in ("expand_as", _aten.expand_as.default)) and len(sizes) == len(dst):
        for d, size in enumerate(sizes):
            source = src[d - pad] if d >= pad else 1
            if isinstance(size, int) and size > 1 and source == 1:
                blocks.append(_free_copies(ctx, d, size, like, len(dst)))
    return merge(ctx.ch, blocks)


def _free_copies(ctx, d: int, size: int, like: Labels, ndim: int) -> Block:
    """Free ids for the copies along ``d``. Laid out like the channels of the tensor whose shape expand_as takes
    where those come in rows (a per-head norm broadcast back over each head's channels, Swin-v2's cosine
    attention): one id per head and channel, so dividing by it does not tie every head to the same offsets."""
    rows = next((b for b in like or () if b.dim == d and b.level == CHANNEL and b.ids.ndim == ndim and b.row_dims()), None)
    view = list(rows.ids.shape) if rows is not None else [1] * ndim
    view[d] = size
    count = 1
    for n in view:
        count *= n
    return Block(ctx.ch.space(f"<{ctx.node.name}>", d, count, True).reshape(view), d, FREE)


def _copies(ctx, block: Block, src: Sequence[int], dst: Sequence[int], pad: int) -> Block:
    """Channels of an activation repeated along dims before their channel dim (grouped-query attention's
    ``k[:, :, None].expand(B, kv_heads, n_rep, T, D)``) get ids of their own per copy, tied to their source:
    removed with it, yet a copy can go on its own with the query head that reads it."""
    repeated = [d for d in range(len(dst)) if d < block.dim and dst[d] > 1 and (src[d - pad] if d >= pad else 1) == 1]
    if block.level != CHANNEL or not repeated:
        return block
    view = list(block.ids.shape)
    for d in repeated:
        view[d] = dst[d]
    source = block.ids.expand(view)
    fresh = ctx.ch.space(f"<copies:{ctx.node.name}>", 0, source.numel(), True).reshape(view)
    ctx.ch.tie(fresh, source)
    return Block(fresh, block.dim, block.level)


def _bind_shape_query(node: fx.Node, args: tuple, kwargs: dict) -> dict | None:
    if node.target is getattr:  # x.shape; other attributes (dtype, device) are no shape query
        return {"input": args[0]} if len(args) == 2 and args[1] == "shape" else None
    return {"input": args[0], "rest": list(args[1:]) + list(kwargs.values())}


@register_op("shape_query", ("input", "*rest"), functions=[getattr], methods=["size", "dim"],
             aten=[_aten.sym_size.int], bind=_bind_shape_query)
def rule_shape_query(ctx, call: OpCall) -> None:
    return None


# --- joining and splitting --------------------------------------------------------------------------------


@register_op("cat", ("tensors", "dim"), functions=[torch.cat, torch.concat], aten=[_aten.cat.default])
def rule_cat(ctx, call: OpCall) -> Labels:
    ndim = ctx.out.ndim
    dim = call.args.get("dim", 0) % ndim
    # an empty piece (the pass-through part x[..., rotary_dim:] of a rotary embedding that rotates every
    # channel) adds no positions
    tensors = [x for x in call.args["tensors"] if (ctx.shape(x) or (1,) * ndim)[dim] != 0]
    per_input = [(x, ctx.shape(x), {(b.dim, b.level): b for b in ctx.labels(x)}) for x in tensors]
    out: list[Block] = []
    keys = sorted({k for _, _, blocks in per_input for k in blocks})
    for key in keys:
        cd = key[0]
        if cd != dim and any(key not in blocks and shape[cd] > 1 for _, shape, blocks in per_input):
            for _, _, blocks in per_input:
                if key in blocks:
                    ctx.freeze(blocks[key].ids, "concatenated with a tensor that has no prunable channels on this dim")
            continue
        if cd != dim and all(key not in blocks or blocks[key].ids.shape[dim] == 1 for _, _, blocks in per_input):
            out.extend(blocks[key] for _, _, blocks in per_input if key in blocks)  # coupled by merge below
            continue
        pieces = []
        for x, shape, blocks in per_input:
            if key not in blocks:  # positions without ids along the cat dim can never be removed
                ctx.freeze_labels(tuple(bl[key] for _, _, bl in per_input if key in bl),
                                  f"concatenated along dim {dim} with {ctx.describe(x)}, which has no ids there")
                pieces = []
                break
            target = list(blocks[key].ids.shape)
            target[dim] = shape[dim]
            pieces.append(blocks[key].ids.expand(target))
        if pieces:
            full = [max(p.shape[d] for p in pieces) for d in range(ndim)]
            pieces = [p.expand([full[d] if d != dim else p.shape[d] for d in range(ndim)]) for p in pieces]
            out.append(make_block(torch.cat(pieces, dim), cd, key[1]))
    return merge(ctx.ch, out)


@register_op("stack", ("tensors", "dim"), functions=[torch.stack], aten=[_aten.stack.default])
def rule_stack(ctx, call: OpCall) -> Labels:
    dim = call.args.get("dim", 0) % ctx.out.ndim
    blocks = []
    for x in call.args["tensors"]:
        for b in ctx.labels(x):
            blocks.append(Block(b.ids.unsqueeze(dim), b.dim + (1 if b.dim >= dim else 0), b.level))
    return merge(ctx.ch, blocks)


def _pieces(ctx, x: Any, dim: int, sizes: list[int], keep_dim: bool) -> list[Labels]:
    outputs: list[list[Block]] = [[] for _ in sizes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for block in ctx.labels(x):
        if not keep_dim and block.dim == dim:
            ctx.freeze(block.ids, f"unbound along its channel dim {dim}")
            continue
        for i, (start, size) in enumerate(zip(starts, sizes)):
            ids = block.ids.narrow(dim, start, size) if block.ids.shape[dim] > 1 else block.ids
            piece = Block(ids, block.dim, block.level)
            if not keep_dim:
                piece = drop_dims(piece, [dim])
            outputs[i].append(piece.moved(piece.ids, piece.dim))
    return [tuple(o) for o in outputs]


@register_op("unbind", ("input", "dim"), functions=[torch.unbind], methods=["unbind"], aten=[_aten.unbind.int])
def rule_unbind(ctx, call: OpCall) -> list[Labels]:
    x = call.args["input"]
    shape = ctx.shape(x)
    dim = call.args.get("dim", 0) % len(shape)
    return _pieces(ctx, x, dim, [1] * shape[dim], keep_dim=False)


@register_op("split", ("input", "split_size_or_sections", "dim"), functions=[torch.split], methods=["split"],
             aten=[_aten.split.Tensor, _aten.split_with_sizes.default], resize=_resize_split)
def rule_split(ctx, call: OpCall) -> list[Labels]:
    x = call.args["input"]
    shape = ctx.shape(x)
    dim = call.args.get("dim", 0) % len(shape)
    sizes = [v.shape[dim] for v in ctx.node.meta[meta.VALUE]]
    return _pieces(ctx, x, dim, sizes, keep_dim=True)


register_op("chunk", ("input", "chunks", "dim"), functions=[torch.chunk], methods=["chunk"],
            aten=[_aten.chunk.default], resize=_resize_split)(rule_split)


# --- ops that move positions ------------------------------------------------------------------------------


def _keep_off(ctx, labels: Labels, dims: set[int], why: str) -> Labels:
    """Blocks with ids along ``dims`` are frozen (those positions move or multiply); the rest pass unchanged."""
    out = []
    for block in labels:
        if block.dim in dims or any(block.ids.shape[d] > 1 for d in dims):
            ctx.freeze(block.ids, why)
        else:
            out.append(block)
    return tuple(out)


@register_op("pad", ("input", "pad", "mode", "value"), functions=[F.pad],
             aten=[_aten.pad.default, _aten.constant_pad_nd.default])
def rule_pad(ctx, call: OpCall) -> Labels:
    """F.pad on the trailing dims. A constant pad of a channel dim (EfficientViT-MIT's column of ones beside v)
    adds positions of its own, which stay (frozen ids of a virtual space): the padded channels keep their
    values and the pad its amounts whatever the channels kept. Other modes copy channels into the padding;
    positions of other padded dims shift, so channels along them are kept."""
    amounts = list(call.args.get("pad") or ())
    ndim = ctx.out.ndim
    padded = {ndim - 1 - i // 2 for i, amount in enumerate(amounts) if amount != 0}
    if (call.args.get("mode", "constant") != "constant"
            or not all(isinstance(a, int) and a >= 0 for a in amounts)):  # amounts computed in the graph: kept off
        return _keep_off(ctx, ctx.labels(call.args["input"]), padded, "padded along its channel dim")
    out = []
    for block in ctx.labels(call.args["input"]):
        others = padded - {block.dim}
        if block.dim not in padded or any(block.ids.shape[d] > 1 for d in others):
            out.extend(_keep_off(ctx, (block,), others, "padded along its channel dim"))
            continue
        i = 2 * (ndim - 1 - block.dim)
        before, after = amounts[i], amounts[i + 1] if i + 1 < len(amounts) else 0
        pieces = []
        for side, amount in (("before", before), ("after", after)):
            if amount:  # ids of its own in every row (head): a removed head takes its padding along
                shape = [n if d != block.dim else amount for d, n in enumerate(block.ids.shape)]
                ids = ctx.ch.space(f"<{ctx.node.name} pad {side}>", 0, math.prod(shape), virtual=True).reshape(shape)
                ctx.freeze(ids, "constant padding along the channel dim")
                pieces.append(ids)
        pieces.insert(1 if before else 0, block.ids)
        out.append(block.moved(torch.cat(pieces, block.dim), block.dim))
    return tuple(out)


@register_op("roll", ("input", "shifts", "dims"), functions=[torch.roll], methods=["roll"], aten=[_aten.roll.default])
def rule_roll(ctx, call: OpCall) -> Labels:
    """torch.roll shifts positions (windows, tokens); ids along a rolled dim would move."""
    dims = call.args.get("dims")
    rolled = set(range(ctx.out.ndim)) if dims is None else set(dims_of(dims, ctx.out.ndim))
    return _keep_off(ctx, ctx.labels(call.args["input"]), rolled, "rolled along a dim that holds ids")


@register_op("unfold", ("input", "dimension", "size", "step"), methods=["unfold"], aten=[_aten.unfold.default])
def rule_unfold(ctx, call: OpCall) -> Labels:
    """Tensor.unfold(dim, size, step): sliding windows along ``dim`` (HaloNet's overlapping key/value blocks),
    the window's positions in a new trailing dim; ids along ``dim`` would be copied into several windows."""
    ndim = len(ctx.shape(call.args["input"]))
    dim = call.args.get("dimension", 0) % max(ndim, 1)
    kept = _keep_off(ctx, ctx.labels(call.args["input"]), {dim}, "unfolded into sliding windows along this dim")
    return tuple(b.moved(b.ids.unsqueeze(-1), b.dim) for b in kept)


def _resize_repeat_interleave(node: fx.Node, call: OpCall, old: tuple, new: tuple) -> None:
    """repeat_interleave with an ``output_size`` hint: the hint is dropped (it is the old size)."""
    if "output_size" in node.kwargs:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "output_size"}
    if len(node.args) > 3:
        node.args = node.args[:3]


@register_op("repeat_interleave", ("input", "repeats", "dim", "output_size"), functions=[torch.repeat_interleave],
             methods=["repeat_interleave"], aten=[_aten.repeat_interleave.self_int], resize=_resize_repeat_interleave)
def rule_repeat_interleave(ctx, call: OpCall) -> Labels:
    """x.repeat_interleave(r, dim): every position of ``dim`` is repeated ``r`` times in place (an interleaved
    rotary embedding's cos and sin, one value per rotation pair). The copies carry their source's ids, so
    removing a channel removes its copies; without ``dim`` the input is flattened first (not followed)."""
    x, repeats, dim = call.args["input"], call.args.get("repeats"), call.args.get("dim")
    labels = ctx.labels(x)
    if not isinstance(repeats, int) or dim is None:
        ctx.freeze_labels(labels, "repeat_interleave by a tensor of counts or over the flattened input")
        return ()
    dim %= ctx.out.ndim
    return tuple(b.moved(b.ids.repeat_interleave(repeats, dim) if b.ids.shape[dim] > 1 else b.ids, b.dim)
                 for b in labels)


_RESAMPLE_ATEN = [getattr(getattr(_aten, name), overload) for name in
                  ("upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "upsample_linear1d",
                   "upsample_nearest1d", "upsample_trilinear3d", "upsample_nearest3d")
                  for overload in ("vec", "default") if hasattr(getattr(_aten, name, None), overload)]


@register_op("resample", ("input", "size", "scale_factor", "mode", "align_corners"), functions=[F.interpolate],
             aten=_RESAMPLE_ATEN)
def rule_resample(ctx, call: OpCall) -> Labels:
    """Interpolation (F.interpolate, aten.upsample_*) resamples the spatial dims (2 and on) of (N, C, ...): each
    channel or head along dim 1 is resampled on its own (BEiT's relative position table, one plane per head),
    while ids along a spatial dim would be mixed."""
    ndim = len(ctx.shape(call.args["input"]))
    return _keep_off(ctx, ctx.labels(call.args["input"]), set(range(2, ndim)), "resampled along this dim")


def _timm_functions(name: str, modules: Sequence[str]) -> list:
    """timm's functions ``name`` in these modules (fx keeps them whole: "notrace"), where timm provides them."""
    found = []
    for module in modules:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # pragma: no cover - timm is optional
            continue
    return found


def _bind_window_reverse(node, args: tuple, kwargs: dict) -> dict:
    return {"input": args[0] if args else kwargs.get("windows")}


@register_op("window_reverse", ("input",), bind=_bind_window_reverse,
             functions=_timm_functions("window_reverse", ("timm.models.swin_transformer",
                                                          "timm.models.swin_transformer_v2",
                                                          "timm.models.swin_transformer_v2_cr")))
def rule_window_reverse(ctx, call: OpCall) -> Labels:
    """timm Swin's ``window_reverse``: windows (nW*B, wh, ww, C) back to a map (B, H, W, C). Positions move
    between windows and the map; each channel of the last dim stays itself (the function reads C from its input)."""
    return _keep_off(ctx, ctx.labels(call.args["input"]), {0, 1, 2}, "windows reversed along a dim that holds ids")


def _timm_function(module: str, name: str) -> list:
    """A timm "notrace" function fx keeps whole, when timm provides it."""
    try:
        return [getattr(__import__(module, fromlist=[name]), name)]
    except (ImportError, AttributeError):  # pragma: no cover - timm is optional
        return []


@register_op("mvit_pre_pool", ("input", "feat_size", "has_cls_token"),
             functions=_timm_function("timm.models.mvitv2", "reshape_pre_pool"))
def rule_mvit_pre_pool(ctx, call: OpCall) -> list:
    """MViT-v2's ``reshape_pre_pool``: (B, heads, N, d) -> ((B * heads, d, H, W), class token (B, heads, 1, d)
    or None). Heads merge into the batch dim (one row of channels per head there, as a depthwise conv the
    heads share keeps them) and the channels move to dim 1; the sizes come from the input, none is baked."""
    x = call.args["input"]
    shape = ctx.shape(x)
    kept, out = [], []
    for block in ctx.labels(x):
        ids = block.ids
        if block.level != CHANNEL or block.dim != 3 or ids.shape[0] > 1 or ids.shape[2] > 1 \
                or (ids.shape[1] > 1 and shape[0] != 1):
            ctx.freeze(ids, "MViT-v2 pooling: ids other than per-head channels (or heads merged into a batch of "
                            "several items)")
            continue
        kept.append(block)
        out.append(Block(ids.reshape(ids.shape[1], ids.shape[3], 1, 1), 1))
    return [tuple(out), tuple(kept) if call.args.get("has_cls_token", True) else None]


@register_op("mvit_post_pool", ("input", "num_heads", "cls_tok"),
             functions=_timm_function("timm.models.mvitv2", "reshape_post_pool"))
def rule_mvit_post_pool(ctx, call: OpCall) -> list:
    """MViT-v2's ``reshape_post_pool``: (B * heads, d, H, W) -> ((B, heads, 1 + H * W, d), [H, W]), the class
    token concatenated back along the tokens (its channels are the same channels). ``num_heads`` is baked in:
    heads that share channel offsets here (the pooling conv and norms are shared) are never removed alone."""
    blocks = []
    for block in ctx.labels(call.args["input"]):
        ids = block.ids
        if block.level != CHANNEL or block.dim != 1 or any(n > 1 for n in ids.shape[2:]):
            ctx.freeze(ids, "MViT-v2 pooling: ids other than channels along dim 1")
            continue
        blocks.append(Block(ids.reshape(1, ids.shape[0], 1, ids.shape[1]), 3))
    cls = call.args.get("cls_tok")
    if cls is not None:
        blocks.extend(ctx.labels(cls) or ())  # None where the class token was not split off
    return [merge(ctx.ch, blocks), None]
