"""Pass: a middle range of channels sliced by position (``qkv[..., a:b]``, a fused q/k/v projection's k) starts
where the channels kept before it end.

The analysis records the ids before each such range (``meta.SLICE_PREFIX``); this pass counts the ones the
plan keeps and leaves the new start on the node (``meta.SLICE_START``), where the slice's ``resize``
(``analysis/rules/indexing.py``) reads it.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..analysis.labels import Block
from ..errors import RewriteError


def kept_before(prefix: Block, atom_of: torch.Tensor, removed: torch.Tensor, node: str) -> int:
    """How many channels of ``prefix`` every row keeps (rows whose channels are all gone do not count)."""
    kept = (~removed[atom_of[prefix.ids]]).sum(dim=prefix.dim).reshape(-1)
    alive = kept[kept > 0]
    if alive.numel() and int(alive.min()) != int(alive.max()):
        raise RewriteError(f"fxprune: rows keep different channel counts before the range node '{node}' slices")
    return int(alive[0]) if alive.numel() else 0


def slice_starts(gm: fx.GraphModule, atom_of: torch.Tensor, removed: torch.Tensor) -> PassResult:
    """Pass: every middle-range slice learns its new start (nothing in the graph changes here)."""
    found = False
    for node in gm.graph.nodes:
        prefixes = node.meta.get(meta.SLICE_PREFIX)
        if prefixes:
            node.meta[meta.SLICE_START] = {d: kept_before(p, atom_of, removed, node.name) for d, p in prefixes.items()}
            found = True
    return PassResult(gm, found)
