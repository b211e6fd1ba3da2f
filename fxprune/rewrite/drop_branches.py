"""Pass: remove whole residual branches (``depth.py``): each ``add(x, f(x))`` becomes ``x``, and what only
``f`` used (its nodes, modules and parameters) goes with it."""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..depth import live_nodes


def bypass(graph: fx.Graph, branches: Iterable) -> None:
    """Replace each branch's ``add(x, f(x))`` by ``x`` and drop the nodes nothing reads any more."""
    by_add = {b.add: b for b in branches}
    for node in list(graph.nodes):
        branch = by_add.get(node.name)
        if branch is not None:
            node.replace_all_uses_with(node.args[branch.skip])
            graph.erase_node(node)
    _drop_orphaned_asserts(graph)
    # an unused attention (SDPA is tagged random, for its dropout) or random op is dead too: removing it changes
    # no value, only what a random generator is asked for
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))


def _drop_orphaned_asserts(graph: fx.Graph) -> None:
    """torch.export's graphs assert tensors' metadata (``aten._assert_tensor_metadata``): side effects, so dead
    code elimination keeps them and, through them, the part of a removed branch they check. An assert reading
    a value the output no longer needs goes."""
    live = live_nodes(graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and "_assert" in str(node.target) and not node.users \
                and any(source not in live for source in node.all_input_nodes):
            graph.erase_node(node)


def drop_branches(gm: fx.GraphModule, branches: Iterable) -> PassResult:
    branches = list(branches)
    if not branches:
        return PassResult(gm, False)
    bypass(gm.graph, branches)
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
