"""The automatic method, after "Automatic Channel Pruning for Multi-Head Attention" (Lee & Hwang, 2024).

Only the paper's abstract is public; this is fxprune's formulation of its five parts, each switchable:

1. **learnable pruning indicator**: one logit θ_a per prunable channel (atom), indicator m_a = sigmoid(θ_a),
   multiplied onto the channel where it is produced (``fxprune.gating``). Trained on calibration data with
   Adam to minimise distillation from the unpruned model (MSE between outputs) plus a penalty that pushes a
   differentiable MACs estimate, MACs(m) = MACs_full − Σ_a c_a (1 − m_a) with c_a the exact MACs of
   channel a (from the analysed shapes), below the target.
2. **channel-similarity weights** (``similarity=True``): a channel that resembles the others of its head
   (mean |cosine| between its weights and theirs) is redundant; its MACs saving counts for more,
   (1 + redundancy) · c_a, so redundant channels are the cheaper ones to give up and informative,
   non-redundant ones stay.
3. **equal removal across heads** (``equal_heads=True``): the indicators are read out per group with the same
   share of channels removed in every head, each head choosing its own. Physical removal needs equal counts
   in any case; with ``equal_heads=False`` channels are chosen without regard to heads and every head then
   shrinks only as far as the least-pruned head allows (the misalignment the paper avoids, made physical).
4. **attention-difference initialisation** (``attention_init=True``): θ starts from the "attention"
   criterion (first-order change of the attention outputs without each channel), as quantiles within each
   group mapped to logits in [−1, 3]; otherwise θ = 3 everywhere.
5. **reweight module** (``reweight=True``): after removal, what the removed channels contributed is fitted
   back on the calibration data (``fxprune.apply(..., reweight_data=...)``): by default the kept weights of
   every projection whose inputs shrank are re-solved by least squares, layer after layer, and folded in
   (``compensation="sequential"``, or "least_squares" in one shot); ``compensation="reweight"`` is the paper's module, per-channel scale
   and bias nodes in front of those projections, trainable, folded away by ``fxprune.fold_reweights``.

The final selection meets the MACs target within the global-budget search (``fxprune.plan(target_macs=)``)
using the trained indicators as importance. Deterministic under ``seed``.

``kinds`` may add "residual" and "depth". A residual stream channel's indicator is applied where the stream
is read (``fxprune.gating``: the stream's norms weight their mean and variance by it, Linear inputs are
multiplied by it), so at 0 it is exactly the channel removed and the training sees what narrowing the stream
does to the norms. A residual branch (``fxprune.depth``) gets one indicator multiplying its output before
the residual add (0 is exactly the branch removed), its cost the MACs the branch holds, its start from the
branch score ‖f(x)‖ / ‖x‖ ranked like the channels'. The differentiable MACs estimate adds the branches' and
the channels' savings, counting a channel inside a removed branch twice; the final budget search counts
exactly.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from . import budget, depth
from . import importance as importance_
from .allocate import DEFAULT_KINDS, global_budget
from .analysis import analyze_captured
from .capture import capture
from .errors import InvalidArgumentError
from .gating import gated_graph
from .data import batches
from .rewrite import apply_plan, check_compensation


def _prunable(analysis, kinds: tuple) -> list:
    return [g for g in analysis.groups if g.kind in kinds and g.prunable and not g.same_count_as]


def branch_costs(analysis, branches: list) -> torch.Tensor:
    """Exact MACs of each residual branch: what removing it alone saves."""
    nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    full = budget.macs(analysis, nothing)
    return torch.tensor([float(full - budget.macs(analysis, nothing, depth.dropped_nodes([b]))) for b in branches],
                        dtype=torch.float64)


def channel_costs(analysis, groups: list) -> torch.Tensor:
    """Exact MACs of each prunable channel: the MACs saved by removing one channel from every head / rows."""
    costs = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    full = budget.macs(analysis, nothing)
    for group in groups:
        removed = nothing.clone()
        removed[torch.tensor([row[0] for row in group.rows])] = True
        saved = (full - budget.macs(analysis, removed)) / len(group.rows)
        costs[torch.tensor(group.atoms)] = saved
    return costs


def redundancy(analysis, groups: list) -> torch.Tensor:
    """Mean |cosine similarity| of each channel's weights to the other channels of its head (0 for singletons)."""
    vectors: dict[int, list[torch.Tensor]] = {}
    for space in analysis.ids.param_spaces:
        tensor = analysis.tensor(space.param).detach().to(torch.float64)
        if tensor.ndim < 2:
            continue
        rows = tensor.movedim(space.dim, 0).reshape(space.size, -1)
        for i, atom in enumerate(analysis.atoms.atom_of[torch.arange(space.start, space.start + space.size)].tolist()):
            vectors.setdefault(atom, []).append(rows[i])
    result = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    for group in groups:
        if group.kind == "residual":
            continue  # a stream channel's weights span every layer; the similarity is of channels within a head
        for row in group.rows:
            if len(row) < 2 or any(a not in vectors for a in row):
                continue
            stacked = torch.stack([torch.cat(vectors[a]) for a in row])
            normed = F.normalize(stacked, dim=1)
            cosine = (normed @ normed.T).abs()
            result[torch.tensor(row)] = (cosine.sum(1) - 1) / (len(row) - 1)
    return result


