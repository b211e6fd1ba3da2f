"""Pass: a grouped convolution (not depthwise) keeps, in each group, the weight columns of its kept inputs.

Group g of a convolution with ``groups`` groups reads input channels [g * n, (g + 1) * n) through weight
columns 0..n-1 of its own rows, so its columns follow the input channels of that group alone (the analysis
records them as ``GroupedInput``, rules/linear.py). Every group keeps as many inputs (and outputs); a group
that loses every input and every output goes, and the group count with it. Runs before slice_parameters,
which then removes the output rows.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..analysis.labels import GroupedInput
from ..errors import RewriteError
from .slice_parameters import _owner


def _kept_columns(grouped: GroupedInput, atom_of: torch.Tensor, removed: torch.Tensor, out_rows: torch.Tensor,
                  per_group: int, node: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(groups kept, (groups kept, columns kept) column indices), or None where every column stays."""
    kept = ~removed[atom_of[grouped.ids]]  # (groups, inputs per group)
    if bool(kept.all()):
        return None
    out_alive = torch.zeros(grouped.groups, dtype=torch.bool)
    out_alive[torch.unique(out_rows // per_group)] = True
    in_alive = kept.any(1)
    if not torch.equal(in_alive, out_alive):
        raise RewriteError(f"fxprune: grouped convolution '{node}' would keep a group's inputs without its outputs "
                           "(or the reverse)")
    counts = kept[in_alive].sum(1)
    if int(counts.min()) != int(counts.max()):
        raise RewriteError(f"fxprune: the groups of convolution '{node}' keep different input counts")
    return torch.nonzero(in_alive).flatten(), torch.stack([torch.nonzero(row).flatten() for row in kept[in_alive]])


def slice_grouped(gm: fx.GraphModule, atom_of: torch.Tensor, removed: torch.Tensor,
                  keep: dict[str, dict[int, torch.Tensor]]) -> PassResult:
    """Pass: every grouped convolution whose inputs lose channels gets each group's kept weight columns."""
    modified = False
    for node in gm.graph.nodes:
        grouped = node.meta.get(meta.GROUPED_INPUT)
        if grouped is None:
            continue
        owner, attr = _owner(gm, grouped.weight)
        weight = getattr(owner, attr)
        out_rows = keep.get(grouped.weight, {}).get(0, torch.arange(weight.shape[0]))
        per_group = weight.shape[0] // grouped.groups  # output rows of one group
        found = _kept_columns(grouped, atom_of, removed, out_rows, per_group, node.name)
        if found is None:
            continue
        alive, columns = found
        # the rows of a removed group take any columns: slice_parameters removes them next
        index = torch.zeros(grouped.groups, columns.shape[1], dtype=torch.long)
        index[alive] = columns
        index = index.repeat_interleave(per_group, 0)  # (out rows, columns kept)
        new = torch.gather(weight.detach(), 1, index.reshape(*index.shape, *([1] * (weight.ndim - 2))).expand(
            -1, -1, *weight.shape[2:])).contiguous()
        if isinstance(weight, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=weight.requires_grad))
        else:
            owner.register_buffer(attr, new)
        groups = int(alive.numel())
        if node.op == "call_module" and isinstance(owner, nn.modules.conv._ConvNd):
            owner.groups = groups  # slice_parameters then sets in_channels from the weight and the groups
            owner.in_channels = new.shape[1] * groups
        elif groups != grouped.groups:  # a functional / ATen convolution bakes its group count (7th argument)
            if len(node.args) > 6:
                node.args = (*node.args[:6], groups, *node.args[7:])
            else:
                node.kwargs = {**node.kwargs, "groups": groups}
        modified = True
    return PassResult(gm, modified)
