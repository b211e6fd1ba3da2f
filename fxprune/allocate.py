"""Allocation: turn importance scores into a plan (which heads, and which channels of each head, go)."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from . import meta
from .analysis.query_heads import MQA, query_heads
from .plan import Plan, dead_rows, removed_head_channels
from .statistics import operand

DEFAULT_KINDS = ("qk", "v", "mlp")
HEAD_UNITS = ("kv_groups", "q_heads")  # what whole-head removal removes in grouped-query attention


def _lowest(scores: torch.Tensor, atoms: list[int], count: int) -> list[int]:
    """Positions (within ``atoms``) of the ``count`` lowest scores, ties broken by position."""
    order = torch.argsort(scores[torch.tensor(atoms, dtype=torch.long)], stable=True)
    return sorted(order[:count].tolist())


def _fraction(ratio: float, width: int, round_to: int = 1) -> int:
    """How many of ``width`` to remove for ``ratio``: rounded down, keeping at least one, and (with
    ``round_to``) leaving a multiple of ``round_to`` where the width allows it."""
    count = min(math.floor(ratio * width + 1e-9), width - 1)
    return _rounded(count, width, round_to)


def _rounded(count: int, width: int, round_to: int) -> int:
    """Remove fewer so that the kept width is a multiple of ``round_to`` (never more than asked)."""
    if round_to <= 1 or count <= 0:
        return count
    kept = width - count
    kept_rounded = -(-kept // round_to) * round_to
    return max(0, width - kept_rounded) if kept_rounded < width else 0


def in_atoms(group, channels: int) -> int:
    """A multiple (``round_to``) or a minimum of channels per head, counted in the group's atoms (an atom of a
    rotary group holds a channel and its rotation partner)."""
    return channels // math.gcd(channels, group.channels_per_atom)


def protected(group, ignored: tuple[str, ...]) -> bool:
    """Whether any parameter of ``group`` lives in one of the ``ignored`` modules (name prefixes)."""
    return any(s.param == p or s.param.startswith(p + ".") for s in group.members for p in ignored)


def sdpa_pairs(analysis) -> list[tuple[str, str]]:
    """(q/k group, v group) of every fused ``scaled_dot_product_attention`` whose q/k and v channels are groups.

    Its fast kernels need q/k and v of one head width: with unequal ones it falls back to the math kernel (on
    this CPU 3–4× slower per attention at ViT-S sizes), so budgets keep the two equal (``equal_head_dims``)."""
    group_of = {a: g.name for g in analysis.groups if g.kind != "heads" for a in g.atoms}
    pairs = []
    for node in analysis.gm.graph.nodes:
        call = node.meta.get(meta.OP)
        if call is None or call.op != "sdpa":
            continue
        query, value = (operand(node, call.args.get(name), 1) for name in ("query", "value"))
        if query is None or value is None:
            continue
        groups = [group_of.get(int(analysis.atoms.atom_of[op.ids.flatten()[0]])) for op in (query, value)]
        if None not in groups and groups[0] != groups[1] and tuple(groups) not in pairs:
            pairs.append(tuple(groups))
    return pairs


def _equal_head_dims(analysis, counts: dict[str, int], widths: dict[str, int], round_to: int,
                     pairs: list[tuple[str, str]]) -> None:
    """Give both groups of every pair the same kept head width: the mean of the two (so budgets move little),
    rounded up to what both groups' atoms and ``round_to`` allow. Pairs where one group is not cut are left."""
    for qk, v in pairs:
        if counts.get(qk) is None or counts.get(v) is None or not (counts[qk] or counts[v]):
            continue  # one of them is not cut here (another kind, frozen, ignored), or neither is
        per_atom = (analysis.group(qk).channels_per_atom, analysis.group(v).channels_per_atom)
        full = widths[qk] * per_atom[0]
        if widths[v] * per_atom[1] != full:
            continue  # heads of different widths to begin with
        step = math.lcm(*per_atom, round_to)
        step = step if full % step == 0 else math.lcm(*per_atom)
        kept = (2 * full - counts[qk] * per_atom[0] - counts[v] * per_atom[1]) / 2
        kept = min(full, max(step, math.ceil(kept / step) * step))
        counts[qk], counts[v] = (full - kept) // per_atom[0], (full - kept) // per_atom[1]


