"""Soft gates on channels: a copy of the captured graph whose channel activations are multiplied by one gate
per atom where they are produced (Linear and convolution outputs). Data-driven criteria and the automatic
method differentiate through the gates.

A residual stream's channel cannot be gated where it is produced: the stream is a sum of many writers
(embeddings, position tables, class tokens, every block's projections), and its norms count every channel
in their statistics, so a zero there is not a removal. With ``stream_gates`` the stream's channels are gated
where the stream is *read* instead: every norm over a stream computes its mean and variance weighted by the
gates (``gated_norm``), and every Linear or convolution reading stream channels multiplies its input by them.
At gates of 0 and 1 that is exactly removal (``masked_reference.kept_statistics``: norms over the kept
channels, removed inputs zeroed); in between, a channel counts in the statistics and reaches the next layer
in proportion to its gate. With ``branches`` (residual branches, ``fxprune.depth``) each branch's output is
multiplied by one more gate before its residual add (a gate of 0 is exactly the branch removed).
"""
from __future__ import annotations

import copy
import operator
from typing import Sequence

import torch
import torch.fx as fx
from torch.fx.interpreter import Interpreter

from .analysis.labels import CHANNEL, Block, block_on
from . import meta
from .analysis.rules import spec_of
from .masked_reference import norm_arguments


def gated_norm(x: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float | None, rms: bool) -> torch.Tensor:
    """LayerNorm (RMSNorm with ``rms``) over the last dim with every channel weighted by its gate in the mean and
    the variance: at gates of 0 and 1, the norm over the kept channels (``norm_over_kept`` on those)."""
    gates = gates.to(x.dtype)
    total = gates.sum().clamp_min(torch.finfo(x.dtype).tiny)
    if eps is None:  # RMSNorm's default, as F.rms_norm
        eps = torch.finfo(x.dtype).eps
    if not rms:
        x = x - (x * gates).sum(-1, keepdim=True) / total
    y = x * torch.rsqrt((x * x * gates).sum(-1, keepdim=True) / total + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _stream_atoms(analysis) -> torch.Tensor:
    """Per atom: whether it is a channel of a residual stream."""
    stream = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    for group in analysis.groups:
        if group.kind == "residual":
            stream[torch.tensor(group.atoms, dtype=torch.long)] = True
    return stream


def gated_graph(analysis, *, stream_gates: bool = False, branches: Sequence = ()) -> fx.GraphModule:
    """A copy of the captured graph taking gates (one per atom) as its first input: ``gm(gates, *inputs)``.

    ``stream_gates``: residual stream channels are gated where the stream is read (norms, Linear inputs), not
    where it is written (module docstring). ``branches``: gate ``analysis.atoms.count + i`` multiplies the
    output of ``branches[i]`` before its residual add."""
    gm = copy.deepcopy(analysis.gm)
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(first):
        gates = gm.graph.placeholder(meta.GATES_PLACEHOLDER)
    stream = _stream_atoms(analysis) if stream_gates else torch.zeros(analysis.atoms.count, dtype=torch.bool)
    count = 0

    def gate_of(index: torch.Tensor, before: fx.Node) -> fx.Node:
        nonlocal count
        name = f"{meta.BUFFER_PREFIX}gate_index_{count}"
        count += 1
        gm.register_buffer(name, index, persistent=False)
        with gm.graph.inserting_before(before):
            return gm.graph.call_function(operator.getitem, (gates, gm.graph.get_attr(name)))

    for node in list(gm.graph.nodes):
        if stream.any() and node.meta.get(meta.STREAM_NORM):
            _gate_stream_norm(analysis, gm, node, gate_of)
            continue
        spec = spec_of(node.meta.get(meta.OP))
        if spec is None or not spec.produces_channels or node.meta.get(meta.CONST):
            continue
        if stream.any():
            _gate_stream_input(analysis, node, stream, gate_of)
        blocks = [b for b in node.meta.get(meta.LABELS) or () if b.level == CHANNEL]
        if not blocks or blocks[0].ids.shape[0] > 1:  # ids varying along the batch dim (heads merged into it)
            continue  # would not broadcast to other batch sizes; these channels are gated where produced
        index = analysis.atoms.atom_of[blocks[0].ids]
        if bool(stream[index].any()):
            continue  # a write into the stream: its channels are gated where the stream is read
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
    by_name = {n.name: n for n in gm.graph.nodes}
    for i, branch in enumerate(branches):
        add = by_name[branch.add]
        operand = add.args[1 - branch.skip]
        index = torch.tensor(analysis.atoms.count + i)
        gate = gate_of(index, add)
        with gm.graph.inserting_before(add):
            gated = gm.graph.call_function(operator.mul, (operand, gate))
        add.replace_input_with(operand, gated)
    gm.graph.lint()
    gm.recompile()
    return gm


def _gate_stream_norm(analysis, gm: fx.GraphModule, node: fx.Node, gate_of) -> None:
    """Replace the stream norm ``node`` by ``gated_norm`` with the gates of its input's last-dim channels."""
    x = node.meta[meta.OP].args.get("input")
    labels = x.meta.get(meta.LABELS) if isinstance(x, fx.Node) else None
    block = block_on(labels or (), len(x.meta[meta.VALUE].shape) - 1) if labels else None
    if block is None:
        return
    gate = gate_of(analysis.atoms.atom_of[block.ids.reshape(-1)], node)
    x, weight, bias, eps, rms = norm_arguments(gm, node)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(gated_norm, (x, gate, weight, bias, eps, rms))
    # its readers find the norm's labels on it (a Linear reading the stream gates its input by them)
    new.meta.update({k: v for k, v in node.meta.items() if k in (meta.LABELS, meta.VALUE)})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _gate_stream_input(analysis, node: fx.Node, stream: torch.Tensor, gate_of) -> None:
    """Multiply the input of a Linear / convolution ``node`` by the gates of the stream channels it reads."""
    from .analysis.rules import normalize

    x = normalize(node, node.graph.owning_module).args.get("input")  # this graph's node (meta is the analysed one's)
    if not isinstance(x, fx.Node):
        return
    labels = x.meta.get(meta.LABELS)
    for block in labels if isinstance(labels, tuple) else ():
        if isinstance(block, Block) and block.level == CHANNEL and block.ids.shape[0] == 1:
            index = analysis.atoms.atom_of[block.ids]
            if bool(stream[index].all()):
                gate = gate_of(index, node)
                with node.graph.inserting_before(node):
                    gated = node.graph.call_function(operator.mul, (x, gate))
                node.replace_input_with(x, gated)
                return


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
