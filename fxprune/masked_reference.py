"""The weight-masked original, as the self-check runs it: the captured graph with every removed channel's
weights zeroed, built without copying most of the weights.

Copying every tensor that loses channels (nearly all weights of a transformer) was the largest part of the
self-check on a loaded machine: hundreds of megabytes allocated, written and freed on ViT-B. Where a Linear
or convolution reads its weights only through its own call, zeroing them is the same as zeroing activations:
zeroed output rows (with their bias) give zeroed output channels, and zeroed input columns multiply zeroed
input channels. So those modules get forward hooks that zero activations (small at the example batch), and
only the remaining tensors (norms, biases read by other ops, tied or ``get_attr``-read weights) are copied.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.func import functional_call

from . import meta
from .analysis.shapes import kept_indices

_HOOKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ChannelMask:
    """Kept channels of one activation: ``kept`` (bool, one per channel) broadcast over ``trailing`` dims."""

    kept: torch.Tensor
    trailing: int  # dims after the channel dim: 0 for Linear, the spatial dims for a convolution

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        # where, not a product: a removed channel holding inf or NaN must still read as zero
        return torch.where(self.kept.reshape(-1, *[1] * self.trailing), x, 0)


@dataclass
class WeightMasked:
    """Masked copies of some tensors (for ``functional_call``) and activation masks standing in for the rest."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, ChannelMask] = field(default_factory=dict)  # module name -> its output's kept channels
    inputs: dict[str, ChannelMask] = field(default_factory=dict)  # module name -> its input's kept channels

    def run(self, gm: nn.Module, inputs: tuple):
        """``gm(*inputs)`` with the removed channels' weights zeroed."""
        with self._hooked(gm):
            return functional_call(gm, self.tensors, inputs, strict=False) if self.tensors else gm(*inputs)

    @contextlib.contextmanager
    def _hooked(self, gm: nn.Module) -> Iterator[None]:
        """``gm`` with the activation masks in place (removed again on exit)."""
        handles = [gm.get_submodule(name).register_forward_hook(lambda _m, _i, out, mask=mask: mask.apply(out))
                   for name, mask in self.outputs.items()]
        handles += [gm.get_submodule(name).register_forward_pre_hook(_masking_input(mask), with_kwargs=True)
                    for name, mask in self.inputs.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _masking_input(mask: ChannelMask):
    """A pre-hook zeroing the removed channels of a Linear's or convolution's input (``input``, however passed)."""
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (mask.apply(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "input": mask.apply(kwargs["input"])}
    return hook


def weight_masked(analysis, removed: torch.Tensor) -> WeightMasked:
    """The captured graph's removed channels zeroed: activation masks where a module allows, copies elsewhere."""
    keep = {name: dims for name, dims in kept_indices(analysis, removed).items()
            if not name.rpartition(".")[2].startswith(meta.BUFFER_PREFIX)}  # constants capture made (window masks)
    result = WeightMasked()
    for name, module in _hookable_modules(analysis.gm).items():
        masks = _activation_masks(module, keep.get(f"{name}.weight", {}), keep.get(f"{name}.bias", {}))
        if masks is None:
            continue  # copied below
        output, input_ = masks
        if output is not None:
            result.outputs[name] = output
        if input_ is not None:
            result.inputs[name] = input_
        keep.pop(f"{name}.weight", None)
        keep.pop(f"{name}.bias", None)
    for name, dims in keep.items():
        result.tensors[name] = _masked_copy(analysis.tensor(name).detach(), dims)
    return result


def _hookable_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    """Linear and convolution modules (exactly those types: a subclass may read its weights otherwise) that the
    graph calls itself, not from inside a leaf, and whose weights no other node reads and no other module shares."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    owners = Counter(id(t) for _, t in gm.named_parameters(remove_duplicate=False))
    modules = dict(gm.named_modules(remove_duplicate=False))
    hookable = {}
    for name in called:
        module = modules.get(name)
        if type(module) not in _HOOKABLE or any(ancestor in called for ancestor in _ancestors(name)):
            continue
        own = [(f"{name}.{attr}", t) for attr, t in module.named_parameters(recurse=False)]
        if any(full in read or owners[id(t)] > 1 for full, t in own):
            continue
        hookable[name] = module
    return hookable


def _ancestors(name: str) -> Iterator[str]:
    """'a.b.c' -> 'a', 'a.b'."""
    parts = name.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def _activation_masks(module: nn.Module, weight: dict[int, torch.Tensor], bias: dict[int, torch.Tensor]
                      ) -> tuple[ChannelMask | None, ChannelMask | None] | None:
    """(output mask, input mask) equal to zeroing ``module``'s removed weight rows, bias and weight columns,
    or None where activation masks cannot say the same (other dims, a bias masked unlike the rows,
    grouped input channels)."""
    if set(weight) - {0, 1} or set(bias) - {0}:
        return None
    rows, bias_rows = weight.get(0), bias.get(0)
    if module.bias is not None and not _same(rows, bias_rows):
        return None  # zeroed rows with a kept bias give the bias, not zero
    if 1 in weight and getattr(module, "groups", 1) != 1:
        return None  # a grouped convolution's weight columns index channels within each group
    trailing = module.weight.ndim - 2  # a convolution's spatial dims follow its channels
    output = None if rows is None else _mask(rows, module.weight.shape[0], trailing)
    input_ = None if 1 not in weight else _mask(weight[1], module.weight.shape[1], trailing)
    return output, input_


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _mask(kept: torch.Tensor, size: int, trailing: int) -> ChannelMask:
    return ChannelMask(torch.zeros(size, dtype=torch.bool).index_fill_(0, kept, True), trailing)


def _masked_copy(tensor: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    keep = torch.ones((1,) * tensor.ndim, dtype=torch.bool)
    for dim, kept in dims.items():
        along = torch.zeros(tensor.shape[dim], dtype=torch.bool).index_fill_(0, kept, True)
        keep = keep & along.reshape([-1 if d == dim else 1 for d in range(tensor.ndim)])
    return tensor.masked_fill(~keep, 0)