def uniform(analysis, scores: torch.Tensor, ratio: float, kinds: Iterable[str] = DEFAULT_KINDS,
            head_ratio: float = 0.0, options: dict | None = None, ignored: tuple[str, ...] = (),
            round_to: int = 1, heads: str = "kv_groups", equal_head_dims: bool = True) -> Plan:
    """Remove ``head_ratio`` of the heads of every attention, then ``ratio`` of every remaining head's channels
    (and of every MLP hidden layer) in every prunable group of the given kinds.

    Every head removes the same count (rounded down, at least one channel and one head stay); each head
    picks its own lowest-scoring channels. Groups whose heads share offsets have a single row. In
    grouped-query attention a head is a kv group; with ``heads="q_heads"`` it is a query head instead, the
    same number removed inside every kv group (k and v stay).
    """
    kinds = tuple(kinds)
    if "heads" in kinds and head_ratio == 0:  # whole heads asked as a kind: ``ratio`` of them, like the others
        head_ratio = ratio
    removed: dict[str, list[list[int]]] = {}
    q_removed: dict[str, list[list[int]]] = {}
    energy = None  # per fine atom, computed once where query heads are ranked
    if head_ratio > 0:
        for group in removable_head_groups(analysis, ignored, prunable_only=False):
            layout = _query_heads_to_remove(analysis, group) if heads == "q_heads" else None
            if layout is not None:
                count = _fraction(head_ratio, len(layout[0]))
                energy = _fine_energy(analysis) if energy is None else energy
                if count > 0:
                    q_removed[group.name] = [_lowest(_query_head_scores(energy, kv_group), list(range(len(kv_group))),
                                                     count) for kv_group in layout]
            elif group.prunable:
                count = _fraction(head_ratio, group.width)
                if count > 0:
                    removed[group.name] = [_lowest(scores, group.rows[0], count)]
    gone = removed_head_channels(analysis, removed)

    counts, widths = {}, {}
    for group in analysis.groups:
        if group.kind == "heads":
            continue
        alive = [row for row, dead in zip(group.rows, dead_rows(group, gone)) if not dead]
        width = min((len(r) for r in alive), default=0)
        eligible = group.kind in kinds and group.prunable and width > 0 and not protected(group, ignored)
        counts[group.name] = _fraction(ratio, width, in_atoms(group, round_to)) if eligible else None
        widths[group.name] = width
    if equal_head_dims:
        _equal_head_dims(analysis, counts, widths, round_to, sdpa_pairs(analysis))
    counts = {name: count or 0 for name, count in counts.items()}
    for group in analysis.groups:  # groups stacked in one tensor must keep equal counts per row
        for peer in group.same_count_as:
            counts[group.name] = min(counts[group.name], counts[peer])
    for group in analysis.groups:
        count = counts.get(group.name, 0)
        if count <= 0:
            continue
        removed[group.name] = [[] if dead else _lowest(scores, row, count)
                               for row, dead in zip(group.rows, dead_rows(group, gone))]
    return Plan(removed, dict(options or {}, ratio=ratio, head_ratio=head_ratio, kinds=list(kinds)), q_heads=q_removed)


def removable_head_groups(analysis, ignored: tuple[str, ...], prunable_only: bool = True) -> list:
    """The heads groups whose heads may go: not in an ignored module, owning no channel an ignored module keeps
    (with ``prunable_only``, not frozen either; query heads inside kv groups may go where the group is frozen
    for multi-query attention)."""
    kept_whole = {a for g in analysis.groups if g.kind != "heads" and protected(g, ignored) for a in g.atoms}
    groups = []
    for group in analysis.groups:
        if group.kind != "heads" or protected(group, ignored) or (prunable_only and not group.prunable):
            continue
        owned = {c for h in group.atoms for c in analysis.atoms.head_links.get(h, ())}
        if not owned & kept_whole:
            groups.append(group)
    return groups


