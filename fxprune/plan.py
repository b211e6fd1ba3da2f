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
    """``removed[group][row]`` lists the positions (within that head's row) of removed channels."""

    removed: dict[str, list[list[int]]]
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "options": self.options, "removed": self.removed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Plan":
        if data.get("format") != FORMAT_VERSION:
            raise PlanError(f"fxprune: plan format {data.get('format')!r} is not supported (expected {FORMAT_VERSION})")
        return Plan({k: [list(map(int, r)) for r in v] for k, v in data["removed"].items()}, dict(data.get("options", {})))

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
            counts = {len(r) for r in rows}
            if len(counts) > 1:
                raise PlanError(f"fxprune: plan removes unequal channel counts across heads of '{group_name}': {sorted(counts)}")
            for row, positions in zip(group.rows, rows):
                if len(set(positions)) != len(positions) or any(not 0 <= p < len(row) for p in positions):
                    raise PlanError(f"fxprune: bad channel positions {positions} for a head of '{group_name}' (width {len(row)})")
                if len(positions) >= len(row):
                    raise PlanError(f"fxprune: plan removes every channel of a head of '{group_name}'; keep at least one")
                mask[torch.tensor([row[p] for p in positions], dtype=torch.long)] = True
        return mask

    def kept(self, analysis, group_name: str) -> list[list[int]]:
        group = analysis.group(group_name)
        removed = self.removed.get(group_name, [[] for _ in group.rows])
        return [[i for i in range(len(row)) if i not in set(rm)] for row, rm in zip(group.rows, removed)]
