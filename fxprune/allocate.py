"""Allocation: turn importance scores into a plan (which channels of which head go)."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .plan import Plan

DEFAULT_KINDS = ("qk", "v", "mlp")


def uniform(analysis, scores: torch.Tensor, ratio: float, kinds: Iterable[str] = DEFAULT_KINDS,
            options: dict | None = None) -> Plan:
    """Remove ``ratio`` of every head's channels in every prunable group of the given kinds.

    Every head removes the same count (``floor(ratio * head_width)``, keeping at least one channel); each
    head picks its own lowest-scoring channels. Groups whose heads share offsets have a single row.
    """
    kinds = tuple(kinds)
    counts = {}
    for group in analysis.groups:
        width = min(len(r) for r in group.rows)
        eligible = group.kind in kinds and group.prunable
        counts[group.name] = min(math.floor(ratio * width + 1e-9), width - 1) if eligible else 0
    for group in analysis.groups:  # groups stacked in one tensor must keep equal counts per row
        for peer in group.same_count_as:
            counts[group.name] = min(counts[group.name], counts[peer])
    removed: dict[str, list[list[int]]] = {}
    for group in analysis.groups:
        count = counts[group.name]
        if count <= 0:
            continue
        rows = []
        for row in group.rows:
            row_scores = scores[torch.tensor(row, dtype=torch.long)]
            order = torch.argsort(row_scores, stable=True)
            rows.append(sorted(order[:count].tolist()))
        removed[group.name] = rows
    return Plan(removed, dict(options or {}, ratio=ratio, kinds=list(kinds)))
