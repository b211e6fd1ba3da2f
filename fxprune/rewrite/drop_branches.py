"""Pass: remove whole residual branches (``depth.py``): each ``add(x, f(x))`` becomes ``x``, and what only
``f`` used (its nodes, modules and parameters) goes with it."""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult


def drop_branches(gm: fx.GraphModule, branches: Iterable) -> PassResult:
    branches = list(branches)
    by_add = {b.add: b for b in branches}
    for node in list(gm.graph.nodes):
        branch = by_add.get(node.name)
        if branch is not None:
            node.replace_all_uses_with(node.args[branch.skip])
            gm.graph.erase_node(node)
    if not branches:
        return PassResult(gm, False)
    gm.graph.eliminate_dead_code()
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in sorted(set().union(*(b.parameters for b in branches)) - used):
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue  # its module went already
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True)