def _ranked_logits(scores: torch.Tensor) -> torch.Tensor:
    """Scores' ranks mapped to logits in [-1, 3] (the lowest score nearest -1)."""
    ranks = torch.argsort(torch.argsort(scores)).to(torch.float64)
    return -1.0 + 4.0 * (ranks + 0.5) / len(scores)


def _initial_logits(analysis, groups: list, scores: torch.Tensor | None) -> torch.Tensor:
    theta = torch.full((analysis.atoms.count,), 3.0, dtype=torch.float64)
    if scores is None:
        return theta
    for group in groups:
        atoms = torch.tensor(group.atoms)
        theta[atoms] = _ranked_logits(scores[atoms])
    return theta


SETTLE_EVERY = 10  # steps between two looks at the selection the indicators make
SETTLE_CHECKS = 2  # looks in a row at which it must hold still


def _selection(indicators: torch.Tensor, costs: torch.Tensor, prunable: torch.Tensor, to_remove: float) -> torch.Tensor:
    """The atoms removed first if the budget were spent now: lowest indicators until their cost reaches ``to_remove``."""
    order = torch.argsort(indicators.masked_fill(~prunable, float("inf")))
    count = int(torch.searchsorted(costs[order].cumsum(0), torch.tensor(to_remove, dtype=costs.dtype))) + 1
    chosen = torch.zeros_like(prunable)
    chosen[order[:min(count, int(prunable.sum()))]] = True
    return chosen


def _train_indicators(analysis, prunable: torch.Tensor, costs: torch.Tensor, theta: torch.Tensor, calibration: list,
                      target_macs: float, *, steps: int, lr: float, penalty: float, progress: bool,
                      settle: float | None = None, branches: Sequence = (),
                      stream_gates: bool = False) -> tuple[torch.Tensor, int]:
    """Train the indicator logits ``theta``: distil the unpruned model's output through soft gates
    (sigmoid(theta)) under a MACs penalty. Returns the indicators (float64), one per atom then one per branch of
    ``branches``, and the steps run.

    With ``settle``, training stops early once the channels the budget would remove (the lowest indicators
    worth the MACs to save) change by at most that fraction between looks, ``SETTLE_CHECKS`` looks in a row."""
    from tqdm.auto import tqdm

    full = float(budget.macs(analysis, torch.zeros(analysis.atoms.count, dtype=torch.bool)))
    gm = gated_graph(analysis, stream_gates=stream_gates, branches=branches).eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        teachers = [analysis.gm(*x) for x in calibration]
    optimiser = torch.optim.Adam([theta], lr=lr)
    weights = costs.to(torch.float32)
    mask = prunable.to(torch.float32)
    to_remove = (1 - target_macs) * full
    previous, still = None, 0
    for step in tqdm(range(steps), desc="fxprune auto_prune", disable=not progress):
        if settle is not None and step and step % SETTLE_EVERY == 0:
            chosen = _selection(theta.detach().to(torch.float64), costs, prunable, to_remove)
            if previous is not None:
                moved = int((chosen ^ previous).sum()) / max(int(chosen.sum()), 1)
                still = still + 1 if moved <= settle else 0
                if still >= SETTLE_CHECKS:
                    return torch.sigmoid(theta.detach()).to(torch.float64), step
            previous = chosen
        x, teacher = calibration[step % len(calibration)], teachers[step % len(calibration)]
        indicators = torch.sigmoid(theta) * mask + (1 - mask)
        distill = F.mse_loss(gm(indicators, *x), teacher) / teacher.var().clamp_min(1e-12)
        macs_fraction = 1 - (weights * (1 - indicators)).sum() / full
        loss = distill + penalty * F.relu(macs_fraction - target_macs) ** 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return torch.sigmoid(theta.detach()).to(torch.float64), steps


