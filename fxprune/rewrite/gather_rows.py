"""Pass: a table shared by every head (a rotary embedding's cos and sin) is read per head.

Where a table without a head dim multiplies per-head channels, the analysis gives each head its own copy
of the table's ids (``RowGather`` on the consuming node) instead of forcing every head to keep the same
channel offsets. After pruning, the table keeps its full width and each surviving head gathers the
columns of the channels it kept: heads choose their own channels, and whole heads (kv groups) can go.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..analysis.labels import RowGather
from ..errors import RewriteError


def gather_per_row(x: torch.Tensor, index: torch.Tensor, row_dim: int, channel_dim: int, ndim: int) -> torch.Tensor:
    """``out[..., r, ..., j] = x[..., 0, ..., index[r, j]]``: row ``r`` reads the columns ``index[r]`` of a
    table ``x`` that is the same for every row (size 1, or missing, along ``row_dim < channel_dim``)."""
    for _ in range(ndim - x.ndim):
        x = x.unsqueeze(0)
    picked = x.index_select(channel_dim, index.reshape(-1)).unflatten(channel_dim, tuple(index.shape))
    return picked.movedim(channel_dim, row_dim).squeeze(row_dim + 1)


def kept_columns(gather: RowGather, atom_of: torch.Tensor, removed: torch.Tensor, node: str) -> torch.Tensor | None:
    """(surviving rows, kept channels) column indices, or None where every row keeps every column."""
    kept = ~removed[atom_of[gather.ids]]
    kept = kept.movedim((gather.row_dim, gather.channel_dim), (0, 1)).reshape(kept.shape[gather.row_dim],
                                                                            kept.shape[gather.channel_dim], -1)[..., 0]
    if bool(kept.all()):
        return None
    rows = kept[kept.any(1)]
    counts = rows.sum(1)
    if int(counts.min()) != int(counts.max()):
        raise RewriteError(f"fxprune: heads keep different channel counts where node '{node}' reads a shared table")
    return torch.stack([torch.nonzero(row).flatten() for row in rows])


def gather_rows(gm: fx.GraphModule, atom_of: torch.Tensor, removed: torch.Tensor) -> PassResult:
    """Pass: every operand the analysis reads per row gets a gather of the columns each row kept."""
    modified = False
    for node in list(gm.graph.nodes):
        for gather in node.meta.get(meta.ROW_GATHER) or ():
            index = kept_columns(gather, atom_of, removed, node.name)
            if index is None:
                continue
            name = f"{meta.BUFFER_PREFIX}columns_{node.name}_{gather.arg}"
            gm.register_buffer(name, index, persistent=False)
            with gm.graph.inserting_before(node):
                table = gm.graph.get_attr(name)
                picked = gm.graph.call_function(gather_per_row, (node.args[gather.arg], table, gather.row_dim,
                                                                 gather.channel_dim, len(gather.ids.shape)))
            args = list(node.args)
            args[gather.arg] = picked
            node.args = tuple(args)
            modified = True
    return PassResult(gm, modified)
