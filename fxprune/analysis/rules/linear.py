"""Ops with weights: Linear and convolution. Their outputs hold fresh channels (rows of the weight)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import meta
from ..labels import CHANNEL, HEAD, Block, GroupedInput, Labels, block_on, make_block, merge
from .registry import OpCall, ParamRef, register_op

_aten = torch.ops.aten


def _linear_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    x = shape_of(call.args["input"])
    return math.prod(out) * x[-1] if x else 0


def _conv_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    x = shape_of(call.args["input"])
    kernel = shape_of(call.args["weight"])
    if not x or not kernel:
        return 0
    groups = call.args.get("groups", 1) or 1
    original = call.args["input"].meta[meta.VALUE].shape  # the graph keeps the original groups argument
    depthwise = groups > 1 and original[1] == groups
    return math.prod(out) * (1 if depthwise else x[1] // groups) * math.prod(kernel[2:])


@register_op("linear", ("input", "weight", "bias"), functions=[F.linear], aten=[_aten.linear.default],
             modules={nn.Linear: lambda module, ref: {"weight": ref("weight"), "bias": ref("bias")}},
             macs=_linear_macs, produces_channels=True)
def rule_linear(ctx, call: OpCall) -> Labels:
    weight = call.args["weight"]
    w_labels = ctx.labels(weight)
    return _linear(ctx, call.args["input"], weight, block_on(w_labels, 1), block_on(w_labels, 0), call.args.get("bias"))


def _linear(ctx, x: Any, weight: Any, w_in: Block | None, w_out: Block | None, bias: Any) -> Labels:
    """x·Wᵀ + b given the weight's input-feature and output-feature blocks, wherever the weight stores them."""
    last = len(ctx.shape(x)) - 1
    out: list[Block] = []
    mixed = _heads_mixed(ctx, x, w_in, w_out, last)
    if mixed is not None:
        return _mix_heads(ctx, x, mixed, w_in, w_out, bias, last)
    for block in ctx.labels(x):
        if block.dim == last:
            if block.level == CHANNEL:
                consumed = ctx.ch.union_within(block.ids, tuple(block.row_dims()))
                if w_in is not None:
                    ctx.ch.union(consumed.reshape(-1), w_in.ids.reshape(-1))
            # head ids along the features end here: the weight columns carry the channels
        else:
            ids = ctx.ch.union_within(block.ids, (last,)) if block.ids.shape[last] > 1 else block.ids
            out.append(Block(ids, block.dim, block.level))
    if w_in is not None and block_on(ctx.labels(x), last) is None:
        ctx.freeze(w_in.ids, f"input features of {ctx.describe(weight)} come from {ctx.describe(x)}, which has no prunable channels")
    if w_out is not None:
        view = [1] * (last + 1)
        view[last] = w_out.ids.numel()
        out_ids = w_out.ids.reshape(view)
        if bias is not None and ctx.labels(bias):
            ctx.ch.union(out_ids.reshape(-1), ctx.labels(bias)[0].ids.reshape(-1))
        out.append(Block(out_ids, last))
    return merge(ctx.ch, out)


def _heads_mixed(ctx, x: Any, w_in: Block | None, w_out: Block | None, last: int) -> Block | None:
    """The head block of a square Linear over an attention's head dim (CaiT's talking heads: the maps of all
    heads mixed into as many new heads, before and after the softmax), or None for any other Linear."""
    labels = ctx.labels(x)
    heads = block_on(labels, last, HEAD)
    if heads is None or block_on(labels, last) is not None or w_in is None or w_out is None:
        return None
    width = ctx.shape(x)[last]
    if heads.ids.shape[last] != width or w_in.ids.numel() != width or w_out.ids.numel() != width:
        return None
    return heads


def _mix_heads(ctx, x: Any, heads: Block, w_in: Block, w_out: Block, bias: Any, last: int) -> Labels:
    """Head h's map enters column h and leaves as row h: removing head h removes both (and the bias entry), so
    the heads kept mix exactly as before and the removed one contributes nothing (its map and its value are
    zero in the masked original). The output keeps head ids along the same dim."""
    in_ids = ctx.ch.union_within(heads.ids, tuple(heads.row_dims()))
    ctx.ch.union(in_ids.reshape(-1), w_in.ids.reshape(-1))
    ctx.ch.union(w_in.ids.reshape(-1), w_out.ids.reshape(-1))
    if bias is not None and ctx.labels(bias):
        ctx.ch.union(w_out.ids.reshape(-1), ctx.labels(bias)[0].ids.reshape(-1))
    out = [b for b in ctx.labels(x) if b.dim != last and b.ids.shape[last] == 1]
    for b in ctx.labels(x):
        if b.dim != last and b.ids.shape[last] > 1:
            ctx.freeze(b.ids, f"mixed across the heads by {ctx.describe(w_in)}")
    return merge(ctx.ch, [*out, Block(in_ids, last, HEAD)])


