"""Channel labels of a tensor value.

A ``Block`` says which channel id sits at each position of a tensor along its channel dimension. Its
``ids`` tensor has the value's number of dimensions; a dimension is 1 where ids do not vary along it
(broadcast). Dimensions other than ``dim`` along which ids vary are *rows*: after ``(B, N, C) ->
(B, N, H, D)`` the ids have shape (1, 1, H, D), channel dim 3 and one row per head. A tensor carries at
most one block per channel dimension (e.g. kᵀv in linear attention carries k's and v's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .channels import ChannelIds


CHANNEL, HEAD, FREE = "channel", "head", "free"


@dataclass(frozen=True)
class Block:
    """Ids along ``dim`` (and rows along other dims). ``level`` says what the ids index:

    - ``channel``: channels (rows of weights, per-channel parameters);
    - ``head``: whole attention heads (an attention map's head dim, per-head tables and scales);
    - ``free``: copies made by expanding a constant to a literal size (a mask over heads); they take the
      level of whatever they are combined with.
    """

    ids: torch.Tensor
    dim: int
    level: str = CHANNEL

    def moved(self, ids: torch.Tensor, dim: int) -> "Block":
        """A block of the same level with other ids or another channel dim."""
        return Block(compact(ids, dim), dim, self.level)

    def unsqueezed(self, leading: int) -> "Block":
        """The same block seen from a tensor with ``leading`` extra leading dims (broadcasting)."""
        if leading == 0:
            return self
        return Block(self.ids.reshape((1,) * leading + tuple(self.ids.shape)), self.dim + leading, self.level)

    def row_dims(self) -> list[int]:
        return [d for d, n in enumerate(self.ids.shape) if n > 1 and d != self.dim]

    def rows(self) -> torch.Tensor:
        """Ids as (rows, channels): one row per position of the other dims."""
        return self.ids.movedim(self.dim, -1).reshape(-1, self.ids.shape[self.dim])


Labels = tuple  # tuple[Block, ...] for a tensor; list[Labels] for a tuple of tensors; None otherwise


def compact(ids: torch.Tensor, keep_dim: int) -> torch.Tensor:
    """Shrink to size 1 every dimension (but ``keep_dim``) along which ids do not vary."""
    for d in range(ids.ndim):
        if d != keep_dim and ids.shape[d] > 1 and bool((ids == ids.narrow(d, 0, 1)).all()):
            ids = ids.narrow(d, 0, 1)
    return ids.contiguous()


def make_block(ids: torch.Tensor, dim: int, level: str = CHANNEL) -> Block:
    return Block(compact(ids, dim), dim, level)


def merge(ch: ChannelIds, blocks: Iterable[Block]) -> Labels:
    """Blocks of one level on the same dimension describe the same positions: couple them into one.

    A free block takes the level of another block on its dim (head first), else stays free.
    """
    blocks = list(blocks)
    levels_on: dict[int, set[str]] = {}
    for block in blocks:
        if block.level != FREE:
            levels_on.setdefault(block.dim, set()).add(block.level)
    merged: dict[tuple[int, str], torch.Tensor] = {}
    for block in blocks:
        level = block.level
        if level == FREE:
            present = levels_on.get(block.dim, set())
            level = HEAD if HEAD in present else CHANNEL if CHANNEL in present else FREE
        key = (block.dim, level)
        existing = merged.get(key)
        if existing is None:
            merged[key] = block.ids
        else:
            ch.union(existing, block.ids)
            merged[key] = torch.broadcast_tensors(existing, block.ids)[0]
    return tuple(make_block(ids, d, level) for (d, level), ids in sorted(merged.items()))


def block_on(labels: Labels, dim: int, level: str = CHANNEL) -> Block | None:
    """The ``level`` block whose ids lie along ``dim`` (a block with rows along ``dim`` is re-read that way)."""
    for block in labels:
        if block.dim == dim and block.level == level:
            return block
    for block in labels:
        if block.level == level and block.ids.shape[dim] > 1:
            return Block(block.ids, dim, level)
    return None


@dataclass
class RowGather:
    """Operand ``arg`` of a node, read per row: ``ids`` (aligned to the node's output dims) has one row of
    channel ids per position of ``row_dim`` and the channels along ``channel_dim``."""

    arg: int
    ids: torch.Tensor
    row_dim: int
    channel_dim: int


@dataclass
class GroupedInput:
    """The input of a grouped convolution (``groups`` > 1, not depthwise): ``ids`` (groups, channels per group)
    are the input channel ids of each group, read by the weight ``weight``'s columns (dim 1) of that group
    only, so each group keeps its own columns; ``groups`` is the original group count."""

    weight: str
    ids: torch.Tensor
    groups: int


def param_labels(ch: ChannelIds, name: str, shape: Sequence[int], virtual: bool = False, level: str = CHANNEL) -> Labels:
    """Every dimension of size > 1 of a parameter is a candidate channel space of its own."""
    blocks = []
    for d, n in enumerate(shape):
        if n > 1:
            view = [1] * len(shape)
            view[d] = n
            blocks.append(Block(ch.space(name, d, n, virtual).reshape(view), d, level))
    return tuple(blocks)


def reshape_groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of source and destination dims with equal products (row-major reshape)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi: list[int] = []
        gj: list[int] = []
        pa = pb = 1
        if i < len(src):
            gi.append(i)
            pa *= src[i]
            i += 1
        if j < len(dst):
            gj.append(j)
            pb *= dst[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(src):
                gi.append(i)
                pa *= src[i]
                i += 1
            elif j < len(dst):
                gj.append(j)
                pb *= dst[j]
                j += 1
            else:  # products cannot match: the shapes are inconsistent
                break
        groups.append((gi, gj))
    return groups


def reshape_block(block: Block, src: Sequence[int], dst: Sequence[int]) -> Block | None:
    """The block after a row-major reshape from ``src`` to ``dst``; None if it cannot be followed."""
    mat_in = [1] * len(src)
    mat_out = [1] * len(dst)
    new_dim = None
    for gi, gj in reshape_groups(src, dst):
        if block.dim in gi or any(block.ids.shape[i] > 1 for i in gi):
            for i in gi:
                mat_in[i] = src[i]
            for j in gj:
                mat_out[j] = dst[j]
            if block.dim in gi:
                varying = [j for j in gj if dst[j] > 1]
                if not varying:
                    return None
                new_dim = varying[-1]
    if new_dim is None:
        return None
    ids = block.ids.expand(mat_in).reshape(mat_out)
    return make_block(ids, new_dim, block.level)