def _query_heads_to_remove(analysis, group) -> list[list[frozenset[int]]] | None:
    """The query heads of a heads group by kv group, where several share each kv group and can go alone:
    none of their channels frozen, the group frozen at most because its heads share the one kv head (MQA)."""
    if any(reason != MQA for reason in group.frozen):
        return None
    layout = query_heads(analysis.atoms, group.atoms)
    if layout is None or len(layout[0]) < 2:
        return None
    fine_of, atom_of = analysis.atoms.fine_of, analysis.atoms.atom_of
    fine = torch.tensor(sorted(set().union(*(h for kv_group in layout for h in kv_group))), dtype=torch.long)
    coarse = torch.unique(atom_of[torch.isin(fine_of, fine)]).tolist()
    if any(a in analysis.atoms.frozen for a in coarse):
        return None
    return layout


def _query_head_scores(energy: torch.Tensor, kv_group: list[frozenset[int]]) -> torch.Tensor:
    """Each query head's weight energy (squared L2 norm of its q rows and o columns), whatever the channel
    importance: channel scores are per kv group and cannot tell its query heads apart."""
    return torch.stack([energy[torch.tensor(sorted(head), dtype=torch.long)].sum() for head in kv_group])


def _fine_energy(analysis) -> torch.Tensor:
    """Per fine atom, the squared L2 norm of the parameter slices its channel ids index (virtual ids: 0)."""
    energy = torch.zeros(analysis.ids.size, dtype=torch.float64)
    for space in analysis.ids.param_spaces:
        tensor = analysis.tensor(space.param).detach().to(torch.float64)
        squares = tensor.pow(2)
        if tensor.ndim > 1:
            squares = squares.sum(dim=[d for d in range(tensor.ndim) if d != space.dim])
        energy[space.start:space.start + space.size] = squares.reshape(-1)
    fine_of = analysis.atoms.fine_of
    return torch.zeros(int(fine_of.max()) + 1, dtype=torch.float64).index_add_(0, fine_of, energy)


def _quantiles_within_kind(analysis, scores: torch.Tensor, per_group: bool) -> dict[int, float]:
    """Each prunable channel's score as its quantile among the channels of its kind (qk, v, mlp).

    With ``per_group`` the scores are first divided by their group's mean (magnitudes differ per layer);
    criteria already comparable across layers (DIMAP) skip that, so one threshold per kind remains.
    """
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for group in analysis.groups:  # heads groups too: whole heads are a kind of their own in budgets
        if not group.prunable:
            continue
        atoms = group.atoms
        values = scores[torch.tensor(atoms, dtype=torch.long)].to(torch.float64)
        if per_group:
            values = values / values.mean().clamp_min(1e-300)
        by_kind.setdefault(group.kind, []).extend(zip(atoms, values.tolist()))
    quantile: dict[int, float] = {}
    for entries in by_kind.values():
        ordered = sorted(entries, key=lambda e: e[1])
        for rank, (atom, _) in enumerate(ordered):
            quantile[atom] = (rank + 0.5) / len(ordered)
    return quantile


