"""Coverage: how much of a model fxprune can prune, how much a plan did, and why not more.

A call that removes less than asked (frozen groups, rounding, constraints) or misses a MACs / params target
says so: ``assess`` measures the plan, ``enforce`` warns once (``PruningShortfallWarning``) or, with
``strict=True``, raises ``PlanError``. ``Plan.options["coverage"]`` and ``Analysis.coverage()`` carry the
same numbers.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Iterable

import torch

from . import budget
from .analysis.propagate import UNKNOWN_OP
from .errors import PlanError

SLACK = 0.01  # one point: what rounding to whole channels may cost before it counts as "less than asked"


class PruningShortfallWarning(UserWarning):
    """fxprune removed less than asked; the message says how much less and why."""


def removable_macs(analysis, kinds: Iterable[str]) -> float:
    """The largest fraction of MACs that removing channels of ``kinds`` could save (one channel per head kept)."""
    from .allocate import uniform

    nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    full = budget.macs(analysis, nothing)
    if full == 0:
        return 0.0
    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    most = uniform(analysis, scores, 1.0 - 1e-9, tuple(kinds))
    return 1.0 - budget.macs(analysis, most.removed_atoms(analysis)) / full


def asked_groups(analysis, kinds: Iterable[str]) -> list:
    """The channel groups (and heads groups, for "heads") a request for ``kinds`` covers, frozen ones included.

    A hidden layer whose channels meet an op without a rule never gets coupled to its consumer, so the
    analysis cannot call it "mlp"; one producer and an unknown op say it is one (it counts as asked). A
    residual stream frozen for another reason (it reaches the output) is kind "other" but counts as asked
    for "residual".
    """
    kinds = set(kinds)
    return [g for g in analysis.groups if g.kind in kinds or ("mlp" in kinds and _hidden_behind_unknown_op(analysis, g))
            or ("residual" in kinds and g.stream)]


def _hidden_behind_unknown_op(analysis, group) -> bool:
    if group.kind != "other" or not any(UNKNOWN_OP in reason for reason in group.frozen):
        return False
    producers = [s for s in group.members if s.dim == 0 and analysis.tensor(s.param).ndim >= 2]
    return len(producers) == 1


def frozen_reasons(analysis, kinds: Iterable[str], top: int = 3) -> list[tuple[str, int]]:
    """The most common reasons (with group counts) why groups of ``kinds`` are frozen."""
    counts = Counter(_strip_node(g.frozen[0]) for g in asked_groups(analysis, kinds) if not g.prunable)
    return counts.most_common(top)


def _strip_node(reason: str) -> str:
    """'blocks_0_attn_qkv: no rule for ...' -> 'no rule for ...' (the same cause in every block counts once)."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and " " not in head else reason


def channel_fraction(analysis, plan, kinds: Iterable[str]) -> float:
    """The fraction of channels (atoms) of all groups of ``kinds``, frozen ones included, that ``plan`` removes."""
    removed = plan.removed_atoms(analysis)
    atoms = [a for g in asked_groups(analysis, kinds) for a in g.atoms]
    if not atoms:
        return 0.0
    return float(removed[torch.tensor(atoms, dtype=torch.long)].float().mean())


def assess(analysis, plan, kinds: Iterable[str], asked: float, measure: str) -> dict:
    """What was asked and reached, the removable share of MACs and the top frozen reasons, as plain data.

    ``measure``: "channels" (``asked`` is a ratio removed), "macs", "params" or "latency" (``asked`` is a
    fraction kept).
    """
    kinds = tuple(kinds)
    unit = "channels and heads" if "heads" in kinds else "channels"
    if measure == "channels" and set(kinds) <= {"depth", "layers"}:  # only whole branches were asked for
        unit = "blocks" if "layers" in kinds else "residual branches"
        count = len(plan.options.get("branch_scores", {}))  # branches, or blocks for "layers"
        removed = len(plan.options.get("layers", [])) if "layers" in kinds else len(plan.branches)
        reached = removed / count if count else 0.0
        # a share of a few branches rounds; a model without any removed nothing of what was asked
        short = reached < asked - max(SLACK, 0.5 / count) if count else asked > 0
    elif measure == "channels":
        reached = channel_fraction(analysis, plan, kinds)
        short = reached < asked - SLACK
    else:
        reached = float(plan.options.get("reached", 1.0))
        short = reached > asked + SLACK
    return {"measure": measure, "unit": unit, "asked": round(asked, 4), "reached": round(reached, 4), "short": short,
            "removable_macs": round(removable_macs(analysis, kinds), 4) if short else None,
            "frozen": [[reason, n] for reason, n in frozen_reasons(analysis, kinds)],
            "unknown_ops": sorted({op.target for op in analysis.unknown_ops if op.touched_channels})}


def message(coverage: dict) -> str:
    if coverage["measure"] == "channels":
        what = (f"removed {100 * coverage['reached']:.1f}% of the {coverage.get('unit', 'channels')} where "
                f"{100 * coverage['asked']:.1f}% was asked")
    else:
        measured = {"macs": "MACs", "params": "parameters", "latency": "estimated latency"}[coverage["measure"]]
        what = f"kept {100 * coverage['reached']:.1f}% of the {measured} where {100 * coverage['asked']:.1f}% was the target"
    lines = [f"fxprune: {what}."]
    if coverage.get("removable_macs") is not None:
        lines.append(f"At most {100 * coverage['removable_macs']:.1f}% of the MACs can be removed in these kinds.")
    if coverage["frozen"]:
        lines.append("Frozen groups, most common reasons: " +
                     "; ".join(f"{reason} ({n} group{'s' if n > 1 else ''})" for reason, n in coverage["frozen"]) + ".")
    if coverage["unknown_ops"]:
        lines.append("Ops without a rule: " + ", ".join(coverage["unknown_ops"][:5]) + " (fxprune.register_op adds one).")
    lines.append("`fxprune.analyze(model)` prints every group; strict=True makes this an error.")
    return " ".join(lines)


def enforce(coverage: dict, strict: bool) -> None:
    """Warn once (or raise, with ``strict``) when the plan did less than asked."""
    if not coverage["short"]:
        return
    if strict:
        raise PlanError(message(coverage))
    warnings.warn(message(coverage), PruningShortfallWarning, stacklevel=4)
