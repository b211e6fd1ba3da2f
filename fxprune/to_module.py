"""Write a pruned GraphModule's sizes back into the model's own modules.

``fxprune.prune`` returns a GraphModule: exact, but it is not the user's class any more. A Hugging Face decoder
captured by ``torch.export`` loses ``generate`` and its key/value cache, and ``save_pretrained`` with it.
``to_module(model, pruned)`` gives a copy of the original module instead, its parameters replaced by the pruned
module's (compensated or fine-tuned weights included), so the model's own code runs at the new sizes:

1. ``_resized_copy``      a deep copy of ``model`` in which every tensor the pruned module holds under the same
                          name is that tensor (copied); the originals are not copied first
   ``_remove_blocks``     blocks removed whole (kind "layers") are deleted from their ModuleList / Sequential;
                          later blocks' ``layer_idx`` and the config's layer count follow
2. ``_fix_sizes``         size attributes follow the tensors: Linear / Conv1D / conv / norm / Embedding widths,
                          and attention modules' head counts (``HEAD_COUNTS``: how each family keeps them)
3. ``_describe_in_config`` where every layer agrees, the config is updated so ``from_pretrained`` rebuilds the
                          new sizes (checked by building the class from the new config on the meta device)
4. ``_check``             the copy must compute what the pruned module computes, on the example batch and on a
                          batch one larger: ``RewriteError`` otherwise

Only what a model's own code can express is accepted: code that reshapes q, k and v with one ``head_dim`` cannot
run heads of different widths, so channels removed inside heads (kinds "qk" / "v") and single residual branches
("depth": the block's code still calls them) are refused with the reason; whole heads ("heads" / ``head_ratio``,
query heads inside kv groups), MLP channels, the residual width and whole blocks ("layers") are what such code
follows.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from . import depth, meta
from .errors import InvalidArgumentError, RewriteError
from .rewrite.slice_parameters import fix_module_attributes, is_depthwise

# attention module -> (head_dim, query heads, key/value heads) or None. Counters run on the copy before its size
# attributes follow: tensors give the new widths, attributes (``out_features``, ``num_heads``) still the old ones.
HeadCounter = Callable[[nn.Module], "tuple[int, int, int] | None"]
HEAD_COUNTS: list[HeadCounter] = []


def register_head_count(counter: HeadCounter) -> HeadCounter:
    """Teach ``to_module`` how an attention family's projections give its head counts (first match wins)."""
    HEAD_COUNTS.append(counter)
    return counter


def _width(module: nn.Module | None, dim: int) -> int:
    """A weight's (new) size along ``dim``; 0 where the module has no weight."""
    weight = getattr(module, "weight", None)
    return weight.shape[dim] if isinstance(weight, torch.Tensor) else 0


def _head_dim(module: nn.Module) -> int:
    for name in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


@register_head_count
def _separate_projections(module: nn.Module) -> tuple[int, int, int] | None:
    """q/k/v as Linear layers of their own: Llama, Mistral, Qwen, Cohere, GPT-J (q_proj, k_proj), BERT and the
    ViT family (query, key)."""
    head_dim = _head_dim(module)
    for q_name, k_name in (("q_proj", "k_proj"), ("query", "key")):
        q, k = getattr(module, q_name, None), getattr(module, k_name, None)
        if head_dim and isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return head_dim, _width(q, 0) // head_dim, _width(k, 0) // head_dim
    return None


@register_head_count
def _fused_qkv(module: nn.Module) -> tuple[int, int, int] | None:
    """timm's ``qkv`` Linear: q, k and v of equal widths, reshaped to (3, num_heads, head_dim or -1)."""
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(heads, int)):
        return None
    head_dim = _head_dim(module) or qkv.out_features // (3 * heads)  # the unsliced width over the old head count
    return head_dim, _width(qkv, 0) // (3 * head_dim), _width(qkv, 0) // (3 * head_dim)


@register_head_count
def _fused_by_position(module: nn.Module) -> tuple[int, int, int] | None:
    """Phi-3's ``qkv_proj``: q heads, then k, then v, sliced by position; the output projection reads q's width."""
    head_dim, qkv, out = _head_dim(module), getattr(module, "qkv_proj", None), getattr(module, "o_proj", None)
    if not (head_dim and isinstance(qkv, nn.Linear) and isinstance(out, nn.Linear)):
        return None
    q_heads = _width(out, 1) // head_dim
    return head_dim, q_heads, (_width(qkv, 0) - q_heads * head_dim) // (2 * head_dim)


@register_head_count
def _fused_conv1d(module: nn.Module) -> tuple[int, int, int] | None:
    """GPT-2's ``c_attn`` (a Conv1D, weight stored (in, out)) split into three equal widths."""
    head_dim, width = _head_dim(module), _width(getattr(module, "c_attn", None), 1)
    if not (head_dim and width) or getattr(module, "is_cross_attention", False):
        return None
    return head_dim, width // 3 // head_dim, width // 3 // head_dim


