"""The weight-masked original, as the self-check runs it: the captured graph with every removed channel's
weights zeroed, built without copying most of the weights.

Copying every tensor that loses channels (nearly all weights of a transformer) was the largest part of the
self-check on a loaded machine: hundreds of megabytes allocated, written and freed on ViT-B. Where a Linear
or convolution reads its weights only through its own call, zeroing them is the same as zeroing activations:
zeroed output rows (with their bias) give zeroed output channels, and zeroed input columns multiply zeroed
input channels. So those modules get forward hooks that zero activations (small at the example batch), and
only the remaining tensors (norms, biases read by other ops, tied weights) are copied.

A graph from torch.export has no Linear modules: its projections are ``aten.linear`` calls on weights read
by ``get_attr`` nodes (a symbolic trace has such ``F.linear`` calls too). Where such a call is the only
reader of its weight (and of its bias, if any, also a ``get_attr``), the same activation masks apply to
its input and output, through a torch function mode that recognises the weight tensor while the graph
runs. Without that, the check of a 1B-parameter decoder copied nearly all of its weights.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from . import meta
from .analysis.shapes import kept_indices

_HOOKABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR_FUNCTIONS = (torch.ops.aten.linear.default, F.linear)  # F.linear is torch._C._nn.linear


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
    # weight name -> (output mask, input mask) of the one linear call (aten.linear, F.linear) reading it
    linear_calls: dict[str, tuple[ChannelMask | None, ChannelMask | None]] = field(default_factory=dict)

    def run(self, gm: nn.Module, inputs: tuple):
        """``gm(*inputs)`` with the removed channels' weights zeroed."""
        with self._hooked(gm), self._masking_linear_calls(gm):
            return functional_call(gm, self.tensors, inputs, strict=False) if self.tensors else gm(*inputs)

    def _masking_linear_calls(self, gm: nn.Module) -> contextlib.AbstractContextManager:
        if not self.linear_calls:
            return contextlib.nullcontext()
        return _MaskedLinearCalls({id(weight): (weight, masks) for weight, masks in
                                   ((_tensor(gm, name), masks) for name, masks in self.linear_calls.items())})

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


