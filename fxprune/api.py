"""The public entry points: analyze, plan, apply, prune, mask."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from . import importance as importance_
from . import budget, depth, latency_budget
from .allocate import DEFAULT_KINDS, HEAD_UNITS, global_budget, uniform
from . import coverage
from .analysis import KINDS, Analysis, analyze_captured
from .capture import capture
from .errors import InvalidArgumentError, PlanError
from .masked_reference import kept_statistics
from .plan import Plan
from . import meta
from .rewrite import apply_plan, check_compensation
from .verify import masked, masked_activations

__version__ = "0.1.0"


def _check_ratio(ratio: object, name: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise InvalidArgumentError(f"fxprune: {name} must be a number in [0, 1), got {ratio!r}")
    value = float(ratio)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise InvalidArgumentError(f"fxprune: {name} must be in [0, 1), got {ratio!r}")
    return value


def _analysis(model_or_analysis, example_inputs, untie_shared_convs: bool = False) -> Analysis:
    if isinstance(model_or_analysis, Analysis):
        return model_or_analysis
    return analyze_captured(capture(model_or_analysis, example_inputs), untie_shared_convs)


def plan(model: torch.nn.Module | Analysis, ratio: float | None = None, *, example_inputs: Sequence | None = None,
         importance: str = "l2", kinds: Iterable[str] = DEFAULT_KINDS, head_ratio: float = 0.0, seed: int = 0,
         untie_shared_convs: bool = False, target_macs: float | None = None, target_params: float | None = None,
         target_latency: float | None = None, data: Iterable | None = None, min_head_width: int = 1, ignored_layers: Iterable[str] = (),
         round_to: int = 1, strict: bool = False, heads: str = "kv_groups", equal_head_dims: bool = True) -> Plan:
    """Decide what to remove.

    With ``ratio``: ``head_ratio`` of every attention's heads, then ``ratio`` of every remaining head's channels
    (and of every MLP hidden layer) in every prunable group. With ``target_macs`` or ``target_params`` (a
    fraction of the original, instead of ``ratio``): the least important channels model-wide, compared
    within each kind (qk, v, mlp), until the budget is met; every head keeps ``min_head_width`` channels.
    ``target_latency`` is such a budget on the time of a forward pass at the example inputs, on the device the
    model is on: every node of the original is timed once, and each node's time is scaled by the share of its
    MACs (or, for other ops, of its output elements) the plan keeps (``fxprune/latency_budget.py``;
    ``plan.options["latency_ms"]`` holds the original's estimate, ``["reached"]`` the fraction kept).

    ``importance``: "l2", "l1", "random", "dimap" (data-free), "taylor" and "attention" (need ``data``: input
    batches). ``ignored_layers``: module names (or prefixes) whose parameters must not shrink: every group
    touching them is left whole. ``round_to``: keep widths that are multiples of it where possible (removing
    fewer channels, never more).
    When the plan removes less than asked (frozen groups, rounding, constraints: more than a point below
    ``ratio``, or a target missed by more than a point), a ``PruningShortfallWarning`` says how much less and
    why (``plan.options["coverage"]`` holds the numbers); ``strict=True`` raises ``PlanError`` instead.
    ``equal_head_dims`` (default on): q/k and v of every fused ``scaled_dot_product_attention`` keep the same
    head width, the mean of what each would keep (its fast kernels need equal widths; unequal ones fall back to
    the math kernel, 3–4× slower per attention on this CPU); off, each group keeps its own count.
    ``untie_shared_convs`` first gives every head its own copy of a depthwise conv the heads share (FLatten's
    DWC on V; numerically identical), so heads may choose their own channels and be removed whole.
    ``heads``: what ``head_ratio`` removes in grouped-query attention: "kv_groups" (the default: whole kv
    groups, their k and v rows with every query head reading them) or "q_heads" (the same number of query
    heads inside every kv group, their q rows and o columns; k and v stay; the only way to remove heads of
    multi-query attention, whose single kv head every query head reads). Query heads are ranked by the L2
    norm of their weights. Not combined with ``target_macs`` / ``target_params`` yet.
    ``kinds`` may include "depth": whole residual branches (a block's attention or MLP) are removed too,
    scored by how much they change their input on ``data`` (or the example inputs): ``ratio`` of them, or
    under a target the same threshold on their quantile as on the channels' (``plan.branches``).
    ``kinds`` may include "layers" instead: whole blocks (every residual branch under one module path, a
    block's attention and its MLP), scored by how much removing each alone changes the model's outputs on
    ``data`` (or the example inputs; one forward per block and batch; ``plan.options["layers"]``), what a
    model's own code follows by deleting the block (``fxprune.to_module``).
    ``kinds`` may include "residual": the residual stream's width (one group per stream, a stage in Swin),
    removed from everything that reads or writes it (embeddings, tokens, every block's projections, norms,
    layer scales, the classifier). Its norms then normalise over the kept channels: the pruned model equals
    the original whose stream norms compute their statistics over the kept channels (activation level).
    """
    targets = [t for t in (ratio, target_macs, target_params, target_latency) if t is not None]
    if len(targets) > 1:
        raise InvalidArgumentError("fxprune: give one of ratio, target_macs, target_params or target_latency")
    budgets = {"macs": target_macs, "params": target_params, "latency": target_latency}
    budget_name = next((name for name, value in budgets.items() if value is not None), None)
    ratio = 0.0 if not targets else ratio
    head_ratio = _check_ratio(head_ratio, "head_ratio")
    if heads not in HEAD_UNITS:
        raise InvalidArgumentError(f"fxprune: heads must be one of {list(HEAD_UNITS)}, got {heads!r}")
    if heads != "kv_groups" and budget_name is not None:
        raise InvalidArgumentError(f"fxprune: heads={heads!r} works with ratio, not with target_{budget_name}")
    kinds = _check_kinds(kinds)
    if {"depth", "layers"} <= set(kinds):
        raise InvalidArgumentError("fxprune: kinds 'depth' (single residual branches) and 'layers' (whole blocks) "
                                   "both remove branches; give one")
    if "heads" in kinds and head_ratio > 0:
        raise InvalidArgumentError("fxprune: whole heads are asked twice, by kinds ('heads') and by head_ratio; give "
                                   "one (kinds: the same ratio or budget as the other kinds; head_ratio: a ratio of "
                                   "its own)")
    if isinstance(min_head_width, bool) or not isinstance(min_head_width, int) or min_head_width < 1:
        raise InvalidArgumentError(f"fxprune: min_head_width must be a positive integer, got {min_head_width!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InvalidArgumentError(f"fxprune: round_to must be a positive integer, got {round_to!r}")
    ignored = tuple(ignored_layers) if not isinstance(ignored_layers, str) else (ignored_layers,)
    criterion = importance_.criterion(importance)
    if criterion.needs_data and data is None:
        raise InvalidArgumentError(f"fxprune: importance '{importance}' needs calibration data: pass data=[batch, ...] "
                                   "(a DataLoader or a list of input tensors)")
    analysis = _analysis(model, example_inputs, untie_shared_convs)
    names = {n for n, _ in analysis.gm.named_modules()}
    for name in ignored:
        if name not in names:
            raise InvalidArgumentError(f"fxprune: ignored_layers names '{name}', which is not a module of the model")
    scores = importance_.score(analysis, importance, seed=seed, data=data)
    input_shapes = [list(t.shape) for t in analysis.captured.example_inputs if isinstance(t, torch.Tensor)]
    input_dtypes = [str(t.dtype).removeprefix("torch.") for t in analysis.captured.example_inputs
                    if isinstance(t, torch.Tensor)]
    options = {"importance": importance, "seed": seed, "input_shapes": input_shapes, "input_dtypes": input_dtypes,
               "untie_shared_convs": analysis.captured.untied}
    branches = depth.find_branches(analysis) if {"depth", "layers"} & set(kinds) else []
    units = depth.blocks(branches) if "layers" in kinds and branches else None  # whole blocks, by their effect
    branch_scores = (_block_scores if units else _branch_scores)(analysis, branches, data) if branches else None
    if budget_name is not None:
        target = _check_budget(budgets[budget_name], f"target_{budget_name}")
        measure = _measure(analysis, budget_name, branches)
        options["budget"] = budget_name
        if budget_name == "latency":
            options["latency_ms"] = round(1000 * measure(torch.zeros(analysis.atoms.count, dtype=torch.bool)), 4)
        p = global_budget(analysis, scores, measure, target, kinds,
                          per_group_normalisation=not criterion.comparable_across_groups,
                          min_head_width=min_head_width, head_ratio=head_ratio, options=options,
                          ignored=ignored, round_to=round_to, branch_scores=branch_scores,
                          equal_head_dims=equal_head_dims, branch_units=units)
        asked, what = target, options["budget"]
    else:
        asked, what = _check_ratio(ratio), "channels"
        options["heads"] = heads
        p = uniform(analysis, scores, asked, kinds, head_ratio=head_ratio, options=options, ignored=ignored,
                    round_to=round_to, heads=heads, equal_head_dims=equal_head_dims)
        if branch_scores:  # the same share of the residual branches (blocks), the least important first
            chosen = sorted(branch_scores, key=branch_scores.get)[:int(round(asked * len(branch_scores)))]
            p.branches = [b for unit in chosen for b in (units[unit] if units else [unit])]
    if branch_scores:
        p.options["branch_scores"] = {name: round(score, 6) for name, score in branch_scores.items()}
    if units:  # the blocks removed whole, for to_module and the coverage count
        p.options["layers"] = [block for block, names in units.items() if set(names) <= set(p.branches)]
    p.options["coverage"] = coverage.assess(analysis, p, kinds, asked, what)
    coverage.enforce(p.options["coverage"], strict)
    return p


def _calibration(analysis: Analysis, data: Iterable | None) -> list[tuple]:
    """Up to 8 calibration batches, or the example inputs without data."""
    from .data import batches, input_names

    return list(batches(data, 8, input_names(analysis.gm))) if data is not None \
        else [tuple(analysis.captured.example_inputs)]


def _branch_scores(analysis: Analysis, branches: list, data: Iterable | None) -> dict[str, float]:
    """Scores of residual branches on the calibration batches (on the example inputs without them)."""
    return depth.branch_scores(analysis, branches, _calibration(analysis, data))


def _block_scores(analysis: Analysis, branches: list, data: Iterable | None) -> dict[str, float]:
    """Scores of whole blocks: their effect on the outputs, on the calibration batches (or the example inputs)."""
    return depth.block_scores(analysis, branches, _calibration(analysis, data))


def _measure(analysis: Analysis, what: str, branches: list):
    """MACs, parameters or estimated seconds of (removed atoms, removed branch names)."""
    by_name = {b.name: b for b in branches}
    estimate = latency_budget.Estimator(analysis, latency_budget.profile(analysis)) if what == "latency" else None

    def measure(removed: torch.Tensor, names: Sequence[str] = ()) -> float:
        chosen = [by_name[n] for n in names]
        if what == "latency":
            return estimate(removed, depth.dropped_nodes(chosen))
        if what == "macs":
            return budget.macs(analysis, removed, depth.dropped_nodes(chosen))
        return budget.params(analysis, removed, set().union(*(b.parameters for b in chosen)) if chosen else set())
    return measure


KINDS_ASKED = (*KINDS, "depth", "layers")  # channel group kinds, whole residual branches, whole blocks


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS_ASKED]
    if unknown:
        raise InvalidArgumentError(f"fxprune: unknown kind(s) {unknown}; kinds are {list(KINDS_ASKED)}")
    return kinds


def _check_budget(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)) \
            or not 0.0 < float(value) <= 1.0:
        raise InvalidArgumentError(f"fxprune: {name} must be a fraction of the original in (0, 1], got {value!r}")
    return float(value)


def _inputs_from_plan(p: Plan) -> tuple | None:
    shapes = p.options.get("input_shapes")
    if not shapes:
        return None
    generator = torch.Generator().manual_seed(0)
    dtypes = [getattr(torch, name) for name in p.options.get("input_dtypes") or ["float32"] * len(shapes)]
    # integer inputs (token ids, attention masks) are ones: a valid token and an attended position
    return tuple(torch.randn(*s, generator=generator, dtype=d) if d.is_floating_point else torch.ones(s, dtype=d)
                 for s, d in zip(shapes, dtypes))


def apply(model: torch.nn.Module | Analysis, p: Plan, *, example_inputs: Sequence | None = None,
          reweight_data: Iterable | None = None, verify: bool = True, compensation: str | None = None) -> fx.GraphModule:
    """Carry out a plan: a physically smaller GraphModule that carries the plan (``fxprune.plan_of``).

    With ``reweight_data`` (calibration input batches) the removed channels are compensated. ``compensation``:
    "least_squares" re-solves the kept weights and bias of every Linear whose inputs shrank, and moves the
    removed k rows' share of each head's logits into its kept k rows, folded into plain weights
    (``rewrite/compensate.py``); "sequential" (the default) does the same layer after layer with each layer's
    inputs taken from the model pruned and compensated so far; "reweight" gives every Linear whose inputs shrank a
    per-channel scale and bias fitted to reproduce the unpruned layer (graph nodes, trainable;
    ``fold_reweights`` merges them).
    ``verify`` (default on): run the result on the example inputs and on another batch size against the masked
    original and raise ``RewriteError`` (naming the first diverging node) rather than return a wrong model;
    ``fxprune.check_of(pruned)`` tells what was compared.
    """
    if not isinstance(p, Plan):
        raise InvalidArgumentError(f"fxprune: expected a Plan, got {type(p).__name__}")
    compensation = check_compensation(compensation, reweight_data)
    analysis = _replay_analysis(model, p, example_inputs)
    return apply_plan(analysis, p, train=analysis.captured.was_training, reweight_data=reweight_data, verify=verify,
                      compensation=compensation)


def _replay_analysis(model: torch.nn.Module | Analysis, p: Plan, example_inputs: Sequence | None) -> Analysis:
    """The analysis a plan replays on: the given inputs, else the model's default input, else the plan's."""
    if example_inputs is None and not isinstance(model, Analysis):
        from .capture import resolve_example_inputs

        try:
            example_inputs = resolve_example_inputs(model, None)
        except InvalidArgumentError:
            example_inputs = _inputs_from_plan(p)
    return _analysis(model, example_inputs, bool(p.options.get("untie_shared_convs")))


_KNOWN_OPTIONS = {"kinds", "seed", "head_ratio", "untie_shared_convs", "target_macs", "target_params",
                  "target_latency", "data",
                  "min_head_width", "reweight_data", "ignored_layers", "round_to", "strict", "verify", "compensation",
                  "heads", "equal_head_dims"}


def prune(model: torch.nn.Module, ratio: float | None = None, *, example_inputs: Sequence | None = None,
          importance: str = "l2", **options) -> fx.GraphModule:
    """Remove ``ratio`` of each head's q/k and v channels and of every MLP hidden layer.

    Returns a new, physically smaller ``torch.fx.GraphModule``; ``model`` is not modified.
    Options: ``target_macs`` / ``target_params`` / ``target_latency`` (instead of ``ratio``; see ``plan``), ``data`` (calibration
    batches for data-driven importance), ``min_head_width``, ``reweight_data`` (see ``apply``),
    ``head_ratio`` (fraction of every attention's heads to remove first, at least one stays), ``heads`` (kv
    groups or query heads, see ``plan``),
    ``kinds`` (group kinds to prune, default qk, v, mlp; also residual and depth, see ``plan``), ``seed`` (for ``importance="random"``),
    ``untie_shared_convs`` (see ``plan``), ``ignored_layers``, ``round_to``, ``strict`` (see ``plan``: an error
    instead of a warning when less is removed than asked), ``verify`` and ``compensation`` (see ``apply``).
    """
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise InvalidArgumentError(f"fxprune: unknown option(s) {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}")
    if ratio is None and all(options.get(f"target_{b}") is None for b in ("macs", "params", "latency")):
        raise InvalidArgumentError("fxprune: give ratio (e.g. prune(model, 0.5)) or target_macs= / target_params= / "
                                   "target_latency=")
    if ratio is not None:
        ratio = _check_ratio(ratio)
    analysis = _analysis(model, example_inputs, bool(options.pop("untie_shared_convs", False)))
    reweight_data = options.pop("reweight_data", None)
    verify = options.pop("verify", True)
    compensation = check_compensation(options.pop("compensation", None), reweight_data)
    p = plan(analysis, ratio, importance=importance, **options)
    return apply_plan(analysis, p, train=analysis.captured.was_training, reweight_data=reweight_data, verify=verify,
                      compensation=compensation)


def plan_of(gm: fx.GraphModule) -> Plan:
    """The plan a pruned GraphModule was made with."""
    p = getattr(gm, "meta", {}).get(meta.PLAN)
    if p is None:
        raise PlanError("fxprune: this module carries no plan; it was not made by fxprune.prune/apply")
    return p


def check_of(gm: fx.GraphModule):
    """The self-check a pruned GraphModule passed (``CheckResult``: error, batch sizes, reference, seconds),
    or None when it was made with ``verify=False``."""
    plan_of(gm)  # a clear error for modules fxprune did not make
    return gm.meta.get(meta.CHECK)


def mask(model: torch.nn.Module | Analysis, p: Plan, *, example_inputs: Sequence | None = None,
         activations: bool = False) -> torch.nn.Module:
    """A copy of ``model`` with the plan's removed channels zeroed instead of removed.

    Zeroes the weights that produce and consume them; with ``activations=True`` it zeroes every activation's
    removed channels and heads instead (a GraphModule, for the example batch size), which is what removal
    computes even where an op turns zeros into something else (FLatten's ReLU(x) + ε before norms).
    For a plan made with ``untie_shared_convs`` (or when given an Analysis) the copy is of the captured
    graph, which computes what the model computes but holds the untied parameters.
    A plan that narrows a residual stream gets the activation-level reference (a copy of the captured graph):
    each LayerNorm/RMSNorm over the stream normalises over the kept channels, as the pruned norm does.
    """
    analysis = _replay_analysis(model, p, example_inputs)
    reference = kept_statistics(analysis, p.removed_atoms(analysis))
    if activations:
        return masked_activations(reference, p)
    if reference is not analysis:
        return masked(reference.gm, analysis, p)
    if isinstance(model, Analysis):
        return masked(model.gm, model, p)
    return masked(analysis.gm if analysis.captured.untied else model, analysis, p)
