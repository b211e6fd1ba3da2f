"""Helpers shared by the rule families: dims, reductions over ids, head ownership."""
from __future__ import annotations

from typing import Any, Sequence

from ..labels import Block


def dims_of(dim: Any, ndim: int) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, (list, tuple)):
        return sorted(d % ndim for d in dim)
    return [dim % ndim]


def drop_dims(block: Block, dims: Sequence[int]) -> Block:
    """Remove size-1 dims ``dims`` from a block's ids."""
    ids = block.ids
    new_dim = block.dim
    for d in sorted(dims, reverse=True):
        ids = ids.squeeze(d) if ids.ndim > 0 else ids
        if d < new_dim:
            new_dim -= 1
    return Block(ids, new_dim, block.level)


def whole_rows(ctx, block: Block, dims: Sequence[int], why: str) -> None:
    """The ids along ``dims`` are reduced together (normalised, softmaxed): each such set goes whole."""
    ids = block.ids
    rest = [d for d in range(ids.ndim) if d not in dims]
    width = 1
    for d in dims:
        width *= ids.shape[d]
    ctx.whole(ids.permute(*rest, *dims).reshape(-1, width), why)


def link_heads(ctx, head: Block, channel: Block) -> None:
    """A head block and a channel block with rows along the head dim: head h owns row h."""
    if channel.ids.shape[head.dim] != head.ids.shape[head.dim]:
        return
    heads = head.ids.movedim(head.dim, 0).reshape(head.ids.shape[head.dim], -1)[:, 0]
    rows = channel.ids.movedim(head.dim, 0).reshape(channel.ids.shape[head.dim], -1)
    ctx.ch.record_heads(heads, rows)
