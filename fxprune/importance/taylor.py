"""First-order Taylor importance from calibration data, without labels.

A channel's removal changes the loss by about -Σ w·∂L/∂w over every weight coupled to it; the score is the
square of that sum (accumulated over batches), i.e. the group Fisher information. The loss is the cross
entropy between the model's output and its own predictions (hard self-distillation): the soft distillation
loss against the unpruned model has zero gradient at the unpruned model. Outputs that are not class scores
(features) use the squared output.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..data import batches, input_names
from . import heads_from_channels, register


def self_distillation_loss(output) -> torch.Tensor:
    """On the model's (first) output tensor: a Hugging Face model returns an output object."""
    output = main_output(output)
    if output.ndim == 2 and output.shape[1] > 1:
        return F.cross_entropy(output, output.detach().argmax(dim=1))
    return output.square().mean()


def main_output(output) -> torch.Tensor:
    """The first floating tensor of a model's output (a tensor, a tuple, or an output object / dict)."""
    from torch.utils._pytree import tree_leaves

    # model output objects are pytrees (transformers registers them), as the self-check relies on too
    found = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if found is None:
        raise InvalidArgumentError(f"fxprune: the model's output ({type(output).__name__}) holds no floating tensor")
    return found


@register("taylor", needs_data=True)
def taylor(analysis, data=None, max_batches: int | None = 8, **_) -> torch.Tensor:
    model = copy.deepcopy(analysis.gm).eval()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    seen = 0
    for inputs in batches(data, max_batches, input_names(analysis.gm)):
        model.zero_grad(set_to_none=True)
        self_distillation_loss(model(*inputs)).backward()
        change = torch.zeros(analysis.atoms.count, dtype=torch.float64)
        for space in analysis.ids.param_spaces:
            p = params.get(space.param)
            if p is None or p.grad is None:
                continue
            per_index = (p.detach() * p.grad).to(torch.float64).movedim(space.dim, 0).reshape(space.size, -1).sum(1)
            change.index_add_(0, analysis.atoms.atom_of[torch.arange(space.start, space.start + space.size)], per_index)
        scores += change.square()
        seen += 1
    if seen == 0:
        raise InvalidArgumentError("fxprune: the calibration data yielded no batch")
    return heads_from_channels(analysis, scores / seen, reduce="sum")