def _threshold_plan(analysis, scores: torch.Tensor, quantile: dict[int, float], threshold: float, kinds: tuple,
                    min_head_width: int, base: dict[str, list[list[int]]], per_row: str = "mean",
                    ignored: tuple[str, ...] = (), round_to: int = 1,
                    pairs: list[tuple[str, str]] = ()) -> dict[str, list[list[int]]]:
    removed = dict(base)
    if "heads" in kinds:  # whole heads below the threshold go first (one stays); their channels go with them
        for group in removable_head_groups(analysis, ignored):
            below = sum(1 for a in group.rows[0] if quantile.get(a, 1.0) < threshold)
            if min(below, group.width - 1) > 0:
                removed[group.name] = [_lowest(scores, group.rows[0], min(below, group.width - 1))]
    gone = removed_head_channels(analysis, removed)
    counts, widths, dead = {}, {}, {}
    for group in analysis.groups:
        if group.kind not in kinds or group.kind == "heads" or not group.prunable or group.same_count_as \
                or protected(group, ignored):
            continue
        dead[group.name] = dead_rows(group, gone)
        alive = [row for row, d in zip(group.rows, dead[group.name]) if not d]
        if not alive:
            continue
        below_per_row = [sum(1 for a in row if quantile.get(a, 1.0) < threshold) for row in alive]
        below = sum(below_per_row) / len(alive) if per_row == "mean" else min(below_per_row)
        widths[group.name] = width = min(len(r) for r in alive)
        keep = max(1, -(-min_head_width // group.channels_per_atom))
        counts[group.name] = _rounded(min(int(round(below)), width - keep), width, in_atoms(group, round_to))
    _equal_head_dims(analysis, counts, widths, round_to, list(pairs))
    for name, count in counts.items():
        if count > 0:
            group = analysis.group(name)
            removed[name] = [[] if d else _lowest(scores, row, count) for row, d in zip(group.rows, dead[name])]
    return removed


def global_budget(analysis, scores: torch.Tensor, measure, target: float, kinds: Iterable[str] = DEFAULT_KINDS,
                  per_group_normalisation: bool = True, min_head_width: int = 1, head_ratio: float = 0.0,
                  options: dict | None = None, steps: int = 40, per_row: str = "mean",
                  ignored: tuple[str, ...] = (), round_to: int = 1, branch_scores: dict[str, float] | None = None,
                  equal_head_dims: bool = True, branch_units: dict[str, list[str]] | None = None) -> Plan:
    """Remove the least important channels model-wide until ``measure(removed) / measure(nothing)`` reaches
    ``target`` (MACs or parameters): one threshold on within-kind quantiles, head-aligned per group.

    ``per_row``: how many channels every head of a group removes: the mean over heads of the channels below
    the threshold ("mean": each head gives up the same share), or the fewest any head has below it ("min":
    the channels are chosen without regard to heads, and a head shrinks only as far as every head can).
    ``branch_scores`` (residual branch name -> score): branches removable whole, one more kind under the same
    threshold on their quantile; ``measure`` then takes the removed branch names as a second argument.
    ``branch_units`` (name in ``branch_scores`` -> branch names): units removed whole, a block's branches
    together (kind "layers"); the plan lists their branches.
    """
    kinds = tuple(kinds)
    ranked = sorted(branch_scores or {}, key=lambda name: branch_scores[name])
    branch_quantile = {name: (rank + 0.5) / len(ranked) for rank, name in enumerate(ranked)}
    base = uniform(analysis, scores, 0.0, kinds, head_ratio=head_ratio, ignored=ignored).removed if head_ratio > 0 else {}
    nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    full = measure(nothing, []) if branch_quantile else measure(nothing)
    quantile = _quantiles_within_kind(analysis, scores, per_group_normalisation)
    pairs = sdpa_pairs(analysis) if equal_head_dims else []

    def fraction(threshold: float) -> tuple[float, dict, list[str]]:
        removed = _threshold_plan(analysis, scores, quantile, threshold, kinds, min_head_width, base, per_row,
                                  ignored, round_to, pairs)
        atoms = Plan(removed).removed_atoms(analysis)
        if not branch_quantile:
            return measure(atoms) / full, removed, []
        units = [name for name in ranked if branch_quantile[name] < threshold]
        branches = [b for unit in units for b in (branch_units[unit] if branch_units else [unit])]
        return measure(atoms, branches) / full, removed, branches

    low, high = 0.0, 1.0
    best = fraction(0.0)
    if best[0] <= target:
        return Plan(best[1], dict(options or {}, target=target, reached=best[0], kinds=list(kinds)), best[2])
    for _ in range(steps):
        middle = (low + high) / 2
        reached, removed, branches = fraction(middle)
        if abs(reached - target) < abs(best[0] - target):
            best = (reached, removed, branches)
        if reached > target:
            low = middle
        else:
            high = middle
        if abs(best[0] - target) < 0.002:
            break
    return Plan(best[1], dict(options or {}, target=target, reached=best[0], head_ratio=head_ratio, kinds=list(kinds)),
                best[2])
