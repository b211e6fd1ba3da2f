"""Attention: q·kᵀ pairs q and k channels per head and creates head ids; attn·v carries v's channels.

Written for the matrix products themselves (``matmul``) and for fused ``scaled_dot_product_attention``,
so any attention built from them is understood.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ... import meta
from ..labels import CHANNEL, HEAD, Block, Labels, block_on, merge
from .common import link_heads
from .registry import OpCall, register_op

_aten = torch.ops.aten


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


def _matmul_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    a = shape_of(call.args["input"])
    return math.prod(out) * a[-1] if a and len(a) >= 2 else 0


def _sdpa_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    q, k, v = (shape_of(call.args[n]) for n in ("query", "key", "value"))
    if not (q and k and v):
        return 0
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


@register_op("matmul", ("input", "other"), functions=[torch.matmul, torch.bmm, operator.matmul],
             methods=["matmul", "bmm"], aten=[_aten.matmul.default, _aten.bmm.default], macs=_matmul_macs)
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
                ctx.node.meta[meta.ATTENTION_OUTPUT] = True
    out.extend(carried)
    for head in (b for b in out if b.level == HEAD):
        for channel in (b for b in carried if b.level == CHANNEL):
            link_heads(ctx, head, channel)
    return merge(ctx.ch, out)


@register_op("sdpa", ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
             functions=[F.scaled_dot_product_attention], aten=[_aten.scaled_dot_product_attention.default],
             macs=_sdpa_macs)
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
            ctx.node.meta[meta.ATTENTION_OUTPUT] = True
            ctx.ch.tag(block.ids, "v")
            ctx.ch.record_rows(block.rows())
            out.append(block)
            if heads is not None:
                link_heads(ctx, heads, block)
        else:
            ctx.freeze(block.ids, f"value of attention has {block.level} ids along dim {block.dim}")
    _follow_mask(ctx, call.args.get("attn_mask"), heads, ndim)
    return merge(ctx.ch, out)


def _follow_mask(ctx, mask: Any, heads: Block | None, ndim: int) -> None:
    """An attention mask or additive bias with a head dim (relative position bias, ALiBi) loses the heads the
    attention loses; one whose head dim carries no head ids (its origin has no rule) freezes the heads."""
    mask_shape = ctx.shape(mask) if mask is not None else None
    if not mask_shape:
        return
    pad = ndim - len(mask_shape)
    covered = False
    for block in (b.unsqueezed(pad) for b in ctx.labels(mask)):
        if heads is not None and block.dim == heads.dim:  # a per-head bias (or a mask repeated per head)
            ctx.ch.union(block.ids, heads.ids)
            covered = True
        else:
            ctx.freeze(block.ids, "attention mask carries ids outside the head dim")
    head_dim = heads.dim - pad if heads is not None else -1
    if heads is not None and not covered and 0 <= head_dim and mask_shape[head_dim] > 1:
        ctx.freeze(heads.ids, f"attention mask {ctx.describe(mask)} has a head dim that cannot follow the heads")


def _einsum_subscripts(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """Per-operand subscripts and the output's, with ``...`` spelled out as one symbol per broadcast dim
    (right-aligned, as einsum broadcasts them); None for an equation that does not fit the operands."""
    equation = equation.replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    width = max((n - len(t.replace("...", "")) for t, n in zip(terms, ndims) if "..." in t), default=0)
    spelled = [chr(0x2460 + i) for i in range(width)]  # symbols no equation uses (circled digits)

    def expand(term: str, ndim: int) -> str:
        if "..." not in term:
            return term
        n = ndim - len(term.replace("...", ""))
        return term.replace("...", "".join(spelled[width - n:]))

    subs = [expand(t, n) for t, n in zip(terms, ndims)]
    if any(len(s) != n for s, n in zip(subs, ndims)):
        return None
    if arrow:
        out = rhs.replace("...", "".join(spelled))
    else:  # implicit output: broadcast dims, then the letters used once, in alphabetical order
        letters = "".join(subs)
        out = "".join(spelled) + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in spelled))
    return subs, out


def _bind_einsum(node, args: tuple, kwargs: dict) -> dict | None:
    equation = args[0] if args else kwargs.get("equation")
    rest = list(args[1:]) or list(kwargs.get("tensors", kwargs.get("operands", [])))
    if len(rest) >= 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])  # torch.einsum(eq, [a, b]) and aten.einsum(eq, [a, b], path)
    return {"equation": equation, "operands": rest} if isinstance(equation, str) else None


def _einsum_macs(call: OpCall, out: tuple, shape_of: Callable[[Any], tuple | None]) -> int:
    shapes = [shape_of(x) for x in call.args["operands"]]
    if any(s is None for s in shapes):
        return 0
    parsed = _einsum_subscripts(call.args["equation"], [len(s) for s in shapes])
    if parsed is None:
        return 0
    sizes: dict[str, int] = {}
    for sub, shape in zip(parsed[0], shapes):
        for letter, n in zip(sub, shape):
            sizes[letter] = max(sizes.get(letter, 1), n)
    return math.prod(sizes.values()) if len(shapes) > 1 else 0


@register_op("einsum", ("equation", "*operands"), functions=[torch.einsum], aten=[_aten.einsum.default],
             bind=_bind_einsum, macs=_einsum_macs)
def rule_einsum(ctx, call: OpCall) -> Labels:
    """Any einsum, read letter by letter: a contracted letter couples the operands' channels along it (q·kᵀ
    when both are activations: q/k pairs and fresh head ids, as ``matmul``), a letter kept in the output
    carries its channels there (attn·v: v's channels), a letter summed in one operand only is a sum (a zeroed
    channel adds nothing). Repeated letters (diagonals) freeze what they touch."""
    operands = call.args["operands"]
    shapes = [ctx.shape(x) for x in operands]
    labels = [ctx.labels(x) for x in operands]
    parsed = None if any(s is None for s in shapes) else _einsum_subscripts(call.args["equation"], [len(s) for s in shapes])
    if parsed is None or any(len(set(s)) != len(s) for s in parsed[0]) or len(set(parsed[1])) != len(parsed[1]):
        for x in labels:
            ctx.freeze_labels(x, f"einsum '{call.args['equation']}' with repeated indices is not supported")
        return ()
    subs, out = parsed
    letters = sorted(set("".join(subs)) | set(out))

    def to_letters(block: Block, sub: str) -> tuple[torch.Tensor, str]:
        """The block's ids laid out over all letters (size 1 where the operand lacks the letter)."""
        order = [sub.index(c) for c in letters if c in sub]
        ids = block.ids.permute(order).reshape([block.ids.shape[sub.index(c)] if c in sub else 1 for c in letters])
        return ids, sub[block.dim]

    blocks = []  # (operand index, ids over letters, channel letter, level)
    for i, (sub, lab) in enumerate(zip(subs, labels)):
        for block in lab:
            ids, letter = to_letters(block, sub)
            blocks.append((i, ids, letter, block.level))
    activation = [not ctx.is_const(x) for x in operands]
    out_blocks: list[Block] = []
    heads: list[Block] = []
    for letter in letters:
        on = [b for b in blocks if b[2] == letter]
        holders = [i for i, sub in enumerate(subs) if letter in sub and shapes[i][sub.index(letter)] > 1]
        if letter in out:
            continue
        for i, ids, _, level in on:
            if level != CHANNEL:
                ctx.freeze(ids, f"{level} ids along a contracted dim")
        channel = [b for b in on if b[3] == CHANNEL]
        if len(holders) == 1:
            continue  # summed within one operand: a zeroed channel adds nothing
        missing = [i for i in holders if not any(b[0] == i for b in channel)]
        if missing:
            for _, ids, _, _ in channel:
                ctx.freeze(ids, f"contracted with {ctx.describe(operands[missing[0]])}, which has no prunable channels")
            continue
        joint = channel[0][1]
        for _, ids, _, _ in channel[1:]:
            ctx.ch.union(joint, ids)
            joint = torch.broadcast_tensors(joint, ids)[0]
        if len(holders) == 2 and all(activation[i] for i in holders):
            moved = joint.movedim(letters.index(letter), -1)
            ctx.ch.tag(moved, "qk")
            ctx.ch.record_rows(moved)
            row_letters = [c for c in letters if c != letter and joint.shape[letters.index(c)] > 1]
            if len(row_letters) == 1 and row_letters[0] in out and all(row_letters[0] in subs[i] for i in holders):
                r = letters.index(row_letters[0])
                n = joint.shape[r]
                head_ids = ctx.ch.space(f"<heads:{ctx.node.name}>", 0, n, True)
                ctx.ch.record_heads(head_ids, moved.movedim(r, 0).reshape(n, -1))
                view = [1] * len(out)
                view[out.index(row_letters[0])] = n
                heads.append(Block(head_ids.reshape(view), out.index(row_letters[0]), HEAD))
    both = sum(activation) >= 2
    for i, ids, letter, level in blocks:
        if letter not in out:
            continue
        gone = tuple(letters.index(c) for c in letters if c not in out and ids.shape[letters.index(c)] > 1)
        if gone:
            ids = ctx.ch.union_within(ids, gone)
        kept = ids.permute([letters.index(c) for c in out] + [letters.index(c) for c in letters if c not in out])
        kept = kept.reshape(kept.shape[:len(out)])
        block = Block(kept, out.index(letter), level)
        if both and activation[i] and level == CHANNEL:
            ctx.ch.tag(block.ids, "v")
            ctx.ch.record_rows(block.rows())
            ctx.node.meta[meta.ATTENTION_OUTPUT] = True
        out_blocks.append(block)
    for head in (b for b in heads + out_blocks if b.level == HEAD):
        for channel in (b for b in out_blocks if b.level == CHANNEL):
            link_heads(ctx, head, channel)
    return merge(ctx.ch, heads + out_blocks)