def auto_prune(model: torch.nn.Module, data: Iterable, target_macs: float, *, steps: int = 100,
               example_inputs: Sequence | None = None, lr: float = 0.05, penalty: float = 50.0,
               similarity: bool = True, attention_init: bool = True, reweight: bool = True, equal_heads: bool = True,
               kinds: Iterable[str] = DEFAULT_KINDS, seed: int = 0, progress: bool = True,
               compensation: str | None = None, init_importance: str = "attention", settle: float | None = 0.05,
               equal_head_dims: bool = True):
    """Prune ``model`` to ``target_macs`` (a fraction of its MACs) with the automatic method; returns the pruned,
    reweighted GraphModule (its plan from ``fxprune.plan_of``, the trained indicators in the plan options).
    With ``reweight``, the removed channels are compensated on ``data`` as ``compensation`` says (see
    ``fxprune.apply``: "sequential" (default) / "least_squares" weights, or trainable "reweight" nodes).
    With ``attention_init`` the
    indicators start from the ``init_importance`` criterion (e.g. "reconstruction" instead of "attention").
    ``steps`` is the most indicator-training steps; with ``settle`` (a fraction) training stops once the
    channels the budget would remove change by at most that fraction between looks ten steps apart, twice in
    a row (``None``: every step runs). The plan records the steps run in ``options["steps_run"]``.
    ``kinds``: as ``fxprune.plan``'s, "residual" (the stream's width, indicators applied where the stream is
    read) and "depth" (one indicator per residual branch; ``options["branch_indicators"]``) included.
    ``equal_head_dims``: as ``fxprune.plan``'s (q/k and v of a fused attention keep one head width)."""
    if not 0.0 < float(target_macs) <= 1.0:
        raise InvalidArgumentError(f"fxprune: target_macs must be in (0, 1], got {target_macs!r}")
    compensation = check_compensation(compensation, data)
    importance_.criterion(init_importance)  # an unknown name fails before any work
    from .api import _check_kinds, _measure

    kinds = _check_kinds(kinds)
    if {"heads", "layers"} & set(kinds):
        raise InvalidArgumentError("fxprune: auto_prune learns an indicator per channel and per branch, not per head "
                                   "or block; for whole heads or blocks use fxprune.prune with kinds ('heads' / "
                                   "'layers', ...) and a budget")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        count = len(example_inputs) if isinstance(example_inputs, (tuple, list)) else 1
        names = [f"input_{i}" for i in range(count)]
        calibration = list(batches(data, names=names))
        if not calibration:
            raise InvalidArgumentError("fxprune: auto_prune needs at least one calibration batch")
        captured = capture(model, example_inputs if example_inputs is not None else tuple(x[:1] for x in calibration[0]))
        analysis = analyze_captured(captured)
        groups = _prunable(analysis, kinds)
        branches = depth.find_branches(analysis) if "depth" in kinds else []
        prunable = torch.zeros(analysis.atoms.count + len(branches), dtype=torch.bool)
        for group in groups:
            prunable[torch.tensor(group.atoms)] = True
        prunable[analysis.atoms.count:] = True
        costs = channel_costs(analysis, groups)
        if similarity:
            costs = costs * (1 + redundancy(analysis, groups))
        costs = torch.cat([costs, branch_costs(analysis, branches)])
        init = importance_.score(analysis, init_importance, data=calibration, seed=seed) if attention_init else None
        theta = _initial_logits(analysis, groups, init)
        if branches:  # branch indicators start from the branch score (how much each changes its input)
            start = depth.branch_scores(analysis, branches, calibration) if attention_init else None
            theta = torch.cat([theta, _ranked_logits(torch.tensor([start[b.name] for b in branches], dtype=torch.float64))
                               if start else torch.full((len(branches),), 3.0, dtype=torch.float64)])
        theta = theta.to(torch.float32).requires_grad_(True)

        indicators, steps_run = _train_indicators(analysis, prunable, costs, theta, calibration, target_macs,
                                                  steps=steps, lr=lr, penalty=penalty, progress=progress, settle=settle,
                                                  branches=branches, stream_gates="residual" in kinds)
        scores = indicators[:analysis.atoms.count]
        branch_indicators = {b.name: float(indicators[analysis.atoms.count + i]) for i, b in enumerate(branches)}
        plan = global_budget(analysis, scores, _measure(analysis, "macs", branches), float(target_macs),
                             kinds, per_group_normalisation=False, per_row="mean" if equal_heads else "min",
                             branch_scores=branch_indicators or None, equal_head_dims=equal_head_dims,
                             options={"importance": "auto", "steps": steps, "similarity": similarity,
                                      "attention_init": attention_init, "reweight": reweight, "seed": seed,
                                      "equal_heads": equal_heads, "equal_head_dims": equal_head_dims,
                                      "compensation": compensation,
                                      "init_importance": init_importance, "settle": settle, "steps_run": steps_run,
                                      "input_shapes": [list(t.shape) for t in captured.example_inputs]})
        pruned = apply_plan(analysis, plan, train=captured.was_training,
                            reweight_data=calibration if reweight else None, compensation=compensation)
        plan.options["indicators"] = {g.name: [[round(float(scores[a]), 4) for a in row] for row in g.rows] for g in groups}
        if branches:
            plan.options["branch_indicators"] = {name: round(value, 4) for name, value in branch_indicators.items()}
        return pruned
    finally:
        torch.random.set_rng_state(generator_state)