@register_head_count
def _fused_per_head(module: nn.Module) -> tuple[int, int, int] | None:
    """GPT-NeoX's ``query_key_value``: q, k and v of each head side by side."""
    head_dim, width = _head_dim(module), _width(getattr(module, "query_key_value", None), 0)
    if not (head_dim and width):
        return None
    return head_dim, width // (3 * head_dim), width // (3 * head_dim)


def _set_head_counts(module: nn.Module, head_dim: int, q_heads: int, kv_heads: int) -> None:
    """Every head-count attribute the module has follows its projections."""
    for name in ("num_heads", "num_attention_heads", "n_head"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, q_heads)
    for name in ("num_key_value_heads", "num_kv_heads"):
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, kv_heads)
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = q_heads // kv_heads
    for name in ("all_head_size", "attn_dim"):  # the heads' total width (BERT's, timm's)
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, q_heads * head_dim)
    if isinstance(getattr(module, "split_size", None), int):  # GPT-2 splits c_attn's output into three of these
        module.split_size = q_heads * head_dim


def _fix_sizes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Size attributes follow the (replaced) tensors; returns each attention module's (head_dim, q, kv heads)."""
    heads = {}
    for name, module in model.named_modules():  # before any attribute follows (see HEAD_COUNTS)
        counts = next((c for c in (counter(module) for counter in HEAD_COUNTS) if c is not None), None)
        if counts is not None:
            heads[name] = counts
    for module in model.modules():
        fix_module_attributes(module, is_depthwise(module))
    for name, counts in heads.items():
        _set_head_counts(model.get_submodule(name), *counts)
    return heads


def _own_configs(model: nn.Module, heads: dict[str, tuple[int, int, int]]) -> None:
    """Where the model's config keeps the original head counts, an attention module whose code reads them (Phi-3
    slices its fused qkv at ``config.num_attention_heads``) gets a copy of the config with its own counts."""
    for name, (_, q_heads, kv_heads) in heads.items():
        module = model.get_submodule(name)
        config = getattr(module, "config", None)
        if config is None or getattr(config, "num_attention_heads", q_heads) == q_heads and \
                getattr(config, "num_key_value_heads", kv_heads) == kv_heads:
            continue
        module.config = copy.copy(config)
        module.config.num_attention_heads = q_heads
        if hasattr(config, "num_key_value_heads"):
            module.config.num_key_value_heads = kv_heads


def _refuse_what_modules_cannot_express(pruned: fx.GraphModule) -> None:
    from .api import plan_of

    plan = plan_of(pruned)
    single = sorted({depth.block_of(b) for b in plan.branches} - set(plan.options.get("layers", [])))
    if single:
        raise InvalidArgumentError(
            f"fxprune: to_module cannot express single residual branches removed from a block ({', '.join(single[:3])}):"
            " the model's own code still calls them. Remove whole blocks (kinds 'layers'), or keep the GraphModule.")
    # whole heads leave their rows of the q/k and v groups empty: a position listed there is inside a head
    inside = sorted(name for name, rows in plan.removed.items() if name.rsplit(":", 1)[-1] in ("qk", "v") and any(rows))
    if inside:
        raise InvalidArgumentError(
            f"fxprune: to_module cannot express channels removed inside heads ({', '.join(inside[:3])}): a model's "
            "own code reshapes q, k and v with one head_dim. Plan with kinds=('mlp',) (and 'residual'), remove "
            "whole heads with head_ratio, or keep the GraphModule.")
    if pruned.meta.get(meta.REWEIGHTED_NODES):
        raise InvalidArgumentError("fxprune: the pruned module has reweight nodes, which the original's code has no "
                                   "place for: fold them first (fxprune.fold_reweights(pruned)).")