def _timm_function(module: str, name: str) -> list:
    try:
        return [getattr(__import__(module, fromlist=[name]), name)]
    except (ImportError, AttributeError):  # pragma: no cover - timm is optional
        return []


@register_op("mvit_rel_pos", ("attn", "q", "has_cls_token", "q_size", "k_size", "rel_pos_h", "rel_pos_w"),
             functions=_timm_function("timm.models.mvitv2", "cal_rel_pos_type"))
def rule_mvit_rel_pos(ctx, call: OpCall) -> Labels:
    """MViT-v2's ``cal_rel_pos_type``: q's channels meet two (positions, d) tables every head shares (einsum
    over d) and the products are added into the attention map in place. The tables' columns join q's
    channels in every head (the same offsets); their rows are gathered by position. The map keeps its ids."""
    q = call.args["q"]
    for name in ("rel_pos_h", "rel_pos_w"):
        table = call.args[name]
        labels = ctx.labels(table)
        rows, columns = block_on(labels, 0), block_on(labels, 1)
        if rows is not None:
            ctx.freeze(rows.ids, f"relative positions of {ctx.describe(table)} are gathered by position")
        q_block = block_on(ctx.labels(q), len(ctx.shape(q)) - 1)
        if columns is not None and q_block is not None:
            ctx.ch.union(q_block.ids, columns.ids.reshape(-1))
        elif columns is not None:
            ctx.freeze(columns.ids, f"{ctx.describe(table)} meets a query without prunable channels")
        elif q_block is not None:
            ctx.freeze(q_block.ids, f"the query meets {ctx.describe(table)}, which has no prunable channels")
    return ctx.labels(call.args["attn"])
