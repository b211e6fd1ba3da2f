"""The op rule table: how channel ids flow through each op, and which channels each op couples.

A rule receives the ``RuleContext`` and the normalised ``OpCall`` and returns the output's labels (a
tuple of ``Block``s for a tensor, a list of those for a tuple of tensors). It couples ids with
``ctx.ch.union``, freezes channels it cannot shrink consistently with ``ctx.freeze`` (saying why), marks
sets that may only go as a whole with ``ctx.whole``, tags attention roles with ``ctx.ch.tag`` and records
head layouts with ``ctx.ch.record_rows`` / ``ctx.ch.record_heads``.

Masked equivalence is the contract: removing a channel must compute what the original computes with
that channel's weights zeroed. Ops that would see the zeros (normalisation or softmax over channels,
means over channels) only allow removing the whole normalised set (e.g. a whole head).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .labels import CHANNEL, FREE, HEAD, Block, Labels, block_on, make_block, merge, param_labels, reshape_block
from .ops import OpCall

Rule = Callable[[Any, OpCall], Any]  # (RuleContext from propagate.py, call) -> the output's labels
ATTENTION_OUTPUT_KEY = "fxprune_attention_output"  # node.meta: this node's output is an attention's output (·V)


def _dims(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted(d % ndim for d in dim)
    return [dim % ndim]


def _drop_dims(block: Block, dims: Sequence[int]) -> Block:
    """Remove size-1 dims ``dims`` from a block's ids."""
    ids = block.ids
    new_dim = block.dim
    for d in sorted(dims, reverse=True):
        ids = ids.squeeze(d) if ids.ndim > 0 else ids
        if d < new_dim:
            new_dim -= 1
    return Block(ids, new_dim, block.level)


def _whole_rows(ctx, block: Block, dims: Sequence[int], why: str) -> None:
    """The ids along ``dims`` are reduced together (normalised, softmaxed): each such set goes whole."""
    ids = block.ids
    rest = [d for d in range(ids.ndim) if d not in dims]
    width = 1
    for d in dims:
        width *= ids.shape[d]
    ctx.whole(ids.permute(*rest, *dims).reshape(-1, width), why)


# --- shape-preserving and elementwise ops -------------------------------------------------------------


def rule_unary(ctx, call: OpCall) -> Labels:
    return ctx.labels(call.args["input"])


def rule_elementwise(ctx, call: OpCall) -> Labels:
    out_ndim = ctx.out.ndim
    operands = [x for x in call.args.get("operands", []) if ctx.shape(x) is not None]
    has_activation = any(not ctx.is_const(x) for x in operands)
    aligned = []
    for x in operands:
        shape = ctx.shape(x)
        pad = out_ndim - len(shape)
        aligned.append((x, (1,) * pad + tuple(shape), [b.unsqueezed(pad) for b in ctx.labels(x)]))
    activation_levels: dict[int, set[str]] = {}
    for x, _, blocks in aligned:
        if not ctx.is_const(x):
            for b in blocks:
                if b.level != FREE:
                    activation_levels.setdefault(b.dim, set()).add(b.level)
    adjusted = []
    for x, shape, blocks in aligned:
        own = []
        for block in blocks:
            if ctx.is_const(x) and has_activation and block.level == CHANNEL:
                levels = activation_levels.get(block.dim, set())
                if not levels:
                    continue  # a parameter broadcast along a dim that holds no channels (e.g. positions)
                if CHANNEL not in levels:  # a per-head parameter (bias table, logit scale) meets heads
                    block = Block(block.ids, block.dim, HEAD)
            own.append(block)
        adjusted.append((x, shape, own))
    result = merge(ctx.ch, [b for _, _, own in adjusted for b in own])
    for head in (b for b in result if b.level == HEAD):
        for channel in (b for b in result if b.level == CHANNEL and b.ids.shape[head.dim] > 1):
            _link_heads(ctx, head, channel)
    for x, shape, own in adjusted:
        covered = {(b.dim, b.level) for b in own} | {(b.dim, lvl) for b in own if b.level == FREE for lvl in (CHANNEL, HEAD)}
        # rows of channels along a head dim shrink with the heads that own them
        covered |= {(d, HEAD) for b in own if b.level == CHANNEL for d in b.row_dims()}
        for block in result:
            if block.level != FREE and shape[block.dim] > 1 and (block.dim, block.level) not in covered:
                what = "heads" if block.level == HEAD else "channels"
                ctx.freeze(block.ids, f"combined with {ctx.describe(x)}, which has no prunable {what} on dim {block.dim}")
    return result