class _MaskedLinearCalls(TorchFunctionMode):
    """Masks the input and output of every linear call on one of the given weights (by identity)."""

    def __init__(self, by_weight: dict[int, tuple[torch.Tensor, tuple[ChannelMask | None, ChannelMask | None]]]):
        super().__init__()
        self.by_weight = by_weight

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LINEAR_FUNCTIONS:
            return func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        weight_and_masks = self.by_weight.get(id(weight))
        if weight_and_masks is None or weight_and_masks[0] is not weight:
            return func(*args, **kwargs)
        output, input_ = weight_and_masks[1]
        if input_ is not None:
            if args:
                args = (input_.apply(args[0]), *args[1:])
            else:
                kwargs = {**kwargs, "input": input_.apply(kwargs["input"])}
        result = func(*args, **kwargs)
        return result if output is None else output.apply(result)


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
    grouped_calls = []
    for node in analysis.gm.graph.nodes:  # a grouped conv's removed inputs: its weight columns in that group
        grouped = node.meta.get(meta.GROUPED_INPUT)
        if grouped is None:
            continue
        kept = ~removed[analysis.atoms.atom_of[grouped.ids]]  # (groups, inputs per group)
        if bool(kept.all()):
            continue
        if node.op == "call_module" and str(node.target) not in result.inputs:
            result.inputs[str(node.target)] = ChannelMask(kept.reshape(-1), analysis.tensor(grouped.weight).ndim - 2)
        elif node.op != "call_module":  # a functional / ATen call: zero the columns in a copy of its weight
            grouped_calls.append((grouped.weight, kept))
    for weight, bias in _maskable_linear_calls(analysis.gm).items():
        if weight not in keep:
            continue  # keeps all its channels: nothing to mask
        masks = _masks(analysis.tensor(weight), None if bias is None else analysis.tensor(bias),
                       keep[weight], keep.get(bias, {}) if bias is not None else {})
        if masks is None:
            continue  # copied below
        result.linear_calls[weight] = masks
        keep.pop(weight, None)
        keep.pop(bias, None)
    for name, dims in keep.items():
        result.tensors[name] = _masked_copy(analysis.tensor(name).detach(), dims)
    for name, kept in grouped_calls:
        weight = result.tensors.get(name, analysis.tensor(name).detach())
        columns = kept.repeat_interleave(weight.shape[0] // kept.shape[0], 0)  # (out rows, inputs per group)
        result.tensors[name] = weight * columns.reshape(*columns.shape, *[1] * (weight.ndim - 2)).to(weight.dtype)
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


def _maskable_linear_calls(gm: fx.GraphModule) -> dict[str, str | None]:
    """Weight name -> bias name (or None) of each linear call (``aten.linear``, ``F.linear``) whose weight, and
    bias if any, come from ``get_attr`` nodes that only it reads: no other node, no called module, and no
    other name of the same tensor. Zeroing those tensors' removed channels is zeroing the call's activations."""
    nodes = list(gm.graph.nodes)
    reads = Counter(n.target for n in nodes if n.op == "get_attr")
    called = {n.target for n in nodes if n.op == "call_module"}
    owners = Counter(id(t) for _, t in list(gm.named_parameters(remove_duplicate=False))
                     + list(gm.named_buffers(remove_duplicate=False)))

    def only_reader(attr: object, call: fx.Node) -> bool:
        if not (isinstance(attr, fx.Node) and attr.op == "get_attr" and reads[attr.target] == 1
                and set(attr.users) == {call}):
            return False
        owner = str(attr.target).rpartition(".")[0]
        if owner and (owner in called or any(a in called for a in _ancestors(owner))):
            return False  # a module the graph calls reads it too
        tensor = _tensor(gm, str(attr.target))
        return isinstance(tensor, torch.Tensor) and owners[id(tensor)] <= 1

    found: dict[str, str | None] = {}
    for n in nodes:
        if n.op != "call_function" or n.target not in _LINEAR_FUNCTIONS:
            continue
        named = dict(zip(("input", "weight", "bias"), n.args)) | dict(n.kwargs)
        x, weight, bias = named.get("input"), named.get("weight"), named.get("bias")
        if x is weight or (bias is not None and bias in (x, weight)):
            continue
        if not only_reader(weight, n) or (bias is not None and not only_reader(bias, n)):
            continue
        if _tensor(gm, str(weight.target)).ndim != 2:
            continue
        found[str(weight.target)] = None if bias is None else str(bias.target)
    return found


def _tensor(gm: nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(path) if path else gm, attr)


def _ancestors(name: str) -> Iterator[str]:
    """'a.b.c' -> 'a', 'a.b'."""
    parts = name.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts)))


def _activation_masks(module: nn.Module, weight: dict[int, torch.Tensor], bias: dict[int, torch.Tensor]
                      ) -> tuple[ChannelMask | None, ChannelMask | None] | None:
    """(output mask, input mask) equal to zeroing ``module``'s removed weight rows, bias and weight columns,
    or None where activation masks cannot say the same (other dims, a bias masked unlike the rows,
    grouped input channels)."""
    if 1 in weight and getattr(module, "groups", 1) != 1:
        return None  # a grouped convolution's weight columns index channels within each group
    return _masks(module.weight, module.bias, weight, bias)


def _masks(weight_tensor: torch.Tensor, bias_tensor: torch.Tensor | None, weight: dict[int, torch.Tensor],
           bias: dict[int, torch.Tensor]) -> tuple[ChannelMask | None, ChannelMask | None] | None:
    """(output mask, input mask) of a linear map or ungrouped convolution with these weights, or None."""
    if set(weight) - {0, 1} or set(bias) - {0}:
        return None
    rows, bias_rows = weight.get(0), bias.get(0)
    if bias_tensor is not None and not _same(rows, bias_rows):
        return None  # zeroed rows with a kept bias give the bias, not zero
    trailing = weight_tensor.ndim - 2  # a convolution's spatial dims follow its channels
    output = None if rows is None else _mask(rows, weight_tensor.shape[0], trailing)
    input_ = None if 1 not in weight else _mask(weight[1], weight_tensor.shape[1], trailing)
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


# --- norms over a residual stream that loses channels: the activation-level reference -------------------------
#
# A LayerNorm or RMSNorm normalises over the whole width: a zeroed channel still counts in its mean and
# variance, so zeroing channels is not removing them. The pruned model's norm normalises over the kept
# channels only; the reference does the same: in a copy of the graph (sharing the modules), every norm over a
# residual stream that loses channels (``meta.STREAM_NORM``) computes its statistics over the kept channels
# and outputs zero for the removed ones. Every other removed channel is zeroed as above.


