"""Torch-Pruning (the peer) with its recommended timm ViT and Hugging Face BERT recipes, brought to a MACs target.

The ViT recipe follows Torch-Pruning's ``examples/transformers/prune_timm_vit.py``: ``MetaPruner`` with uniform
(non-global) pruning, ``num_heads`` for every qkv, head-dim pruning, ``ignored_layers=[model.head]``, group
Taylor importance from labelled batches (magnitude where no labels exist), then ``num_heads`` / ``head_dim``
set by hand on every attention. ``attn_dim`` is also set (timm 1.0.31 reshapes with it, the model would not
run otherwise); ``scale`` is left alone as in the recipe, so timm's fused attention runs with the softmax
temperature of the new head width. Swin's relative-position tables go into ``ignored_layers`` (otherwise the
qkv groups are silently left unpruned), and so do its patch-merging layers (Torch-Pruning slices their 2x2
concatenation wrongly; its own Swin example needs a custom pruner for them). FLatten's separate q and kv
projections are registered with their head counts the same way. The ratio is found by bisection so the
MACs match the target. The BERT recipe is ``prune_bert_at_ratio``'s. ``round_to`` is MetaPruner's own (kept
channels of each group rounded to a multiple of it; 1 = widths as they fall), so the peer can be compared at the
same rounding as fxprune's ``round_to``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def usable(methods: list[str], log: Callable[[str], None] = print) -> list[str]:
    """``methods`` without "torch-pruning" when it is not installed (and a line saying so)."""
    out = [m for m in methods if m != "torch-pruning" or available()]
    if len(out) < len(methods):
        log("torch-pruning is not installed (pip install -e '.[bench]'): its rows are skipped")
    return out


def _attentions(model: nn.Module) -> list[nn.Module]:
    """Modules with heads: timm's qkv attentions, and FLatten's (separate q and kv projections)."""
    return [m for m in model.modules() if hasattr(m, "num_heads") and
            (isinstance(getattr(m, "qkv", None), nn.Linear) or isinstance(getattr(m, "q", None), nn.Linear))]


def _head_projections(attention: nn.Module) -> list[nn.Linear]:
    return [attention.qkv] if hasattr(attention, "qkv") else [attention.q, attention.kv]


def prune_at_ratio(model: nn.Module, example: torch.Tensor, ratio: float, labelled: list | None,
                   keep_output_width: bool, round_to: int = 1) -> nn.Module:
    """One Torch-Pruning run at channel ratio ``ratio`` on a copy of ``model``."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module) and isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        head = model[-1]  # a backbone and its classifier as one model: the classes stay
    ignored: list = [head] if isinstance(head, nn.Module) else []
    if keep_output_width:  # feature extractors: the residual width is the output width
        ignored.append(model.norm)
    for attention in _attentions(model):
        ignored += [p for n, p in attention.named_parameters() if "relative_position" in n]
    # Swin patch merging: Torch-Pruning mis-slices its 2x2 concatenation
    ignored += [m.downsample for m in getattr(model, "layers", [])
                if isinstance(getattr(m, "downsample", None), nn.Module) and not isinstance(m.downsample, nn.Identity)]
    importance = tp.importance.GroupTaylorImportance() if labelled else tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio, global_pruning=False,
                                  num_heads={p: a.num_heads for a in _attentions(model) for p in _head_projections(a)},
                                  prune_head_dims=True, prune_num_heads=False, ignored_layers=ignored, round_to=round_to)
    if labelled:
        model.zero_grad()
        for images, labels in labelled:
            F.cross_entropy(model(images), labels).backward()
    pruner.step()
    for attention in _attentions(model):
        first = _head_projections(attention)[0]
        attention.num_heads = pruner.num_heads[first]
        stacked = 3 if hasattr(attention, "qkv") else 1  # q, k and v rows share one projection
        attention.head_dim = first.out_features // (stacked * attention.num_heads)
        if hasattr(attention, "attn_dim"):
            attention.attn_dim = attention.num_heads * attention.head_dim
    model.zero_grad(set_to_none=True)
    return model


def prune_to_macs(model: nn.Module, example: torch.Tensor, target: float, labelled: list | None = None,
                  keep_output_width: bool = False, iterations: int = 9, log: Callable[[str], None] = print,
                  round_to: int = 1) -> tuple[nn.Module | None, float, str]:
    """Torch-Pruning's result whose MACs are closest to ``target`` x the original's; (model, ratio, note)."""
    return bisect_to_macs(lambda ratio: prune_at_ratio(model, example, ratio, labelled, keep_output_width, round_to),
                          model, (example,), target, iterations, log)


def bisect_to_macs(prune_at: Callable[[float], nn.Module], model: nn.Module, inputs: tuple, target: float,
                   iterations: int = 9, log: Callable[[str], None] = print) -> tuple[nn.Module | None, float, str]:
    """Bisect the channel ratio of ``prune_at(ratio)`` (a pruned copy of ``model``) until its MACs on ``inputs``
    are ``target`` x the original's; (the closest model, its ratio, a note), or (None, ratio, why)."""
    full = fxprune.count_macs(model, inputs)
    lo, hi, best = 0.0, 0.95, (None, 0.0, float("inf"))
    try:
        for _ in range(iterations):
            ratio = (lo + hi) / 2
            pruned = prune_at(ratio)
            fraction = fxprune.count_macs(pruned, inputs) / full
            if abs(fraction - target) < best[2]:
                best = (pruned, ratio, abs(fraction - target))
            lo, hi = (ratio, hi) if fraction > target else (lo, ratio)
    except Exception as exc:  # noqa: BLE001 - the peer's failure is a result to report, not to hide
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}" if str(exc) else type(exc).__name__
        log(f"  torch-pruning failed: {message}")
        return None, 0.0, f"failed ({message})"
    pruned, ratio, gap = best
    if gap > 0.05:
        return None, ratio, f"cannot reach the target (closest {target + gap:.2f} or {target - gap:.2f} of MACs)"
    return pruned, ratio, f"ratio {ratio:.3f}"


def prune_bert_at_ratio(model: nn.Module, inputs: tuple, ratio: float) -> nn.Module:
    """Torch-Pruning's Hugging Face BERT recipe (``examples/transformers/prune_hf_bert.py``) on a copy of
    ``model`` (a BertModel or a module holding one), with fxprune's default scope: channels within heads
    (``prune_head_dims=True, prune_num_heads=False``, as in the ViT recipe above) and MLP hidden channels,
    magnitude importance, uniform ratio. The recipe ignores only the pooler and so also narrows the residual
    width; here the embeddings are ignored as well, which freezes the residual group. Then the heads, head
    size and ``all_head_size`` are set by hand as in the recipe. transformers 5 computes the softmax scale
    (``scaling``) once from the original head size, so the pruned attention keeps the original temperature."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler, BertSelfAttention

    model = copy.deepcopy(model).eval()
    attentions = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=False, round_to=1, prune_head_dims=True, prune_num_heads=False,
        num_heads={p: a.num_attention_heads for a in attentions for p in (a.query, a.key, a.value)},
        ignored_layers=[m for m in model.modules() if isinstance(m, (BertEmbeddings, BertPooler))])
    pruner.step()
    for attention in attentions:
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.attention_head_size = attention.query.out_features // attention.num_attention_heads
        attention.all_head_size = attention.query.out_features
    return model