def _keep_off(ctx, labels: Labels, dims: set[int], why: str) -> Labels:
    """Blocks with ids along ``dims`` are frozen (those positions move or multiply); the rest pass unchanged."""
    out = []
    for block in labels:
        if block.dim in dims or any(block.ids.shape[d] > 1 for d in dims):
            ctx.freeze(block.ids, why)
        else:
            out.append(block)
    return tuple(out)


def rule_pad(ctx, call: OpCall) -> Labels:
    """F.pad on the trailing dims: ids on a padded dim would gain positions."""
    padded = {ctx.out.ndim - 1 - i // 2 for i, amount in enumerate(call.args.get("pad") or ()) if amount != 0}
    return _keep_off(ctx, ctx.labels(call.args["input"]), padded, "padded along its channel dim")


def rule_roll(ctx, call: OpCall) -> Labels:
    """torch.roll shifts positions (windows, tokens); ids along a rolled dim would move."""
    dims = call.args.get("dims")
    rolled = set(range(ctx.out.ndim)) if dims is None else set(_dims(dims, ctx.out.ndim))
    return _keep_off(ctx, ctx.labels(call.args["input"]), rolled, "rolled along a dim that holds ids")


def rule_like(ctx, call: OpCall) -> Labels:
    """zeros_like(x) and friends: a constant with channels of its own, coupled only where it is used."""
    return param_labels(ctx.ch, f"<{ctx.node.name}>", ctx.out.shape, virtual=True)


# --- layout ops -----------------------------------------------------------------------------------------


def rule_reshape(ctx, call: OpCall) -> Labels:
    src = ctx.shape(call.args["input"])
    dst = ctx.out.shape
    out = []
    for block in ctx.labels(call.args["input"]):
        moved = reshape_block(block, src, dst)
        if moved is None:
            ctx.freeze(block.ids, f"reshape {tuple(src)} -> {tuple(dst)} mixes channel dim {block.dim} irregularly")
        else:
            out.append(moved)
    return merge(ctx.ch, out)


def _permute(labels: Labels, order: Sequence[int]) -> Labels:
    return tuple(b.moved(b.ids.permute(*order), list(order).index(b.dim)) for b in labels)


def rule_permute(ctx, call: OpCall) -> Labels:
    ndim = ctx.out.ndim
    return _permute(ctx.labels(call.args["input"]), [d % ndim for d in call.args["dims"]])


def rule_transpose(ctx, call: OpCall) -> Labels:
    ndim = ctx.out.ndim
    order = list(range(ndim))
    if ndim >= 2:
        d0 = call.args.get("dim0", 0) % ndim
        d1 = call.args.get("dim1", 1) % ndim
        order[d0], order[d1] = order[d1], order[d0]
    return _permute(ctx.labels(call.args["input"]), order)


def rule_expand(ctx, call: OpCall) -> Labels:
    """Broadcast copies. A constant expanded to a literal size (a mask repeated per head) gets free ids
    there, so the copies can shrink with whatever they meet."""
    x = call.args["input"]
    src = ctx.shape(x)
    dst = ctx.out.shape
    pad = len(dst) - len(src)
    blocks = [b.unsqueezed(pad) for b in ctx.labels(x)]
    sizes = call.args.get("sizes") or []
    if ctx.is_const(x) and len(sizes) == len(dst):
        for d, size in enumerate(sizes):
            source = src[d - pad] if d >= pad else 1
            if isinstance(size, int) and size > 1 and source == 1:
                view = [1] * len(dst)
                view[d] = size
                blocks.append(Block(ctx.ch.space(f"<{ctx.node.name}>", d, size, True).reshape(view), d, FREE))
    return merge(ctx.ch, blocks)


def rule_cat(ctx, call: OpCall) -> Labels:
    tensors = list(call.args["tensors"])
    ndim = ctx.out.ndim
    dim = call.args.get("dim", 0) % ndim
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
                piece = _drop_dims(piece, [dim])
            outputs[i].append(piece.moved(piece.ids, piece.dim))
    return [tuple(o) for o in outputs]


def rule_unbind(ctx, call: OpCall) -> list[Labels]:
    x = call.args["input"]
    shape = ctx.shape(x)
    dim = call.args.get("dim", 0) % len(shape)
    return _pieces(ctx, x, dim, [1] * shape[dim], keep_dim=False)


def rule_split(ctx, call: OpCall) -> list[Labels]:
    x = call.args["input"]
    shape = ctx.shape(x)
    dim = call.args.get("dim", 0) % len(shape)
    sizes = [v.shape[dim] for v in ctx.node.meta["fxprune_value"]]
    return _pieces(ctx, x, dim, sizes, keep_dim=True)


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


def rule_select(ctx, call: OpCall) -> Labels:
    """aten.select(x, dim, index): x[..., index, ...] on one dim."""
    x = call.args["input"]
    ndim = len(ctx.shape(x))
    dim = call.args.get("dim", 0) % ndim
    index = (slice(None),) * dim + (call.args.get("index", 0),)
    return rule_getitem(ctx, OpCall("getitem", call.node, {"input": x, "index": index}))


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


# --- ops with parameters ----------------------------------------------------------------------------------


def rule_linear(ctx, call: OpCall) -> Labels:
    x, weight, bias = call.args["input"], call.args["weight"], call.args.get("bias")
    last = len(ctx.shape(x)) - 1
    w_labels = ctx.labels(weight)
    w_out = block_on(w_labels, 0)
    w_in = block_on(w_labels, 1)
    out: list[Block] = []
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


def rule_conv(ctx, call: OpCall) -> Labels:
    x, weight, bias = call.args["input"], call.args["weight"], call.args.get("bias")
    groups = call.args.get("groups", 1) or 1
    w_shape = ctx.shape(weight)
    w_labels = ctx.labels(weight)
    in_block = in_rows = result = None
    for block in ctx.labels(x):
        if block.dim != 1 or block.level != CHANNEL:
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
    else:
        for block in (in_block,) + tuple(w_labels):
            if block is not None:
                ctx.freeze(block.ids, f"grouped convolution (groups={groups}) is not supported")
        return ()
    if out_ids is None:
        return ()
    if bias is not None and ctx.labels(bias):
        ctx.ch.union(out_ids.reshape(-1), ctx.labels(bias)[0].ids.reshape(-1))
    return (make_block(result if result is not None else out_ids, 1),)


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
            _whole_rows(ctx, block, dims, "normalised over these channels: removing some would change the statistics")
    for pdim in range(len(normalized)):
        block = block_on(labels, first + pdim)
        for param in (call.args.get("weight"), call.args.get("bias")):
            _couple_param(ctx, param, block, pdim, "normalised features are not prunable channels")
    return labels


def rule_batch_norm(ctx, call: OpCall) -> Labels:
    x = call.args["input"]
    labels = ctx.labels(x)
    block = block_on(labels, 1)
    for name in ("running_mean", "running_var", "weight", "bias"):
        _couple_param(ctx, call.args.get(name), block, 0, "batch-norm features are not prunable channels")
    return labels


# --- attention --------------------------------------------------------------------------------------------


def _new_heads(ctx, joint: torch.Tensor, out_ndim: int) -> Block | None:
    """Fresh head ids for an attention whose contracted channel ids ``joint`` (batch..., k) have rows.

    Each head owns the channels of its row. Returns the head block placed on the output's head dim.
    """
    batch = joint.shape[:-1]
    row_dims = [d for d, n in enumerate(batch) if n > 1]
    if len(row_dims) != 1:
        return None
    r = row_dims[0]
    heads = batch[r]
    head_ids = ctx.ch.space(f"<heads:{ctx.node.name}>", 0, heads, True)
    rows = joint.movedim(r, 0).reshape(heads, -1, joint.shape[-1]).reshape(heads, -1)
    ctx.ch.record_heads(head_ids, rows)
    view = [1] * out_ndim
    out_dim = r + (out_ndim - 2 - len(batch))
    view[out_dim] = heads
    return Block(head_ids.reshape(view), out_dim, HEAD)


def _link_heads(ctx, head: Block, channel: Block) -> None:
    """A head block and a channel block with rows along the head dim: head h owns row h."""
    if channel.ids.shape[head.dim] != head.ids.shape[head.dim]:
        return
    heads = head.ids.movedim(head.dim, 0).reshape(head.ids.shape[head.dim], -1)[:, 0]
    rows = channel.ids.movedim(head.dim, 0).reshape(channel.ids.shape[head.dim], -1)
    ctx.ch.record_heads(heads, rows)


def _contract(ctx, a: Any, a_block: Block | None, b: Any, b_block: Block | None, a_dim: int, b_dim: int,
              out_ndim: int) -> Block | None:
    """Couple the contracted channels of two operands (q·kᵀ, x·W) or freeze an unpaired side.

    Returns a new head block when both operands are activations and their channels come in heads.
    """
    if a_block is not None and b_block is not None:
        a_ids = a_block.ids.movedim(a_dim, -1)
        b_ids = b_block.ids.movedim(b_dim, -1)
        # positions other than batch dims (the non-contracted matrix dim) must agree
        a_ids = ctx.ch.union_within(a_ids, (a_ids.ndim - 2,)) if a_ids.ndim >= 2 and a_ids.shape[-2] > 1 else a_ids
        b_ids = ctx.ch.union_within(b_ids, (b_ids.ndim - 2,)) if b_ids.ndim >= 2 and b_ids.shape[-2] > 1 else b_ids
        ctx.ch.union(a_ids, b_ids)
        if not ctx.is_const(a) and not ctx.is_const(b):
            joint = torch.broadcast_tensors(a_ids, b_ids)[0]
            ctx.ch.tag(joint, "qk")
            ctx.ch.record_rows(joint)
            return _new_heads(ctx, joint.squeeze(-2) if joint.ndim >= 2 else joint, out_ndim)
    elif a_block is not None:
        ctx.freeze(a_block.ids, f"contracted with {ctx.describe(b)}, which has no prunable channels")
    elif b_block is not None:
        ctx.freeze(b_block.ids, f"contracted with {ctx.describe(a)}, which has no prunable channels")
    return None


def rule_matmul(ctx, call: OpCall) -> Labels:
    a, b = call.args["input"], call.args["other"]
    sa, sb = ctx.shape(a), ctx.shape(b)
    if len(sa) < 2 or len(sb) < 2:
        for x in (a, b):
            ctx.freeze_labels(ctx.labels(x), "matmul with a 1-D operand is not supported")
        return ()
    nd = ctx.out.ndim
    la, lb = ctx.labels(a), ctx.labels(b)
    ka, kb = len(sa) - 1, len(sb) - 2
    for labels, k in ((la, ka), (lb, kb)):
        for block in labels:
            if block.level != CHANNEL and (block.dim == k or block.ids.shape[k] > 1):
                ctx.freeze(block.ids, f"{block.level} ids along a contracted dim")
    out: list[Block] = []
    heads = _contract(ctx, a, block_on(la, ka), b, block_on(lb, kb), ka, kb, nd)
    if heads is not None:
        out.append(heads)
    both_activations = not ctx.is_const(a) and not ctx.is_const(b)
    carried: list[Block] = []
    for labels, k, pad, carried_dim in ((la, ka, nd - len(sa), len(sa) - 2), (lb, kb, nd - len(sb), len(sb) - 1)):
        for block in labels:
            if block.dim == k or (block.level != CHANNEL and block.ids.shape[k] > 1):
                continue
            ids = ctx.ch.union_within(block.ids, (k,)) if block.ids.shape[k] > 1 else block.ids
            moved = Block(ids, block.dim, block.level).unsqueezed(pad)
            carried.append(moved)
            if both_activations and block.dim == carried_dim and block.level == CHANNEL:
                ctx.ch.tag(moved.ids, "v")
                ctx.ch.record_rows(moved.rows())
                ctx.node.meta[ATTENTION_OUTPUT_KEY] = True
    out.extend(carried)
    for head in (b for b in out if b.level == HEAD):
        for channel in (b for b in carried if b.level == CHANNEL):
            _link_heads(ctx, head, channel)
    return merge(ctx.ch, out)


def rule_sdpa(ctx, call: OpCall) -> Labels:
    q, k, v = call.args["query"], call.args["key"], call.args["value"]
    ndim = len(ctx.shape(q))
    lq, lk, lv = ctx.labels(q), ctx.labels(k), ctx.labels(v)
    heads = _contract(ctx, q, block_on(lq, ndim - 1), k, block_on(lk, ndim - 1), ndim - 1, ndim - 1, ndim)
    for labels, name in ((lq, "query"), (lk, "key")):
        for block in labels:
            if block.dim != ndim - 1 or block.level != CHANNEL:
                ctx.freeze(block.ids, f"{name} of attention has {block.level} ids along dim {block.dim}")
    out: list[Block] = [] if heads is None else [heads]
    for block in lv:
        if block.dim == ndim - 1 and block.level == CHANNEL and block.ids.shape[ndim - 2] == 1:
            ctx.node.meta[ATTENTION_OUTPUT_KEY] = True
            ctx.ch.tag(block.ids, "v")
            ctx.ch.record_rows(block.rows())
            out.append(block)
            if heads is not None:
                _link_heads(ctx, heads, block)
        else:
            ctx.freeze(block.ids, f"value of attention has {block.level} ids along dim {block.dim}")
    mask = call.args.get("attn_mask")
    mask_labels = ctx.labels(mask)
    if mask_labels:
        pad = ndim - len(ctx.shape(mask))
        for block in (b.unsqueezed(pad) for b in mask_labels):
            if heads is not None and block.dim == heads.dim:  # a per-head bias (or a mask repeated per head)
                ctx.ch.union(block.ids, heads.ids)
            else:
                ctx.freeze(block.ids, "attention mask carries ids outside the head dim")
    return merge(ctx.ch, out)


# --- reductions and normalisations -----------------------------------------------------------------


def rule_softmax(ctx, call: OpCall) -> Labels:
    labels = ctx.labels(call.args["input"])
    dim = call.args.get("dim")
    if dim is None:
        ctx.freeze_labels(labels, "softmax without an explicit dim")
        return ()
    dim %= ctx.out.ndim
    for block in labels:
        if block.dim == dim or block.ids.shape[dim] > 1:
            _whole_rows(ctx, block, [dim], "softmax over these ids: removing some would change the normaliser")
    return labels


def rule_normalize(ctx, call: OpCall) -> Labels:
    # F.normalize divides by a norm over `dim`: zeroed (masked) channels add nothing to a p-norm, p > 0
    labels = ctx.labels(call.args["input"])
    p = call.args.get("p", 2.0)
    dim = call.args.get("dim", 1) % ctx.out.ndim
    for block in labels:
        on_dim = block.dim == dim or block.ids.shape[dim] > 1
        if on_dim and (block.level != CHANNEL or not (isinstance(p, (int, float)) and p > 0)):
            _whole_rows(ctx, block, [dim], f"normalised (p={p}) over these ids")
    return labels


def _reduce(ctx, call: OpCall, zero_safe: bool, what: str) -> Labels:
    x = call.args["input"]
    ndim = len(ctx.shape(x))
    dims = _dims(call.args.get("dim"), ndim)
    keepdim = bool(call.args.get("keepdim", False))
    out = []
    for block in ctx.labels(x):
        if block.dim in dims:
            if not zero_safe or block.level != CHANNEL:
                _whole_rows(ctx, block, [block.dim], f"{what} over these ids: removing some would change the result")
            continue
        ids = block.ids
        rows = [d for d in dims if ids.shape[d] > 1]
        if rows:
            ids = ctx.ch.union_within(ids, tuple(rows))
        reduced = Block(ids, block.dim, block.level)
        out.append(reduced if keepdim else _drop_dims(reduced, dims))
    return tuple(out)


def rule_sum(ctx, call):
    return _reduce(ctx, call, True, "sum")


def rule_norm(ctx, call):
    p = call.args.get("p", 2)
    return _reduce(ctx, call, p is None or p == "fro" or (isinstance(p, (int, float)) and p > 0), "norm")


def rule_mean(ctx, call):
    return _reduce(ctx, call, False, "mean")


def rule_amax(ctx, call):
    return _reduce(ctx, call, False, "max")


def rule_shape_query(ctx, call: OpCall) -> None:
    return None


RULES: dict[str, Rule] = {
    "linear": rule_linear,
    "conv": rule_conv,
    "layer_norm": rule_layer_norm,
    "batch_norm": rule_batch_norm,
    "elementwise": rule_elementwise,
    "unary": rule_unary,
    "like": rule_like,
    "pad": rule_pad,
    "roll": rule_roll,
    "reshape": rule_reshape,
    "permute": rule_permute,
    "transpose": rule_transpose,
    "expand": rule_expand,
    "cat": rule_cat,
    "stack": rule_stack,
    "unbind": rule_unbind,
    "split": rule_split,
    "chunk": rule_split,
    "getitem": rule_getitem,
    "select": rule_select,
    "slice": rule_slice,
    "matmul": rule_matmul,
    "sdpa": rule_sdpa,
    "softmax": rule_softmax,
    "normalize": rule_normalize,
    "sum": rule_sum,
    "mean": rule_mean,
    "amax": rule_amax,
    "norm": rule_norm,
    "shape_query": rule_shape_query,
}