def _remove_blocks(model: nn.Module, pruned: fx.GraphModule, blocks: list[str]) -> None:
    """Delete the blocks the plan removes whole (kind "layers") from the ModuleList / Sequential holding them.
    Indices of the blocks after them (``layer_idx``, which a key/value cache is kept by) and the config's layer
    count and per-layer types follow."""
    # what the pruned graph still reads of a block: its modules (fx) or its parameters (fx and torch.export)
    computed = {str(n.target) for n in pruned.graph.nodes if n.op in ("call_module", "get_attr")}
    by_parent: dict[str, list[int]] = {}
    for block in blocks:
        parent_path, _, index = block.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else None
        if not index.isdigit() or not isinstance(parent, (nn.ModuleList, nn.Sequential)):
            raise InvalidArgumentError(f"fxprune: to_module cannot delete block '{block}': it is not an element of a "
                                       "ModuleList or Sequential. Keep the GraphModule.")
        left = sorted(p for p in computed if p == block or p.startswith(block + "."))
        if left:  # a post-norm block (BERT) normalises after its residual adds: that stays without its branches
            raise InvalidArgumentError(f"fxprune: to_module cannot delete block '{block}': the pruned model still "
                                       f"reads its '{left[0]}' outside the removed branches. Keep the GraphModule.")
        by_parent.setdefault(parent_path, []).append(int(index))
    config = getattr(model, "config", None)
    for parent_path, indices in by_parent.items():
        parent = model.get_submodule(parent_path)
        count = len(parent)
        for index in sorted(indices, reverse=True):
            del parent[index]
        for new_index, block in enumerate(parent):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        if config is not None and getattr(config, "num_hidden_layers", None) == count:
            layer_types = getattr(config, "layer_types", None)
            if isinstance(layer_types, list) and len(layer_types) == count:
                gone = set(indices)
                config.layer_types = [t for i, t in enumerate(layer_types) if i not in gone]
            config.num_hidden_layers = len(parent)


def _resized_copy(model: nn.Module, pruned: fx.GraphModule, blocks: list[str]) -> nn.Module:
    """A deep copy of ``model`` holding, under each name the pruned module also has, the pruned tensor. Tensors
    only ``blocks`` (about to be deleted) hold are not copied: empty meta tensors stand in for them."""
    replacements = dict(pruned.named_parameters(remove_duplicate=False))
    replacements.update(pruned.named_buffers(remove_duplicate=False))
    memo: dict[int, object] = {}
    made: dict[int, torch.Tensor] = {}  # pruned tensor -> its copy: tied names stay tied
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    outside = {id(t) for name, t in named if not any(name.startswith(block + ".") for block in blocks)}
    for name, tensor in named:
        new = replacements.get(name)
        if new is None and id(tensor) not in outside and id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        if new is None or id(tensor) in memo:
            continue
        if id(new) not in made:
            data = new.detach().clone()
            made[id(new)] = nn.Parameter(data, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                else data
        memo[id(tensor)] = made[id(new)]
    return copy.deepcopy(model, memo)


_CONFIG_SIZES = {  # what a config calls each size (a config's attribute_map adds the family's own names)
    "hidden": ("hidden_size",),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate": ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim"),
}


