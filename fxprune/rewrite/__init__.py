"""Rewrite: apply a plan to a copy of the analysed graph, one pass per job.

Every pass takes the graph module (and what it needs from the analysis) and returns torch.fx's
``PassResult(graph_module, modified)``.

1. ``slice_grouped``        a grouped convolution keeps each group's columns of its kept inputs
   ``slice_parameters``     parameters and buffers lose their removed channels; module attributes follow
2. ``slice_starts``         a middle range of channels sliced by position learns its new start
   ``fix_sizes``            sizes baked into the graph shrink (each op's ``resize``); other shape-derived
                            values keep their original value
3. ``keep_attention_scale`` SDPA keeps its original softmax scale
4. ``gather_rows``          a table shared by all heads (rotary cos/sin) is read per head, by kept channel
   ``drop_branches``        residual branches the plan removes whole: add(x, f(x)) -> x (``depth.py``)
then the graph is linted and recompiled, checked against the masked original (``check.py``; raises
``RewriteError`` naming the first diverging node); with calibration data the removed channels are then
compensated, which departs from the masked original on purpose:
5. ``least_squares``        (compensation "least_squares" / "sequential") kept weights re-solved, folded in
   ``insert_reweights``     (compensation "reweight") per-channel scale and bias nodes, trainable
and the plan is attached to the result.
"""
from __future__ import annotations

import copy
import dataclasses

import torch.fx as fx

from .. import meta
from ..analysis.query_heads import removal
from ..analysis.shapes import kept_indices, new_shapes
from ..check import check_pruned
from ..depth import by_name
from ..masked_reference import kept_statistics
from ..plan import Plan
from .attention_scale import keep_attention_scale
from .fix_sizes import fix_sizes
from .compensate import least_squares
from .drop_branches import bypass, drop_branches
from .editable_copy import editable_copy
from .gather_rows import gather_rows
from .reweight import consumers, insert_reweights, reweight_statistics
from .slice_grouped import slice_grouped
from .slice_parameters import slice_parameters
from .slice_starts import slice_starts


COMPENSATIONS = ("least_squares", "sequential", "reweight")
DEFAULT_COMPENSATION = "sequential"  # on DINOv2-S at 40% MACs: 86.7% top-1 where one-shot kept 56.1%


def check_compensation(compensation: object, data) -> str:
    """``compensation`` (None: the default) if it is one of ``COMPENSATIONS``; asked for by name, it needs data."""
    from ..errors import InvalidArgumentError

    if compensation is None:
        return DEFAULT_COMPENSATION
    if compensation not in COMPENSATIONS:
        raise InvalidArgumentError(f"fxprune: unknown compensation {compensation!r}; choose one of {list(COMPENSATIONS)}")
    if data is None:
        raise InvalidArgumentError(f"fxprune: compensation {compensation!r} fits on calibration batches: pass "
                                   "reweight_data=[batch, ...]")
    return compensation


def apply_plan(analysis, plan: Plan, train: bool = False, reweight_data=None, verify: bool = True,
               compensation: str = DEFAULT_COMPENSATION) -> fx.GraphModule:
    """A pruned copy of the analysed graph; with ``verify``, checked against the masked original first;
    with ``reweight_data``, compensated as ``compensation`` says (one of ``COMPENSATIONS``)."""
    analysis, removed = removal(analysis, plan)  # finer than atoms where query heads go inside kv groups
    keep = kept_indices(analysis, removed)
    # tensors about to be sliced are not copied first (slicing makes new ones): the copy costs what is kept
    sliced = {id(t): t for t in (analysis.tensor(name) for name, dims in keep.items() if dims)}
    gm = editable_copy(analysis.gm, sliced)
    reweighting = reweight_data is not None and compensation == "reweight"
    fits = _fit_reweights(analysis, keep, reweight_data) if reweighting else {}
    slice_grouped(gm, analysis.atoms.atom_of, removed, keep)
    slice_parameters(gm, keep)
    shapes = new_shapes(gm, analysis.atoms.atom_of, removed)
    slice_starts(gm, analysis.atoms.atom_of, removed)
    fix_sizes(gm, shapes)
    keep_attention_scale(gm, shapes)
    gather_rows(gm, analysis.atoms.atom_of, removed)
    branches = by_name(analysis, plan.branches) if plan.branches else []
    drop_branches(gm, branches)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    if verify:  # before reweighting, which departs from the masked original on purpose
        # norms first: the graph that still reads every module keeps them all for the weight masks
        reference = _without(kept_statistics(analysis, removed), branches)
        gm.meta[meta.CHECK] = check_pruned(reference, removed, gm)
    if reweight_data is not None and compensation != "reweight":
        from ..data import batches, input_names

        data = batches(reweight_data, names=input_names(analysis.gm))
        gm.meta[meta.COMPENSATED] = least_squares(gm, analysis, keep, removed, data,
                                                  sequential=compensation == "sequential", removed_branches=branches)
        gm.recompile()
    if fits:
        insert_reweights(gm, fits)
        gm.meta[meta.REWEIGHTED_NODES] = sorted(fits)
    gm.meta[meta.PLAN] = plan
    gm.meta[meta.ARCHITECTURE] = analysis.captured.architecture
    gm.train(train)
    return gm


def _without(analysis, branches: list):
    """The analysis with its graph's removed residual branches dropped (sharing the modules): the reference
    the self-check compares with is the original with those branches' outputs zeroed."""
    if not branches:
        return analysis
    reference = fx.GraphModule(analysis.gm, copy.deepcopy(analysis.gm.graph))
    reference.meta = dict(analysis.gm.meta)
    bypass(reference.graph, branches)  # the graph only: its modules are the analysis' own
    reference.recompile()
    return dataclasses.replace(analysis, captured=dataclasses.replace(analysis.captured, gm=reference))


def _fit_reweights(analysis, keep, data) -> dict:
    """Least-squares reweights for every Linear whose inputs shrink, from the unpruned graph's activations."""
    from ..data import batches, input_names

    targets = [(name, analysis.tensor(weight), kept) for name, weight, kept in consumers(analysis, keep)]
    statistics = reweight_statistics(analysis.gm, targets, batches(data, names=input_names(analysis.gm)))
    return {name: stats.fit() for name, stats in statistics.items()}
