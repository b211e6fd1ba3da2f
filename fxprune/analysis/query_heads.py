"""Query heads inside key/value groups: grouped- and multi-query attention with ``heads="q_heads"``.

Whole-head removal normally takes a kv group whole (its k and v rows and every query head reading them).
Keys and values repeated per query head are *tied* copies (``ChannelIds.tie``): removed with their source
in the atoms every plan works with, yet separable in ``Atoms.fine_of``, where each query head owns its q
rows, its o columns and its copies of k and v. Removing the same number of query heads in every kv group
removes those finer atoms only: k and v stay, and the repeat counts baked in the graph shrink.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import PlanError

MQA = ("every query head reads the one key/value head (multi-query attention): only query heads can go "
       "(heads='q_heads')")


def query_heads(atoms, head_atoms: list[int]) -> list[list[frozenset[int]]] | None:
    """The query heads of the heads group made of ``head_atoms``, by kv group (in order): each the set of
    fine atoms it removes. None where the fine atoms cannot tell the query heads apart (they share channels
    other than tied copies), or where kv groups hold different numbers of them."""
    if atoms.fine_of is None:
        return None
    wanted = set(head_atoms)
    owned: dict[int, set[int]] = {}  # fine head atom -> fine channel atoms it reads
    reads: dict[int, set[int]] = {}  # fine head atom -> the (coarse) channel atoms: its kv group
    for head_ids, rows in atoms.ids._heads:
        coarse, fine = atoms.atom_of[head_ids].tolist(), atoms.fine_of[head_ids].tolist()
        for h, row in enumerate(rows):
            if coarse[h] in wanted:
                owned.setdefault(fine[h], set()).update(atoms.fine_of[row].tolist())
                reads.setdefault(fine[h], set()).update(atoms.atom_of[row].tolist())
    owner: dict[int, int] = {}
    for head, channels in owned.items():
        for atom in channels:
            if owner.setdefault(atom, head) != head:
                return None  # two query heads share channels of their own: neither can go alone
    groups: dict[frozenset, list[int]] = {}
    for head in sorted(owned):
        groups.setdefault(frozenset(reads[head]), []).append(head)
    sizes = {len(members) for members in groups.values()}
    if len(sizes) != 1:
        return None
    return [[frozenset({head} | owned[head]) for head in members] for members in groups.values()]


def check_q_heads(analysis, q_heads: dict[str, list[list[int]]]) -> list[frozenset[int]]:
    """The fine atom sets a plan's ``q_heads`` removes; checks them against the analysed model."""
    names = {g.name: g for g in analysis.groups}
    removed: list[frozenset[int]] = []
    for name, per_group in q_heads.items():
        group = names.get(name)
        if group is None or group.kind != "heads":
            raise PlanError(f"fxprune: plan removes query heads of '{name}', which is no heads group of this model")
        layout = query_heads(analysis.atoms, group.atoms)
        if layout is None or len(layout) != len(per_group):
            raise PlanError(f"fxprune: '{name}' has no query heads that can go inside its kv groups as the plan says")
        if len({len(positions) for positions in per_group}) > 1:
            raise PlanError(f"fxprune: plan removes unequal numbers of query heads across the kv groups of '{name}'")
        for heads, positions in zip(layout, per_group):
            if len(set(positions)) != len(positions) or any(not 0 <= p < len(heads) for p in positions):
                raise PlanError(f"fxprune: bad query head positions {positions} in '{name}' ({len(heads)} per kv group)")
            if len(positions) >= len(heads):
                raise PlanError(f"fxprune: plan removes every query head of a kv group of '{name}'; keep at least one")
            removed.extend(heads[p] for p in positions)
    return removed


def refined(analysis, removed: torch.Tensor, fine_sets: list[frozenset[int]]):
    """The analysis seen at the finest grain the removal needs, and the removal there: each id's unit is its
    (atom, fine atom) pair, removed where its atom is or where a removed query head owns its fine atom. The
    rewrite, the masked reference and the shapes read only ``atoms.atom_of``, so they work on it unchanged."""
    if not fine_sets:
        return analysis, removed
    atoms = analysis.atoms
    fine_count = int(atoms.fine_of.max()) + 1
    units, unit_of = torch.unique(atoms.atom_of * fine_count + atoms.fine_of, return_inverse=True)
    gone_fine = torch.zeros(fine_count, dtype=torch.bool)
    gone_fine[torch.tensor(sorted(set().union(*fine_sets)), dtype=torch.long)] = True
    unit_removed = removed[units // fine_count] | gone_fine[units % fine_count]
    unit_atoms = dataclasses.replace(atoms, atom_of=unit_of, count=len(units), frozen={}, roles={}, rows=[],
                                     head_links={}, whole_sets=[], active=None, fine_of=None)
    return dataclasses.replace(analysis, atoms=unit_atoms), unit_removed


def removal(analysis, plan):
    """(analysis, removed units) for carrying out ``plan``: its atoms, refined where it removes query heads."""
    removed = plan.removed_atoms(analysis)
    q_heads = getattr(plan, "q_heads", None) or {}
    return refined(analysis, removed, check_q_heads(analysis, q_heads)) if q_heads else (analysis, removed)
