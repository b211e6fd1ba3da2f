"""Elementwise ops: unary maps keep their input's labels; binary ops couple what they combine."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ... import meta
from ..labels import CHANNEL, FREE, HEAD, Block, Labels, RowGather, merge, param_labels
from .common import link_heads
from .registry import OpCall, register_op

_aten = torch.ops.aten
_UNARY = ["relu", "gelu", "silu", "sigmoid", "tanh", "neg", "exp", "abs", "sqrt", "rsqrt", "log", "erf",
          "dropout", "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as", "type", "detach",
          "softplus", "elu", "leaky_relu", "hardswish", "hardsigmoid", "mish", "relu6", "square", "sin", "cos",
          "clamp", "clamp_min", "clamp_max", "reciprocal", "sign", "gelu_tanh"]
_UNARY_ATEN = ["gelu", "relu", "silu", "sigmoid", "tanh", "neg", "exp", "abs", "sqrt", "rsqrt", "dropout", "clone",
               "contiguous", "softplus", "hardswish", "erf", "reciprocal", "alias", "detach", "_to_copy", "clamp",
               "clamp.Tensor", "clamp_min", "clamp_max", "to.dtype", "to.device", "to.dtype_layout", "to.other",
               "type_as", "sin", "cos", "square", "log", "gelu_", "silu_", "relu_", "dropout_", "hardswish_", "sigmoid_",
               "hardsigmoid", "hardsigmoid_", "relu6", "hardtanh", "hardtanh_", "mish", "mish_"]
_UNARY_MODULES = (nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
                  nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardsigmoid)
_ELEMENTWISE = ["add", "sub", "mul", "div", "truediv", "floordiv", "pow", "maximum", "minimum", "where",
                "rsub", "true_divide", "addcmul"]
_ELEMENTWISE_ATEN = ["add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "add.Scalar", "mul.Scalar", "div.Scalar",
                     "sub.Scalar", "pow.Tensor_Scalar", "maximum.default", "minimum.default", "where.self",
                     "where.ScalarOther", "where.ScalarSelf", "where.Scalar", "rsub.Scalar"]
# constants shaped like their input: their channels are free; the rewrite gives them explicit sizes
LIKE_CREATORS = {"zeros_like": "new_zeros", "ones_like": "new_ones", "empty_like": "new_empty"}


def _functions(names: list[str], *namespaces) -> list:
    return [getattr(ns, n) for n in names for ns in namespaces if callable(getattr(ns, n, None))]


def _aten_overloads(names: list[str]) -> list:
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        overload_packet = getattr(_aten, packet, None)
        if overload_packet is not None and hasattr(overload_packet, overload or "default"):
            found.append(getattr(overload_packet, overload or "default"))
    return found


def _optional(module: str, name: str) -> list:
    """A function of timm or torchvision that fx keeps whole (a leaf), when that library provides it."""
    try:
        return [getattr(__import__(module, fromlist=[name]), name)]
    except (ImportError, AttributeError):  # pragma: no cover - both are dependencies
        return []


@register_op("unary", ("input",),
             functions=[operator.neg, *_functions(_UNARY, torch, F),
                        *_optional("torchvision.ops.stochastic_depth", "stochastic_depth")],
             methods=_UNARY, aten=_aten_overloads(_UNARY_ATEN), modules={m: lambda module, ref: {} for m in _UNARY_MODULES})
def rule_unary(ctx, call: OpCall) -> Labels:
    x = call.args["input"]
    if isinstance(x, fx.Node) and x.meta.get(meta.ATTENTION_WEIGHTS):  # dropout on attention weights
        ctx.node.meta[meta.ATTENTION_WEIGHTS] = True
    return ctx.labels(x)


def _bind_operands(node, args: tuple, kwargs: dict) -> dict:
    return {"operands": list(args) + list(kwargs.values())}


@register_op("elementwise", ("*operands",), bind=_bind_operands,
             functions=[operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
                        *_functions(_ELEMENTWISE, torch), *_optional("timm.layers.attention", "maybe_add_mask")],
             methods=_ELEMENTWISE, aten=_aten_overloads(_ELEMENTWISE_ATEN))
def rule_elementwise(ctx, call: OpCall) -> Labels:
    out_ndim = ctx.out.ndim
    operands = [x for x in call.args.get("operands", []) if ctx.shape(x) is not None]
    has_activation = any(not ctx.is_const(x) for x in operands)
    aligned = []
    for x in operands:
        shape = ctx.shape(x)
        pad = out_ndim - len(shape)
        aligned.append((x, (1,) * pad + tuple(shape), [b.unsqueezed(pad) for b in ctx.labels(x)]))
    aligned = _tables_read_per_row(ctx, call, aligned)
    activation_levels: dict[int, set[str]] = {}
    row_dims: set[int] = set()  # dims along which an activation's channels come in rows (heads)
    for x, _, blocks in aligned:
        if not ctx.is_const(x):
            for b in blocks:
                if b.level != FREE:
                    activation_levels.setdefault(b.dim, set()).add(b.level)
                if b.level == CHANNEL:
                    row_dims.update(b.row_dims())
    adjusted = []
    out_shape = ctx.out.shape
    for x, shape, blocks in aligned:
        own = []
        for block in blocks:
            if (not ctx.is_const(x) and block.level == CHANNEL and shape[block.dim] == 1
                    and out_shape[block.dim] > 1):
                # one channel (a gate, a 1-channel score) broadcast over many: it cannot go alone and the
                # channels it meets go independently of it
                ctx.freeze(block.ids, f"one channel broadcast over the {out_shape[block.dim]} channels of dim {block.dim}")
                continue
            if ctx.is_const(x) and has_activation and block.level == CHANNEL:
                levels = activation_levels.get(block.dim, set())
                if not levels and block.dim in row_dims:
                    # one entry per row of channels (XCiT's per-head temperature on a channel × channel map,
                    # which has no head ids yet): it goes with its head
                    block = Block(block.ids, block.dim, HEAD)
                elif not levels:
                    continue  # a parameter broadcast along a dim that holds no channels (e.g. positions)
                if CHANNEL not in levels:  # a per-head parameter (bias table, logit scale) meets heads
                    block = Block(block.ids, block.dim, HEAD)
            own.append(block)
        adjusted.append((x, shape, own))
    _tag_pooled_by_attention(ctx, call, adjusted)
    result = merge(ctx.ch, [b for _, _, own in adjusted for b in own])
    for head in (b for b in result if b.level == HEAD):
        for channel in (b for b in result if b.level == CHANNEL and b.ids.shape[head.dim] > 1):
            link_heads(ctx, head, channel)
    for x, shape, own in adjusted:
        covered = {(b.dim, b.level) for b in own} | {(b.dim, lvl) for b in own if b.level == FREE for lvl in (CHANNEL, HEAD)}
        # rows of channels along a head dim shrink with the heads that own them
        covered |= {(d, HEAD) for b in own if b.level == CHANNEL for d in b.row_dims()}
        for block in result:
            if block.level != FREE and shape[block.dim] > 1 and (block.dim, block.level) not in covered:
                what = "heads" if block.level == HEAD else "channels"
                ctx.freeze(block.ids, f"combined with {ctx.describe(x)}, which has no prunable {what} on dim {block.dim}")
    return result


_PRODUCTS = {operator.mul, torch.mul, "mul", _aten.mul.Tensor}


def _tag_pooled_by_attention(ctx, call: OpCall, adjusted: list) -> None:
    """Channels multiplied by attention weights over positions (``meta.ATTENTION_WEIGHTS``), to be pooled over
    them, play the role of v: attention without q·kᵀ (MobileViT-v2's key channels weighted by a one-channel
    context score, SwiftFormer's query weighted by its additive attention)."""
    if call.node.target not in _PRODUCTS:
        return
    weights = [x for x, _, _ in adjusted if isinstance(x, fx.Node) and x.meta.get(meta.ATTENTION_WEIGHTS)]
    if not weights:
        return
    for x, _, own in adjusted:
        if x in weights or ctx.is_const(x):
            continue
        for block in own:
            if block.level == CHANNEL and block.ids.shape[block.dim] > 1:
                ctx.ch.tag(block.ids, "v")


def _tables_read_per_row(ctx, call: OpCall, aligned: list) -> list:
    """Operands made of parameters or buffers shared by every head (a rotary embedding's cos and sin, a
    qk-norm weight; no head dim) meeting per-head channels get per-head ids of their own, read through a
    gather after pruning (``rewrite/gather_rows.py``), instead of forcing every head to keep the same channel
    offsets. The shared tensor itself keeps its width (frozen)."""
    rows: dict[int, tuple[int, int]] = {}  # channel dim -> (row dim, rows) of an activation's per-head channels
    single: set[int] = set()  # channel dims of activations with one row only (a single key/value head)
    for x, _, blocks in aligned:
        for block in blocks:
            row_dims = block.row_dims()
            if not ctx.is_const(x) and block.level == CHANNEL and len(row_dims) == 1 and row_dims[0] < block.dim:
                rows[block.dim] = (row_dims[0], block.ids.shape[row_dims[0]])
            elif not ctx.is_const(x) and block.level == CHANNEL and not row_dims:
                single.add(block.dim)
    if not (rows or single) or not isinstance(ctx.node.args, tuple):
        return aligned
    tensors = {name for name, _ in ctx.gm.named_buffers()} | {name for name, _ in ctx.gm.named_parameters()}
    buffers = {name for name, _ in ctx.gm.named_buffers()}
    gathers, out = [], []
    for x, shape, blocks in aligned:
        position = next((i for i, a in enumerate(ctx.node.args) if a is x), None)
        new_blocks = []
        for block in blocks:
            row = rows.get(block.dim) if block.level == CHANNEL else None
            if row is None and block.level == CHANNEL and block.dim in single:
                row = _one_row(block, shape, ctx.ch.spaces_of(block.ids), buffers)
            if (row is None or position is None or block.row_dims() or block.ids.shape[row[0]] != 1
                    or not all(not sp.virtual and sp.param in tensors for sp in ctx.ch.spaces_of(block.ids))):
                new_blocks.append(block)
                continue
            row_dim, count = row
            width = block.ids.shape[block.dim]
            view = [1] * len(block.ids.shape)
            view[row_dim], view[block.dim] = count, width
            fresh = ctx.ch.space(f"<per-head {ctx.node.name}:{position}>", 0, count * width, virtual=True).reshape(view)
            ctx.freeze(block.ids, f"a table every head reads ({ctx.describe(x)}) keeps its width; heads gather from it")
            gathers.append(RowGather(position, fresh, row_dim, block.dim))
            new_blocks.append(Block(fresh, block.dim, CHANNEL))
        out.append((x, shape, new_blocks))
    if gathers:
        ctx.node.meta[meta.ROW_GATHER] = gathers
    return out


def _one_row(block: Block, shape: tuple, spaces: list, buffers: set[str]) -> tuple[int, int] | None:
    """A buffer table (a rotary embedding's cos/sin, from ``inv_freq``) meeting the channels of a single head
    (multi-query attention's one key head) is read through a one-row gather too: coupled directly, the
    table would tie that head's channels to every other layer reading it. Parameters are coupled as they
    are (they shrink with the channels); the row dim is a size-1 dim before the channel dim."""
    if not spaces or not all(sp.param in buffers for sp in spaces):
        return None
    size_one = [d for d in range(block.dim) if shape[d] == 1]
    return (size_one[-1], 1) if size_one else None


def _give_explicit_size(node, call: OpCall, old: tuple, new: tuple) -> None:
    """zeros_like(x) whose channels differ from x's after pruning becomes x.new_zeros(size)."""
    method = LIKE_CREATORS.get(getattr(node.target, "__name__", "").split(".")[0])
    if method is None:
        return
    node.target, node.op = method, "call_method"
    node.args = (node.args[0], tuple(new))
    node.kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "device", "requires_grad")}


@register_op("like", ("input",), functions=_functions(list(LIKE_CREATORS), torch),
             aten=_aten_overloads(["zeros_like", "ones_like"]), resize=_give_explicit_size)
def rule_like(ctx, call: OpCall) -> Labels:
    """zeros_like(x) and friends: a constant with channels of its own, coupled only where it is used."""
    return param_labels(ctx.ch, f"<{ctx.node.name}>", ctx.out.shape, virtual=True)
