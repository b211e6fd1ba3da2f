"""The copy of the analysed graph module that the rewrite passes change.

``copy.deepcopy`` of a GraphModule deep-copies every module's ``__dict__`` (hooks, buffers' and children's
dicts, plain attributes) and then builds a new GraphModule from that copy anyway: on ViT-B that was a fifth
of the rewrite's time, nearly all of it Python objects, not tensors. The passes need less: their own graph,
module objects whose attributes and tensor slots they can replace, and tensors the result owns.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn


def editable_copy(gm: fx.GraphModule, sliced: dict[int, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph and module objects. Tensors in ``sliced`` (by id) are shared: the
    passes replace them by sliced copies and never write into them. Every other parameter and buffer is
    copied, so the pruned model never shares a tensor with the user's model (tied ones stay tied)."""
    memo: dict[int, object] = dict(sliced)
    copies: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in copies:  # a module used twice stays one module
            return copies[id(module)]
        new = copy.copy(module)  # a new object whose __dict__ is a new dict holding the same values
        copies[id(module)] = new
        new._parameters = {k: copy.deepcopy(p, memo) for k, p in module._parameters.items()}
        new._buffers = {k: copy.deepcopy(b, memo) for k, b in module._buffers.items()}
        new._modules = {k: None if c is None else copy_module(c) for k, c in module._modules.items()}
        return new

    root = nn.Module()
    root._parameters = {k: copy.deepcopy(p, memo) for k, p in gm._parameters.items()}
    root._buffers = {k: copy.deepcopy(b, memo) for k, b in gm._buffers.items()}
    root._modules = {k: None if c is None else copy_module(c) for k, c in gm._modules.items()}
    for node in gm.graph.nodes:  # get_attr targets held as plain attributes (not registered tensors)
        if node.op == "get_attr" and "." not in str(node.target) and not hasattr(root, str(node.target)):
            setattr(root, str(node.target), copy.deepcopy(getattr(gm, str(node.target)), memo))
    root.train(gm.training)
    result = fx.GraphModule(root, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    result.meta = copy.deepcopy(gm.meta)
    return result
