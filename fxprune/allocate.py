"""Allocation: turn importance scores into a plan (which heads, and which channels of each head, go)."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .plan import Plan, dead_rows, removed_head_channels

DEFAULT_KINDS = ("qk", "v", "mlp")


def _lowest(scores: torch.Tensor, atoms: list[int], count: int) -> list[int]:
    """Positions (within ``atoms``) of the ``count`` lowest scores, ties broken by position."""
    order = torch.argsort(scores[torch.tensor(atoms, dtype=torch.long)], stable=True)
    return sorted(order[:count].tolist())


def _fraction(ratio: float, width: int) -> int:
    """How many of ``width`` to remove for ``ratio``: rounded down, keeping at least one."""
    return min(math.floor(ratio * width + 1e-9), width - 1)


def uniform(analysis, scores: torch.Tensor, ratio: float, kinds: Iterable[str] = DEFAULT_KINDS,
            head_ratio: float = 0.0, options: dict | None = None) -> Plan:
    """Remove ``head_ratio`` of the heads of every attention, then ``ratio`` of every remaining head's channels
    (and of every MLP hidden layer) in every prunable group of the given kinds.

    Every head removes the same count (rounded down, at least one channel and one head stay); each head
    picks its own lowest-scoring channels. Groups whose heads share offsets have a single row.
    """
    kinds = tuple(kinds)
    removed: dict[str, list[list[int]]] = {}
    if head_ratio > 0:
        for group in analysis.groups:
            if group.kind == "heads" and group.prunable:
                count = _fraction(head_ratio, group.width)
                if count > 0:
                    removed[group.name] = [_lowest(scores, group.rows[0], count)]
    gone = removed_head_channels(analysis, removed)

    counts = {}
    for group in analysis.groups:
        if group.kind == "heads":
            continue
        alive = [row for row, dead in zip(group.rows, dead_rows(group, gone)) if not dead]
        width = min((len(r) for r in alive), default=0)
        eligible = group.kind in kinds and group.prunable and width > 0
        counts[group.name] = _fraction(ratio, width) if eligible else 0
    for group in analysis.groups:  # groups stacked in one tensor must keep equal counts per row
        for peer in group.same_count_as:
            counts[group.name] = min(counts[group.name], counts[peer])
    for group in analysis.groups:
        count = counts.get(group.name, 0)
        if count <= 0:
            continue
        removed[group.name] = [[] if dead else _lowest(scores, row, count)
                               for row, dead in zip(group.rows, dead_rows(group, gone))]
    return Plan(removed, dict(options or {}, ratio=ratio, head_ratio=head_ratio, kinds=list(kinds)))