def norm_over_kept(x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float | None, rms: bool) -> torch.Tensor:
    """LayerNorm (or RMSNorm with ``rms``) over the last dim's ``kept`` channels (bool); zero elsewhere."""
    kept = kept.to(x.device)  # the mask is made on the CPU; the model may run elsewhere
    count = kept.sum()
    x = torch.where(kept, x, 0)  # where, not a product: a removed channel holding inf must still read as zero
    if eps is None:  # RMSNorm's default, as F.rms_norm
        eps = torch.finfo(x.dtype).eps
    if not rms:
        x = torch.where(kept, x - x.sum(-1, keepdim=True) / count, 0)
    y = x * torch.rsqrt((x * x).sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return torch.where(kept, y, 0)


_NORM_MODULES = {nn.LayerNorm: False, nn.RMSNorm: True}  # module class -> rms


def kept_statistics(analysis, removed: torch.Tensor):
    """The analysis with its graph replaced by a copy (sharing the modules) in which each norm over a residual
    stream that loses channels normalises over the kept ones; the analysis itself where no norm does."""
    changed = {n.name: kept for n in analysis.gm.graph.nodes if n.meta.get(meta.STREAM_NORM)
               for kept in [_kept_at_norm(analysis, n, removed)] if kept is not None}
    if not changed:
        return analysis
    reference = fx.GraphModule(analysis.gm, copy.deepcopy(analysis.gm.graph))
    reference.meta = dict(analysis.gm.meta)
    for node in list(reference.graph.nodes):
        if node.name in changed:
            _normalise_over_kept(reference, node, changed[node.name])
    reference.graph.lint()
    reference.recompile()
    return dataclasses.replace(analysis, captured=dataclasses.replace(analysis.captured, gm=reference))


def _kept_at_norm(analysis, node: fx.Node, removed: torch.Tensor) -> torch.Tensor | None:
    """The kept channels (bool, along the last dim) of a stream norm's input, or None when all are kept."""
    from .analysis.labels import block_on

    call = node.meta.get(meta.OP)
    x = call.args.get("input") if call is not None else None
    labels = x.meta.get(meta.LABELS) if isinstance(x, fx.Node) else None
    block = block_on(labels or (), len(x.meta[meta.VALUE].shape) - 1) if labels else None
    if block is None:
        return None
    kept = ~removed[analysis.atoms.atom_of[block.ids.reshape(-1)]]
    return None if bool(kept.all()) else kept


def norm_arguments(gm: fx.GraphModule, node: fx.Node) -> tuple:
    """(input, weight, bias, eps, rms) of the LayerNorm / RMSNorm ``node`` in ``gm``'s graph, as graph nodes and
    values to call ``norm_over_kept``-like functions with (get_attr nodes inserted before ``node``)."""
    from .analysis.rules import normalize

    graph = gm.graph
    call = normalize(node, gm)
    with graph.inserting_before(node):
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            rms = _NORM_MODULES[next(c for c in type(module).__mro__ if c in _NORM_MODULES)]
            weight, bias = (graph.get_attr(f"{node.target}.{p}") if getattr(module, p, None) is not None else None
                            for p in ("weight", "bias"))
            eps = module.eps
        else:
            rms = call.op == "rms_norm"
            weight, bias, eps = call.args.get("weight"), call.args.get("bias"), call.args.get("eps", None if rms else 1e-5)
    return call.args["input"], weight, bias, eps, rms


def _normalise_over_kept(gm: fx.GraphModule, node: fx.Node, kept: torch.Tensor) -> None:
    """Replace the norm ``node`` of ``gm``'s graph by ``norm_over_kept`` with the same input and parameters
    (read from this graph's own node: its inputs may differ from the analysed graph's, e.g. a bypassed branch)."""
    graph = gm.graph
    mask_name = f"{meta.BUFFER_PREFIX}kept_channels_{node.name}"
    gm.register_buffer(mask_name, kept)
    x, weight, bias, eps, rms = norm_arguments(gm, node)
    with graph.inserting_before(node):
        mask = graph.get_attr(mask_name)
        new = graph.call_function(norm_over_kept, (x, mask, weight, bias, eps, rms))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