def _conv_args(module: nn.Module, ref) -> dict:
    return {"weight": ref("weight"), "bias": ref("bias"), "groups": module.groups, "stride": module.stride,
            "padding": module.padding}


def _pointwise_along(call: OpCall, w_shape: tuple, dim: int) -> bool:
    """Whether a convolution leaves spatial dim ``dim`` alone: kernel 1, stride 1 and no padding along it (each
    position along it is convolved on its own: LambdaNet's Conv3d over (H, W, V) with kernel (r, r, 1))."""
    if w_shape[dim] != 1:
        return False
    spatial = len(w_shape) - 2

    def entry(name: str, default: int):
        value = call.args.get(name, default)
        if isinstance(value, str):
            return 0 if name == "padding" else None  # 'valid' / 'same' pad nothing with a kernel of 1
        value = default if value is None else value
        values = list(value) if isinstance(value, (list, tuple)) else [value] * spatial
        return values[dim - 2] if len(values) == spatial else values[0]

    return entry("stride", 1) == 1 and entry("padding", 0) == 0


def _resize_conv(node: fx.Node, call: OpCall, old: tuple, new: tuple) -> None:
    """A depthwise F.conv2d / aten.conv2d / F.conv_transpose2d call (not a module: slice_parameters fixes
    those) bakes its group count, which follows the channels (the 7th argument of both signatures)."""
    groups = call.args.get("groups", 1) or 1
    if node.op != "call_function" or groups != old[1] or old[1] == new[1]:
        return
    if len(node.args) > 6:
        node.args = (*node.args[:6], new[1], *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new[1]}


@register_op("conv", ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
             functions=[F.conv1d, F.conv2d, F.conv3d],
             aten=[_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,  # .padding: "valid" / "same"
                   _aten.conv1d.padding, _aten.conv2d.padding, _aten.conv3d.padding],
             modules={nn.Conv1d: _conv_args, nn.Conv2d: _conv_args, nn.Conv3d: _conv_args}, macs=_conv_macs,
             produces_channels=True, resize=_resize_conv)
def rule_conv(ctx, call: OpCall) -> Labels:
    x, weight, bias = call.args["input"], call.args["weight"], call.args.get("bias")
    groups = call.args.get("groups", 1) or 1
    w_shape = ctx.shape(weight)
    w_labels = ctx.labels(weight)
    in_block = in_rows = result = None
    passed: list[Block] = []  # channels along a spatial dim the kernel leaves alone
    for block in ctx.labels(x):
        if (block.dim >= 2 and block.level == CHANNEL and _pointwise_along(call, w_shape, block.dim)
                and not block.row_dims()):
            passed.append(block)
        elif (block.dim == 1 and block.level == HEAD and groups == 1
              and any(b.dim == 1 and b.level == CHANNEL for b in ctx.labels(x))):
            pass  # heads merged into the input channels end here, as at a Linear: the weight columns carry them
        elif block.dim != 1 or block.level != CHANNEL:
            ctx.freeze(block.ids, f"convolution input has {block.level} ids along dim {block.dim}")
        else:  # filters are shared by every batch item and position: rows there (e.g. heads) share offsets
            in_rows = block
            in_block = Block(ctx.ch.union_within(block.ids, tuple(block.row_dims())), 1)
    w_out = block_on(w_labels, 0)
    out_ids = w_out.ids.reshape(1, -1, *([1] * (len(w_shape) - 2))) if w_out is not None else None
    in_channels = ctx.shape(x)[1]
    if groups == 1:
        w_in = block_on(w_labels, 1)
        if in_block is not None and w_in is not None:
            ctx.ch.union(in_block.ids.reshape(-1), w_in.ids.reshape(-1))
        elif w_in is not None:
            ctx.freeze(w_in.ids, f"input channels of {ctx.describe(weight)} are not prunable channels")
    elif groups == in_channels == w_shape[0] and w_shape[1] == 1:  # depthwise: channel i only sees channel i
        if in_block is not None and out_ids is not None:
            ctx.ch.union(in_block.ids.reshape(-1), out_ids.reshape(-1))
            if in_rows.row_dims():  # keep the rows (heads merged into the batch) for whoever reads them
                result = in_rows.ids.reshape(in_rows.ids.shape[0], -1, *([1] * (len(w_shape) - 2)))
        elif out_ids is not None:
            ctx.freeze(out_ids, f"depthwise {ctx.describe(weight)} follows channels that are not prunable")
    elif in_channels == groups * w_shape[1] and w_shape[0] % groups == 0:
        _grouped_conv(ctx, weight, in_block, w_labels, out_ids, groups, in_channels)
    else:
        for block in (in_block,) + tuple(w_labels):
            if block is not None:
                ctx.freeze(block.ids, f"grouped convolution (groups={groups}) is not supported")
        return tuple(passed)
    if out_ids is None:
        return tuple(passed)
    if bias is not None and ctx.labels(bias):
        ctx.ch.union(out_ids.reshape(-1), ctx.labels(bias)[0].ids.reshape(-1))
    return merge(ctx.ch, [make_block(result if result is not None else out_ids, 1), *passed])


