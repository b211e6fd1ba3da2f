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


@dataclass(frozen=True)
class Block:
    ids: torch.Tensor
    dim: int

    def unsqueezed(self, leading: int) -> "Block":
        """The same block seen from a tensor with ``leading`` extra leading dims (broadcasting)."""
        if leading == 0:
            return self
        return Block(self.ids.reshape((1,) * leading + tuple(self.ids.shape)), self.dim + leading)

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


def make_block(ids: torch.Tensor, dim: int) -> Block:
    return Block(compact(ids, dim), dim)


def merge(ch: ChannelIds, blocks: Iterable[Block]) -> Labels:
    """Blocks on the same channel dimension describe the same positions: couple them into one."""
    by_dim: dict[int, torch.Tensor] = {}
    for block in blocks:
        existing = by_dim.get(block.dim)
        if existing is None:
            by_dim[block.dim] = block.ids
        else:
            ch.union(existing, block.ids)
            by_dim[block.dim] = torch.broadcast_tensors(existing, block.ids)[0]
    return tuple(make_block(ids, d) for d, ids in sorted(by_dim.items()))


def block_on(labels: Labels, dim: int) -> Block | None:
    """The block whose channels lie along ``dim`` (a block with rows along ``dim`` is re-read that way)."""
    for block in labels:
        if block.dim == dim:
            return block
    for block in labels:
        if block.ids.shape[dim] > 1:
            return Block(block.ids, dim)
    return None


def param_labels(ch: ChannelIds, name: str, shape: Sequence[int], virtual: bool = False) -> Labels:
    """Every dimension of size > 1 of a parameter is a candidate channel space of its own."""
    blocks = []
    for d, n in enumerate(shape):
        if n > 1:
            view = [1] * len(shape)
            view[d] = n
            blocks.append(Block(ch.space(name, d, n, virtual).reshape(view), d))
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
    return make_block(ids, new_dim)
