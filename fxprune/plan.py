"""A pruning plan: for each group, the channels each head removes. JSON-serialisable and replayable."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PlanError

FORMAT_VERSION = 1


@dataclass
class Plan:
    """``removed[group][row]`` lists the positions (within that head's row) of removed channels;
    ``branches`` names the residual branches removed whole (``depth.py``); ``q_heads[heads group][kv group]``
    the positions of the query heads removed inside each kv group (``heads="q_heads"``,
    ``analysis/query_heads.py``)."""

    removed: dict[str, list[list[int]]]
    options: dict[str, Any] = field(default_factory=dict)
    branches: list[str] = field(default_factory=list)
    q_heads: dict[str, list[list[int]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        record = {"format": FORMAT_VERSION, "options": self.options, "removed": self.removed}
        if self.q_heads:
            record["q_heads"] = self.q_heads
        return {**record, "branches": list(self.branches)} if self.branches else record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Plan":
        if data.get("format") != FORMAT_VERSION:
            raise PlanError(f"fxprune: plan format {data.get('format')!r} is not supported (expected {FORMAT_VERSION})")
        return Plan({k: [list(map(int, r)) for r in v] for k, v in data["removed"].items()}, dict(data.get("options", {})),
                    [str(b) for b in data.get("branches", [])],
                    {k: [list(map(int, r)) for r in v] for k, v in data.get("q_heads", {}).items()})

    @staticmethod
    def from_json(text: str) -> "Plan":
        return Plan.from_dict(json.loads(text))

    def removed_atoms(self, analysis) -> torch.Tensor:
        """Boolean mask over the analysis' atoms; checks the plan against the analysed model."""
        mask = torch.zeros(analysis.atoms.count, dtype=torch.bool)
        names = {g.name: g for g in analysis.groups}
        for group_name, rows in self.removed.items():
            group = names.get(group_name)
            if group is None:
                raise PlanError(f"fxprune: plan names group '{group_name}', which this model does not have; "
                                "was the plan made for another architecture or input size?")
            if not group.prunable and any(rows):
                raise PlanError(f"fxprune: plan removes channels of frozen group '{group_name}' ({group.frozen[0]})")
            if len(rows) != len(group.rows):
                raise PlanError(f"fxprune: plan has {len(rows)} head rows for '{group_name}', the model {len(group.rows)}")
        gone = removed_head_channels(analysis, self.removed)
        mask[torch.tensor(sorted(gone), dtype=torch.long)] = True
        for group_name, rows in self.removed.items():
            group = names[group_name]
            dead = dead_rows(group, gone) if group.kind != "heads" else [False] * len(group.rows)
            counts = {len(r) for r, d in zip(rows, dead) if not d}
            if len(counts) > 1:
                raise PlanError(f"fxprune: plan removes unequal channel counts across heads of '{group_name}': {sorted(counts)}")
            for row, positions, is_dead in zip(group.rows, rows, dead):
                if len(set(positions)) != len(positions) or any(not 0 <= p < len(row) for p in positions):
                    raise PlanError(f"fxprune: bad positions {positions} in '{group_name}' (width {len(row)})")
                if len(positions) >= len(row) and not is_dead:
                    what = "head" if group.kind == "heads" else "channel of a head"
                    raise PlanError(f"fxprune: plan removes every {what} of '{group_name}'; keep at least one")
                if positions:
                    mask[torch.tensor([row[p] for p in positions], dtype=torch.long)] = True
        residual = {a for g in analysis.groups if g.kind == "residual" for a in g.atoms}
        norm_sets = [(s, r) for s, r in analysis.atoms.stream_norm_sets if not s <= residual]
        for atom_set, reason in [*analysis.atoms.whole_sets, *norm_sets]:
            hit = mask[torch.tensor(sorted(atom_set), dtype=torch.long)]
            if hit.any() and not hit.all():
                raise PlanError(f"fxprune: plan removes part of a set that must go whole ({reason})")
        return mask


def removed_head_channels(analysis, removed: dict[str, list[list[int]]]) -> set[int]:
    """Atoms removed by whole-head removal: the head atoms and every channel atom they own."""
    gone: set[int] = set()
    for group in analysis.groups:
        if group.kind != "heads" or group.name not in removed:
            continue
        for position in removed[group.name][0]:
            if not 0 <= position < group.width:
                raise PlanError(f"fxprune: bad head position {position} in '{group.name}' ({group.width} heads)")
            head = group.rows[0][position]
            gone.add(head)
            gone |= analysis.atoms.head_links.get(head, set())
    return gone


def dead_rows(group, gone: set[int]) -> list[bool]:
    """For each head row of a channel group: True when whole-head removal already took all its channels."""
    flags = []
    for row in group.rows:
        hit = sum(1 for a in row if a in gone)
        if 0 < hit < len(row):
            raise PlanError(f"fxprune: removing heads takes part of a head row of '{group.name}'")
        flags.append(hit == len(row) and hit > 0)
    return flags