def _grouped_conv(ctx, weight: Any, in_block: Block | None, w_labels: Labels, out_ids: torch.Tensor | None,
                  groups: int, in_channels: int) -> None:
    """A grouped convolution that is not depthwise (EfficientViT-MIT's 1x1 aggregation, one group per q, k or
    v of a head): group g's outputs read only group g's inputs, through weight columns of their own. So an
    input channel goes on its own (the rewrite gathers each group's kept columns, rewrite/slice_grouped.py)
    and the weight's column dim is no channel space; every group keeps as many inputs, and as many outputs."""
    w_in = block_on(w_labels, 1)
    if w_in is not None:  # indexed by the input channels, per group: the rewrite slices it from them
        ctx.freeze(w_in.ids, f"columns of {ctx.describe(weight)} are read per group: they follow the input channels")
    if out_ids is not None:
        ctx.ch.record_rows(out_ids.reshape(groups, -1))
    if in_block is None:
        return
    name = weight.name if isinstance(weight, ParamRef) else str(weight.target) \
        if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    if name is None:
        ctx.freeze(in_block.ids, f"grouped convolution (groups={groups}) with a computed weight: its columns cannot be sliced")
        return
    if in_block.ids.numel() != in_channels:  # ids broadcast along the channels: no channel of its own per group
        ctx.freeze(in_block.ids, f"grouped convolution (groups={groups}) reads channels that do not vary along dim 1")
        return
    rows = in_block.ids.reshape(groups, -1)
    ctx.ch.record_rows(rows)
    if out_ids is not None:  # a group cannot keep inputs without outputs: heads owning either go together
        ctx.ch.rows_together(rows, out_ids.reshape(groups, -1))
    ctx.node.meta[meta.GROUPED_INPUT] = GroupedInput(name, rows.clone(), groups)


def _conv_transpose_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    """Every input position scatters a kernel to every output channel of its group."""
    x = shape_of(call.args["input"])
    kernel = shape_of(call.args["weight"])  # (in, out / groups, k...)
    if not x or not kernel:
        return 0
    return math.prod(x) * kernel[1] * math.prod(kernel[2:])


def _conv_transpose_args(module: nn.Module, ref) -> dict:
    return {"weight": ref("weight"), "bias": ref("bias"), "groups": module.groups}


def _bind_conv_transpose(node, args: tuple, kwargs: dict) -> dict | None:
    """F.conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation); ATen's
    conv_transpose2d.input has the same order."""
    if node.op == "call_module":
        return None
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    bound = dict(zip(names, args))
    bound.update({("input" if k == "self" else k): v for k, v in kwargs.items()})
    return bound


@register_op("conv_transpose", ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
             functions=[F.conv_transpose1d, F.conv_transpose2d],
             aten=[_aten.conv_transpose1d.default, _aten.conv_transpose2d.input], bind=_bind_conv_transpose,
             modules={nn.ConvTranspose1d: _conv_transpose_args, nn.ConvTranspose2d: _conv_transpose_args},
             macs=_conv_transpose_macs, produces_channels=True, resize=_resize_conv)
