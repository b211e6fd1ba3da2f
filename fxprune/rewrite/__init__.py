"""Rewrite: apply a plan to a copy of the analysed graph, one pass per job.

1. ``slice_parameters``   parameters and buffers lose their removed channels; module attributes follow
2. ``fix_sizes``          reshape/view/expand/split sizes shrink; other shape-derived values stay as they were
3. ``keep_attention_scale`` SDPA keeps its original softmax scale
then the graph is linted and recompiled, and the plan is attached to the result.
"""
from __future__ import annotations

import copy

import torch.fx as fx

from ..plan import Plan
from .attention_scale import keep_attention_scale
from .fix_sizes import fix_sizes
from .shapes import new_shapes
from .slice_parameters import kept_indices, slice_parameters

PLAN_KEY = "fxprune_plan"


def apply_plan(analysis, plan: Plan, train: bool = False) -> fx.GraphModule:
    removed = plan.removed_atoms(analysis)
    gm = copy.deepcopy(analysis.gm)
    keep = kept_indices(analysis, removed)
    slice_parameters(gm, keep)
    shapes = new_shapes(gm, analysis.atoms.atom_of, removed)
    fix_sizes(gm, shapes)
    keep_attention_scale(gm, shapes)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.meta[PLAN_KEY] = plan
    gm.train(train)
    return gm