def _describe_in_config(model: nn.Module, original: nn.Module, plan, heads: dict[str, tuple[int, int, int]]) -> bool:
    """Where every layer agrees, write the new sizes into (a copy of) the config and check that the class built
    from it has this model's parameter shapes. False (config left as it was) where it cannot say them."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return False
    sizes = _uniform_sizes(model, original, plan, heads)
    if sizes is None:
        return False
    new = copy.deepcopy(config)
    for what, value in sizes.items():
        name = next((n for n in _CONFIG_SIZES[what] if hasattr(new, n)), None)
        if name is not None:
            setattr(new, name, value)
    if not _builds_same_shapes(type(model), new, model):
        return False
    model.config = new
    for module in model.modules():  # submodules that keep the config object (attention, MLP, rotary) see the new one
        if getattr(module, "config", None) is config:
            module.config = new
    return True


def _uniform_sizes(model: nn.Module, original: nn.Module, plan,
                   heads: dict[str, tuple[int, int, int]]) -> dict[str, int] | None:
    """The sizes every layer shares (head_dim, heads, kv_heads, hidden, intermediate), None where layers differ.
    An MLP's new width is its old one less what the plan removes from it (the same count in every MLP), the old
    one as the config says or, where the config leaves it to a default (GPT-2's ``n_inner``), as the first
    MLP's producing layer is wide."""
    counts = set(heads.values())
    removed = {len(rows[0]) for name, rows in plan.removed.items() if name.endswith(":mlp")}
    if len(counts) > 1 or len(removed) > 1:
        return None
    sizes: dict[str, int] = {}
    if counts:
        sizes["head_dim"], sizes["heads"], sizes["kv_heads"] = counts.pop()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        sizes["hidden"] = embeddings.embedding_dim
    if removed:
        config = original.config
        old = next((getattr(config, n) for n in _CONFIG_SIZES["intermediate"] if getattr(config, n, None)), None)
        if old is None:
            producer = original.get_submodule(next(n for n in plan.removed if n.endswith(":mlp")).rsplit(":", 1)[0])
            old = _width(producer, 1 if type(producer).__name__ == "Conv1D" else 0)
        sizes["intermediate"] = old - removed.pop()
    return sizes


def _builds_same_shapes(cls: type, config, model: nn.Module) -> bool:
    try:
        with torch.device("meta"):
            rebuilt = cls(config)
    except Exception:  # noqa: BLE001 - a config the class refuses cannot describe the model
        return False
    want = {n: t.shape for n, t in model.state_dict().items()}
    return {n: t.shape for n, t in rebuilt.state_dict().items()} == want


def _comparable(output) -> list[torch.Tensor]:
    """Floating tensors of an output; of a mapping (Hugging Face's ModelOutput), the entries other than caches."""
    if isinstance(output, Mapping):
        output = {k: v for k, v in output.items() if "past_key_values" not in k and k != "cache"}
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@contextlib.contextmanager
def _innermost_module(model: nn.Module):
    """Within: a callable naming the innermost module whose forward was entered and not left (where an exception
    was raised)."""
    stack: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def enter(module: nn.Module, _args) -> None:
        if id(module) in names:
            stack.append(names[id(module)])

    def leave(module: nn.Module, _args, _output) -> None:
        if id(module) in names and stack:
            stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield lambda: (f"module '{stack[-1]}' ({type(model.get_submodule(stack[-1])).__name__})"
                       if stack and stack[-1] != "" else "the model's forward")
    finally:
        for handle in handles:
            handle.remove()


def _check(resized: nn.Module, pruned: fx.GraphModule, inputs: tuple) -> float:
    from .check import _other_batch, tolerance
    from .verify import relative_error

    worst = 0.0
    with torch.no_grad():
        for batch in (inputs, _other_batch(inputs) or inputs):
            expected = _comparable(pruned(*batch))
            with _innermost_module(resized) as where:
                try:
                    actual = _comparable(resized(*batch))
                except Exception as exc:  # noqa: BLE001 - the model's code did not follow a size: say where
                    raise RewriteError(
                        f"fxprune: the model's own code fails at the pruned sizes in {where()}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. It keeps a size fxprune cannot set (a width "
                        "taken from its input, say); keep the GraphModule.") from exc
            if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
                raise RewriteError(f"fxprune: the resized model's outputs have shapes {[tuple(a.shape) for a in actual]}, "
                                   f"the pruned module's {[tuple(e.shape) for e in expected]}")
            worst = max([worst, *(relative_error(a.double(), e.double()) for a, e in zip(actual, expected))])
    if worst > tolerance(pruned):
        raise RewriteError(f"fxprune: the model's own code at the pruned sizes differs from the pruned module (relative "
                           f"error {worst:.2e}): it keeps a size fxprune does not know of. Keep the GraphModule.")
    return worst


def to_module(model: nn.Module, pruned: fx.GraphModule, *, example_inputs: Sequence | None = None,
              verify: bool = True) -> nn.Module:
    """A copy of ``model`` (its own class) holding ``pruned``'s weights, its size attributes following them.

    For a Hugging Face model this keeps ``generate`` with the key/value cache, and ``save_pretrained`` /
    ``from_pretrained`` where every layer keeps the same sizes (the config is updated and checked; otherwise it
    keeps the original sizes and a warning says the config cannot describe per-layer sizes). ``pruned`` comes from
    ``prune`` / ``apply`` / ``auto_prune`` / ``finetune`` on ``model`` (reweight nodes folded): its plan may remove
    whole heads, MLP channels, residual width and whole blocks (kinds "layers"), not channels inside heads or
    single branches of a block. ``verify``: the
    copy must compute what ``pruned`` computes on the example inputs and on a batch one larger (``RewriteError``
    otherwise). ``model`` is not changed.
    """
    from .api import _inputs_from_plan, plan_of

    if not isinstance(pruned, fx.GraphModule):
        raise InvalidArgumentError(f"fxprune: to_module expects the GraphModule fxprune returned, got {type(pruned).__name__}")
    _refuse_what_modules_cannot_express(pruned)
    blocks = plan_of(pruned).options.get("layers", [])
    resized = _resized_copy(model, pruned, blocks)
    _remove_blocks(resized, pruned, blocks)
    heads = _fix_sizes(resized)
    if hasattr(resized, "config") and not _describe_in_config(resized, model, plan_of(pruned), heads):
        _own_configs(resized, heads)
        warnings.warn(f"fxprune: {type(resized.config).__name__} cannot describe the pruned sizes (layers that differ, "
                      "or a width its class derives from another): from_pretrained will not rebuild this model; save "
                      "it with torch.save, or the GraphModule with fxprune.save", stacklevel=2)
    if verify:
        inputs = tuple(example_inputs) if example_inputs is not None else _inputs_from_plan(plan_of(pruned))
        if inputs is None:
            raise InvalidArgumentError("fxprune: to_module needs example_inputs to check the copy")
        modes = [(m, m.training) for m in (resized, pruned)]
        for m, _ in modes:  # dropout off for the comparison, as in the self-check
            m.eval()
        try:
            _check(resized, pruned, inputs)
        finally:
            for m, training in modes:
                m.train(training)
    return resized
