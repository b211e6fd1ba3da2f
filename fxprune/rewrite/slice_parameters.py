"""Pass: make every parameter and buffer that holds removed channels physically smaller."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution by its size attributes (read before they follow a sliced weight)."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels \
        and module.weight.shape[1] == 1


def fix_module_attributes(module: nn.Module, was_depthwise: bool) -> None:
    """Keep a module's size attributes true to its (smaller) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, k...)
        module.in_channels = module.weight.shape[0]
        if was_depthwise:
            module.groups = module.out_channels = module.in_channels
        else:
            module.out_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        if was_depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        reference = module.weight if module.weight is not None else module.running_mean
        module.num_features = reference.shape[0]
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int):  # Hugging Face (in, out)
        module.nf = module.weight.shape[1]


def _names_by_tensor(gm: nn.Module) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """Every name under which ``gm`` holds each parameter or buffer, by the tensor's id, with the tensor (which
    keeps the id from being reused). Collected once: asked per sliced tensor, the walk over all names made the
    pass quadratic in depth."""
    names: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for n, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), (t, []))[1].append(n)
    return names


def slice_parameters(gm: fx.GraphModule, keep: dict[str, dict[int, torch.Tensor]]) -> PassResult:
    """Pass: index every kept channel out of each parameter and buffer named in ``keep``; modules follow."""
    touched: dict[int, tuple[nn.Module, bool]] = {}
    sliced: dict[int, dict[int, torch.Tensor]] = {}  # tensors this pass made -> the kept indices they were cut to
    names = _names_by_tensor(gm)  # of the tensors before slicing; each is sliced once, under all its names
    for name, dims in keep.items():
        owner, attr = _owner(gm, name)
        if id(getattr(owner, attr)) in sliced:  # an alias of an earlier name, already cut
            done = sliced[id(getattr(owner, attr))]
            if set(done) != set(dims) or not all(torch.equal(done[d], dims[d]) for d in dims):
                from ..errors import RewriteError

                raise RewriteError(f"fxprune: '{name}' is the same tensor as another parameter that keeps other "
                                   "channels; tied weights must lose the same channels")
            continue
        if id(owner) not in touched:
            touched[id(owner)] = (owner, is_depthwise(owner))
        old = getattr(owner, attr)
        new = old.detach()
        for dim, index in sorted(dims.items()):
            new = new.index_select(dim, index)
        new = new.contiguous()
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        # every name of the old tensor gets the new one: tied weights (a Hugging Face lm_head and embed_tokens,
        # of which torch.export's graph reads one name) stay tied instead of leaving a stale full-size copy
        for alias in names.get(id(old), (old, [name]))[1]:
            alias_owner, alias_attr = _owner(gm, alias)
            if isinstance(new, nn.Parameter):
                setattr(alias_owner, alias_attr, new)
            else:
                alias_owner.register_buffer(alias_attr, new, persistent=alias_attr not in getattr(
                    alias_owner, "_non_persistent_buffers_set", set()))
            if alias_owner is not owner and id(alias_owner) not in touched:
                touched[id(alias_owner)] = (alias_owner, False)
        sliced[id(new)] = dims
    for owner, depthwise in touched.values():
        fix_module_attributes(owner, depthwise)
    return PassResult(gm, bool(keep))
