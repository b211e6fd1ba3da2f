"""Analysis: which channels of which parameters must be removed together, found from the graph alone.

``analyze`` runs the op rules (``rules.py``) over a captured graph, resolves the couplings into atoms
(channels removed together) and gathers atoms into groups with their head layout and constraints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import torch

from ..capture import Captured, capture, paused_gc
from .channels import Atoms, ChannelIds
from .groups import KINDS, Group, build_groups
from .. import meta
from .propagate import UnknownOp, propagate


@dataclass
class Analysis:
    captured: Captured
    ids: ChannelIds
    atoms: Atoms
    groups: list[Group]
    unknown_ops: list[UnknownOp]

    @property
    def gm(self):
        return self.captured.gm

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def coverage(self, kinds: Sequence[str] = ("qk", "v", "mlp")) -> dict:
        """How much of the model can shrink: the largest removable share of MACs in ``kinds``, the most common
        reasons groups of those kinds are frozen, and the ops without a rule that touch channels."""
        from ..coverage import frozen_reasons, removable_macs

        return {"removable_macs": removable_macs(self, kinds),
                "frozen": frozen_reasons(self, kinds),
                "unknown_ops": sorted({op.target for op in self.unknown_ops if op.touched_channels})}

    def branches(self) -> list:
        """The residual branches (a block's attention or MLP) that ``kinds=("depth",)`` may remove whole."""
        from ..depth import find_branches

        return find_branches(self)

    def tensor(self, name: str) -> torch.Tensor:
        return _get_tensor(self.gm, name)

    def graph(self) -> nx.Graph:
        """The dependency graph: nodes are channel spaces (parameter dims), edges the couplings the rules made.

        Each edge carries ``index_map`` (sorted pairs of coupled indices, in the edge's node order ``(u, v)``
        as stored in ``edge["spaces"]``) and ``identity`` (every pair is i -> i); each node carries ``groups``.
        """
        g = nx.Graph()
        spaces = self.ids.spaces
        starts = torch.tensor([s.start for s in spaces])
        group_of_atom = {a: group.name for group in self.groups for a in group.atoms}
        for s in spaces:
            ids = torch.arange(s.start, s.start + s.size)
            groups = {group_of_atom[a] for a in self.atoms.atom_of[ids].tolist() if a in group_of_atom}
            g.add_node(s.label, param=s.param, dim=s.dim, size=s.size, virtual=s.virtual, groups=groups)
        a, b = self.ids.edges()
        space_a = torch.searchsorted(starts, a, right=True) - 1
        space_b = torch.searchsorted(starts, b, right=True) - 1
        pairs: dict[tuple[int, int], set[tuple[int, int]]] = {}
        for sa, sb, ia, ib in zip(space_a.tolist(), space_b.tolist(), a.tolist(), b.tolist()):
            if sa == sb:
                continue
            if sa > sb:
                sa, sb, ia, ib = sb, sa, ib, ia
            pairs.setdefault((sa, sb), set()).add((ia - spaces[sa].start, ib - spaces[sb].start))
        for (sa, sb), index_map in pairs.items():
            u, v = spaces[sa].label, spaces[sb].label
            ordered = sorted(index_map)
            g.add_edge(u, v, spaces=(u, v), index_map=ordered, identity=all(i == j for i, j in ordered))
        return g

    def table(self) -> str:
        header = ("group", "kind", "heads x dim", "width", "members", "status")
        rows = []
        for g in self.groups:
            layout = f"{g.heads} x {g.head_dim * g.channels_per_atom}" + (" (shared offsets)" if g.shared_across_heads else "")
            layout += f" (channels in {g.channels_per_atom}s)" if g.channels_per_atom > 1 else ""
            members = ", ".join(s.label for s in g.members[:4]) + (f", +{len(g.members) - 4}" if len(g.members) > 4 else "")
            status = ("prunable" + (f" (same count as {', '.join(g.same_count_as)})" if g.same_count_as else "")) if g.prunable else _shorten("frozen: " + g.frozen[0], 90) + (f" (+{len(g.frozen) - 1} more)" if len(g.frozen) > 1 else "")
            rows.append((g.name, g.kind, layout, str(g.width), members, status))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        widths[-1] = min(widths[-1], 100)
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i < len(r) - 1 else c for i, (c, w) in enumerate(zip(r, widths))))
        summary = {k: sum(1 for g in self.groups if g.kind == k and g.prunable) for k in KINDS}
        lines.append("")
        lines.append("prunable groups: " + ", ".join(f"{k}={n}" for k, n in summary.items()))
        branches = self.branches()
        if branches:
            count = {k: sum(1 for b in branches if b.kind == k) for k in ("attention", "mlp")}
            lines.append(f"residual branches removable whole (kinds=('depth',)): {len(branches)} "
                         f"({count['attention']} attention, {count['mlp']} mlp)")
        touching = [op for op in self.unknown_ops if op.touched_channels]
        if touching:
            lines.append("ops without a rule (channels through them are frozen):")
            lines.extend(f"  {op.node}: {op.target}" for op in touching)
        harmless = sorted({str(op.target).rpartition("::")[2] for op in self.unknown_ops if not op.touched_channels})
        if harmless:
            lines.append(f"ops without a rule that touch no channels (masks, positions): {', '.join(harmless)}")
        static = self.gm.meta.get(meta.STATIC_SHAPES)
        if static:
            lines.append(f"capture: {static}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _get_tensor(gm: torch.nn.Module, name: str) -> torch.Tensor:
    module_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(module_path) if module_path else gm
    return getattr(owner, attr)


def _activation_blocks(gm) -> list:
    from .labels import Block

    found = []
    for node in gm.graph.nodes:
        stack = [node.meta.get(meta.LABELS)]
        while stack:
            item = stack.pop()
            if isinstance(item, Block):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    return found


def analyze_captured(captured: Captured, untie_shared_convs: bool = False) -> Analysis:
    """Analyse a captured graph; with ``untie_shared_convs``, depthwise convs shared by heads are untied first."""
    with paused_gc():
        return _analyze_captured(captured, untie_shared_convs)


def _analyze_captured(captured: Captured, untie_shared_convs: bool) -> Analysis:
    if untie_shared_convs:
        from ..capture import record_values
        from ..capture.untie import untie_shared_convs as untie

        propagate(captured)
        if untie(captured).modified:
            record_values(captured.gm, captured.example_inputs, type(captured.gm).__name__)
            captured.untied = True
    ids, unknown = propagate(captured)
    atoms = ids.resolve()
    param_ndim = {s.param: _get_tensor(captured.gm, s.param).ndim for s in ids.param_spaces}
    groups = build_groups(atoms, param_ndim, _activation_blocks(captured.gm))
    return Analysis(captured, ids, atoms, groups, unknown)


def analyze(model: torch.nn.Module, example_inputs: Sequence | None = None, untie_shared_convs: bool = False) -> Analysis:
    """Trace ``model`` (a copy; the model is not touched) and find its coupled channel groups."""
    return analyze_captured(capture(model, example_inputs), untie_shared_convs)


__all__ = ["Analysis", "Group", "analyze", "analyze_captured", "KINDS"]
