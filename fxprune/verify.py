"""Verify and report: the masked original, the equivalence error, params, MACs and latency."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop

from . import meta
from .analysis.query_heads import removal
from .capture import TensorValue

def masked(model: nn.Module, analysis, plan) -> nn.Module:
    """A copy of ``model`` with every removed channel's weights zeroed (what the pruned model must equal)."""
    analysis, removed = removal(analysis, plan)
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for space in analysis.ids.param_spaces:
            ids = torch.arange(space.start, space.start + space.size)
            gone = torch.nonzero(removed[analysis.atoms.atom_of[ids]]).flatten()
            if len(gone):
                tensor = _model_tensor(copy_, space.param)
                if tensor is None:
                    continue  # a constant capture made (a window mask, export's lifted constants), not the model's
                tensor.index_fill_(space.dim, gone, 0.0)
    return copy_


def _model_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The model's own parameter or buffer ``name``, or None where the captured graph made it up."""
    path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    tensor = getattr(owner, attr, None)
    return tensor if isinstance(tensor, torch.Tensor) and attr in {**owner._parameters, **owner._buffers} else None


def masked_activations(analysis, plan) -> torch.fx.GraphModule:
    """A copy of the captured graph in which every activation's removed channels and heads are zeroed.

    Where an op sees a removed channel as something other than zero (FLatten's φ(x) = ReLU(x) + ε feeds ε into
    norms over channels), zeroed weights are not what removal computes; zeroed activations are. The masks
    are shaped for the example batch size.
    """
    return zeroed_activations(*removal(analysis, plan))


def zeroed_activations(analysis, removed: torch.Tensor) -> torch.fx.GraphModule:
    """``masked_activations`` for a boolean mask of removed atoms."""
    gm = copy.deepcopy(analysis.gm)
    count = 0
    for node in list(gm.graph.nodes):
        value = node.meta.get(meta.VALUE)
        labels = node.meta.get(meta.LABELS)
        if node.op in ("placeholder", "get_attr", "output") or not isinstance(value, TensorValue) or not labels:
            continue
        if node.meta.get(meta.CONST):  # parameters are sliced, not zeroed: a zeroed divisor would make NaNs
            continue
        keep = torch.ones((1,) * len(value.shape), dtype=torch.bool)
        for block in labels:
            keep = keep & ~removed[analysis.atoms.atom_of[block.ids]]
        if bool(keep.all()):
            continue
        name = f"{meta.BUFFER_PREFIX}activation_mask_{count}"
        count += 1
        gm.register_buffer(name, keep)
        with gm.graph.inserting_after(node):
            mask = gm.graph.get_attr(name)
        with gm.graph.inserting_after(mask):  # where, not a product: a removed head's 1/0 must not become NaN
            zeroed = gm.graph.call_function(torch.where, (mask, node, 0.0))
        node.replace_all_uses_with(zeroed, delete_user_cb=lambda user: user is not zeroed)
    gm.graph.lint()
    gm.recompile()
    return gm


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (0 when both are zero)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_cpu_sdpa_registered = False


def _register_cpu_sdpa() -> None:
    """FlopCounterMode counts CPU flash attention as zero in torch 2.14; give it SDPA's formula."""
    global _cpu_sdpa_registered
    if _cpu_sdpa_registered:
        return
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        from torch.utils.flop_counter import flop_registry

        if op not in flop_registry and op.default not in flop_registry:
            @register_flop_formula(op)
            def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
                return sdpa_flop(query_shape, key_shape, value_shape)
    _cpu_sdpa_registered = True


def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2), attention included."""
    _register_cpu_sdpa()
    counter = FlopCounterMode(display=False)
    # FlopCounterMode's module tracker fails under no_grad on trainable parameters for some models
    # ("Expected gradient function to be set"); counting with frozen parameters avoids it.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() // 2


def latency(model: nn.Module, inputs: Sequence[torch.Tensor], repeats: int = 10, warmup: int = 5) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(*inputs)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