def rule_conv_transpose(ctx, call: OpCall) -> Labels:
    """A transposed convolution: its weight is (in, out / groups, k...), so input channels couple with weight
    dim 0 and output channels come from weight dim 1 (a depthwise one: both are weight dim 0)."""
    x, weight, bias = call.args["input"], call.args["weight"], call.args.get("bias")
    groups = call.args.get("groups", 1) or 1
    w_shape = ctx.shape(weight)
    w_labels = ctx.labels(weight)
    in_block = None
    for block in ctx.labels(x):
        if block.dim != 1 or block.level != CHANNEL:
            ctx.freeze(block.ids, f"transposed convolution input has {block.level} ids along dim {block.dim}")
        else:  # filters are shared by every batch item and position
            in_block = Block(ctx.ch.union_within(block.ids, tuple(block.row_dims())), 1)
    w_in, w_out = block_on(w_labels, 0), block_on(w_labels, 1)
    spatial = [1] * (len(w_shape) - 2)
    if groups == 1:
        if in_block is not None and w_in is not None:
            ctx.ch.union(in_block.ids.reshape(-1), w_in.ids.reshape(-1))
        elif w_in is not None:
            ctx.freeze(w_in.ids, f"input channels of {ctx.describe(weight)} are not prunable channels")
        out_ids = w_out.ids.reshape(1, -1, *spatial) if w_out is not None else None
    elif groups == ctx.shape(x)[1] == w_shape[0] and w_shape[1] == 1:  # depthwise: channel i only sees channel i
        out_ids = w_in.ids.reshape(1, -1, *spatial) if w_in is not None else None
        if in_block is not None and out_ids is not None:
            ctx.ch.union(in_block.ids.reshape(-1), out_ids.reshape(-1))
        elif out_ids is not None:
            ctx.freeze(out_ids, f"depthwise {ctx.describe(weight)} follows channels that are not prunable")
    else:
        for block in (in_block,) + tuple(w_labels):
            if block is not None:
                ctx.freeze(block.ids, f"grouped transposed convolution (groups={groups}) is not supported")
        return ()
    if out_ids is None:
        return ()
    if bias is not None and ctx.labels(bias):
        ctx.ch.union(out_ids.reshape(-1), ctx.labels(bias)[0].ids.reshape(-1))
    return (make_block(out_ids, 1),)


def _addmm_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    x = shape_of(call.args["mat1"])
    return math.prod(out) * x[-1] if x else 0


@register_op("addmm", ("bias", "mat1", "mat2", "beta", "alpha"), aten=[_aten.addmm.default], functions=[torch.addmm],
             macs=_addmm_macs, produces_channels=True)
def rule_addmm(ctx, call: OpCall) -> Labels:
    """bias + mat1 @ mat2: a Linear whose weight is stored [in, out] (Hugging Face's Conv1D in GPT-2)."""
    weight = call.args["mat2"]
    w_labels = ctx.labels(weight)
    return _linear(ctx, call.args["mat1"], weight, block_on(w_labels, 0), block_on(w_labels, 1), call.args.get("bias"))


def _bind_embedding(node, args: tuple, kwargs: dict) -> dict:
    """ATen spells it embedding(weight, indices), torch.nn.functional embedding(input, weight)."""
    names = ("weight", "input") if node.target is _aten.embedding.default else ("input", "weight")
    return {**dict(zip(names, args)), **kwargs}


@register_op("embedding", ("input", "weight"), functions=[F.embedding], aten=[_aten.embedding.default],
             bind=_bind_embedding, modules={nn.Embedding: lambda module, ref: {"weight": ref("weight")}})
def rule_embedding(ctx, call: OpCall) -> Labels:
    """A table lookup: the output's last dim holds the table's columns (its rows are looked up by the indices)."""
    weight = call.args["weight"]
    rows = block_on(ctx.labels(weight), 0)
    if rows is not None:
        ctx.freeze(rows.ids, f"rows of {ctx.describe(weight)} are looked up by token indices")
    columns = block_on(ctx.labels(weight), 1)
    if columns is None:
        return ()
    view = [1] * len(ctx.out.shape)
    view[-1] = columns.ids.numel()
    return (Block(columns.ids.reshape(view), len(view) - 1),)
