"""Optional pass: untie a depthwise convolution that every head shares into one per-head grouped convolution.

A depthwise conv applied to ``(batch * heads, head_dim, h, w)`` (FLatten's DWC on V) uses the same filters in
every head, which forces every head to keep the same channel offsets and forbids removing whole heads. The
untied conv runs on ``(batch, heads * head_dim, h, w)`` with the filters repeated per head: numerically the
same, but each head now owns its filters. Runs on the labels of a first analysis (they tell the head count);
each rewrite is checked on a batch of two before it is kept.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..analysis.labels import CHANNEL
from . import Captured
from .values import TensorValue


def _shared_heads(node: fx.Node) -> int:
    """How many heads share the depthwise conv at ``node`` (rows of its input's channel ids), or 0."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return 0
    block = next((b for b in x.meta.get(meta.LABELS) or () if b.level == CHANNEL and b.dim == 1), None)
    value = x.meta.get(meta.VALUE)
    if block is None or not isinstance(value, TensorValue) or block.ids.shape[0] <= 1:
        return 0
    heads = torch.unique(block.ids.reshape(block.ids.shape[0], -1), dim=0).shape[0]
    return heads if heads > 1 and value.shape[0] % heads == 0 else 0


def _untied(conv: nn.Conv2d, heads: int) -> nn.Conv2d:
    width = conv.in_channels * heads
    new = nn.Conv2d(width, width, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=width,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(conv.weight.repeat(heads, 1, 1, 1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.repeat(heads))
    return new.train(conv.training)


def _rewrite(gm: fx.GraphModule, node: fx.Node, heads: int) -> None:
    conv = gm.get_submodule(str(node.target))
    x = node.args[0]
    _, channels, height, width = x.meta[meta.VALUE].shape
    _, _, out_h, out_w = node.meta[meta.VALUE].shape
    path, _, attr = str(node.target).rpartition(".")
    setattr(gm.get_submodule(path) if path else gm, attr, _untied(conv, heads))
    with gm.graph.inserting_before(node):
        merged = gm.graph.call_method("reshape", (x, -1, heads * channels, height, width))
    node.args = (merged,)
    with gm.graph.inserting_after(node):
        split = gm.graph.call_method("reshape", (node, -1, channels, out_h, out_w))
    node.replace_all_uses_with(split, delete_user_cb=lambda user: user is not split)


def _doubled(inputs: tuple) -> tuple:
    generator = torch.Generator().manual_seed(1)
    return tuple(torch.cat([t, torch.randn(t.shape, generator=generator, dtype=t.dtype)]) if isinstance(t, torch.Tensor)
                 else t for t in inputs)


def untie_shared_convs(captured: Captured) -> PassResult:
    """Pass: untie every head-shared depthwise conv of ``captured.gm`` in place."""
    gm = captured.gm
    done = []
    inputs = _doubled(captured.example_inputs)
    with torch.no_grad():
        expected = gm(*inputs)
    if not isinstance(expected, torch.Tensor):
        return PassResult(gm, False)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        conv = gm.get_submodule(str(node.target))
        if type(conv) is not nn.Conv2d or not (conv.groups == conv.in_channels == conv.out_channels):
            continue
        heads = _shared_heads(node)
        if not heads:
            continue
        trial = copy.deepcopy(gm)
        trial_node = next(n for n in trial.graph.nodes if n.name == node.name)
        _rewrite(trial, trial_node, heads)
        trial.recompile()
        with torch.no_grad():
            actual = trial(*inputs)
        if torch.allclose(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())):
            _rewrite(gm, node, heads)
            gm.recompile()
            done.append(str(node.target))
    gm.graph.lint()
    return PassResult(gm, bool(done))
