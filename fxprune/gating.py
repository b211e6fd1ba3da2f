"""Soft gates on channels: a copy of the captured graph whose channel activations are multiplied by one gate
per atom where they are produced (Linear and convolution outputs). Data-driven criteria and the automatic
method differentiate through the gates."""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch.fx.interpreter import Interpreter

from .analysis.labels import CHANNEL
from . import meta
from .analysis.rules import spec_of



def gated_graph(analysis) -> fx.GraphModule:
    """A copy of the captured graph taking gates (one per atom) as its first input: ``gm(gates, *inputs)``."""
    gm = copy.deepcopy(analysis.gm)
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(first):
        gates = gm.graph.placeholder(meta.GATES_PLACEHOLDER)
    count = 0
    for node in list(gm.graph.nodes):
        spec = spec_of(node.meta.get(meta.OP))
        if spec is None or not spec.produces_channels or node.meta.get(meta.CONST):
            continue
        blocks = [b for b in node.meta.get(meta.LABELS) or () if b.level == CHANNEL]
        if not blocks or blocks[0].ids.shape[0] > 1:  # ids varying along the batch dim (heads merged into it)
            continue  # would not broadcast to other batch sizes; these channels are gated where produced
        index = analysis.atoms.atom_of[blocks[0].ids]
        name = f"{meta.BUFFER_PREFIX}gate_index_{count}"
        count += 1
        gm.register_buffer(name, index, persistent=False)
        with gm.graph.inserting_after(node):
            idx = gm.graph.get_attr(name)
        with gm.graph.inserting_after(idx):
            gate = gm.graph.call_function(operator.getitem, (gates, idx))
        with gm.graph.inserting_after(gate):
            gated = gm.graph.call_function(operator.mul, (node, gate))
        node.replace_all_uses_with(gated, delete_user_cb=lambda user: user is not gated)
    gm.graph.lint()
    gm.recompile()
    return gm


class AttentionRecorder(Interpreter):
    """Runs a gated graph and keeps every attention output (the ·V products) for the loss."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.outputs: list[torch.Tensor] = []

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n.meta.get(meta.ATTENTION_OUTPUT) and isinstance(result, torch.Tensor):
            self.outputs.append(result)
        return result
