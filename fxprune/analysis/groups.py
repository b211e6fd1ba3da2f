"""Groups: atoms (channels removed together) gathered by the parameters they cut, with head layout."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import torch

from .channels import Atoms, Space
from .labels import CHANNEL, Block
from .query_heads import MQA, query_heads

KINDS = ("qk", "v", "mlp", "heads", "residual", "other")
HEAD_SPACE = "<heads:"  # name prefix of the virtual spaces that number an attention's heads


@dataclass
class Group:
    """Channels that belong together: one attention's q/k, one attention's v, one MLP hidden layer...

    ``rows`` lists atom indices head by head (one row per distinct head; a single row when the group has no
    heads, or when the graph forces every head to use the same channel offsets).
    """

    name: str
    kind: str
    rows: list[list[int]]
    heads: int
    head_dim: int
    shared_across_heads: bool
    members: list[Space]
    frozen: list[str] = field(default_factory=list)
    channels_per_atom: int = 1  # channels one atom holds in each head (2 for rotary pairs: i and its partner)
    same_count_as: list[str] = field(default_factory=list)  # groups stacked with this one in some tensor
    stream: bool = False  # a residual stream: kind "residual" where nothing but its own norms would freeze it

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def atoms(self) -> list[int]:
        return [a for row in self.rows for a in row]

    @property
    def width(self) -> int:
        return sum(len(r) for r in self.rows)


def _space_index(spaces: list[Space], n: int) -> torch.Tensor:
    starts = torch.tensor([s.start for s in spaces], dtype=torch.long)
    return torch.searchsorted(starts, torch.arange(n), right=True) - 1


def build_groups(atoms: Atoms, param_ndim: dict[str, int], blocks: Iterable[Block] = ()) -> list[Group]:
    """Gather atoms into groups (atoms cutting the same parameter dims), with head layout, kind and constraints."""
    spaces = atoms.ids.spaces
    if not spaces:
        return []
    n = atoms.ids.size
    first_id = torch.full((atoms.count,), n, dtype=torch.long).scatter_reduce(0, atoms.atom_of, torch.arange(n), "amin")
    ordered, group_of = _atoms_by_signature(atoms, first_id)
    first_id = first_id.tolist()  # read atom by atom below: a list is much faster to index than a tensor
    layouts, irregular = _head_layouts(atoms, group_of)
    whole_reasons: dict[int, set[str]] = defaultdict(set)
    for atom_set, reason in atoms.whole_sets:
        for a in atom_set:
            whole_reasons[a].add(reason)
    stream_norms = _stream_norms_by_group(atoms, group_of)

    groups: list[Group] = []
    used_names: set[str] = set()
    head_groups: list[tuple[int, list[int]]] = []
    for g, (sig, members) in enumerate(ordered):
        member_spaces = [spaces[s] for s in sig if not spaces[s].virtual]
        frozen = sorted({r for a in members for r in atoms.frozen.get(a, [])})
        if any(spaces[s].virtual and spaces[s].param.startswith(HEAD_SPACE) for s in sig):
            rows = [sorted(members, key=first_id.__getitem__)]
            groups.append(Group("", "heads", rows, len(members), 1, False, member_spaces, frozen))
            head_groups.append((g, members))
            continue
        roles = set().union(*(atoms.roles[a] for a in members if a in atoms.roles))
        kind = _kind(roles, member_spaces, param_ndim)
        norm_reasons = stream_norms.get(g, set())
        stream = kind == "other" and bool(norm_reasons) and g not in stream_norms.get(-1, ())
        rows, heads, head_dim, shared, problem, per_atom = _head_rows(members, layouts.get(g, []), first_id)
        frozen += sorted({r for a in members for r in whole_reasons.get(a, ())} | norm_reasons)
        frozen += [extra for extra in (irregular.get(g), problem) if extra]
        if not member_spaces:  # only copies made in the graph (expand_as, zeros_like): nothing to cut
            frozen.append("no parameter holds these channels (copies made in the graph)")
        if stream and set(frozen) <= norm_reasons:
            # only its own norms held it, and they shrink with it (statistics over the kept channels); a stream
            # something else holds (it reaches the output) stays "other", frozen with every reason, as before
            kind, frozen = "residual", []
        name = _name(kind, member_spaces or [spaces[s] for s in sig], param_ndim, used_names)
        groups.append(Group(name, kind, rows, heads, head_dim, shared, member_spaces, frozen, per_atom,
                            stream=stream))
    owners: dict[int, set[int]] = defaultdict(set)  # channel atom -> head atoms that own it
    for head, channels in atoms.head_links.items():
        for c in channels:
            owners[c].add(head)
    group_list = group_of.tolist()  # read atom by atom below
    for g, members in head_groups:
        _describe_heads(groups[g], members, atoms, owners, group_list, groups, used_names)
    for peers in _stacked_groups(atoms, group_of, (b for b in blocks if b.level == CHANNEL)):
        for g in peers:
            groups[g].same_count_as = sorted(groups[p].name for p in peers if p != g)
    return groups


def _stream_norms_by_group(atoms: Atoms, group_of: torch.Tensor) -> dict[int, set]:
    """Group index -> reasons of the norms over a residual stream that normalise its atoms. A norm over the
    atoms of several groups normalises no single stream: its groups are listed under -1 as well (they keep
    the norm's reasons as frozen ones, as a norm over channels freezes them everywhere else)."""
    found: dict[int, set] = defaultdict(set)
    for atom_set, reason in atoms.stream_norm_sets:
        owners = set(group_of[torch.tensor(sorted(atom_set))].tolist())
        for g in owners:
            found[g].add(reason)
        if len(owners) > 1 or -1 in owners:
            found[-1].update(owners)
    return found


def _atoms_by_signature(atoms: Atoms, first_id: torch.Tensor) -> tuple[list[tuple[tuple[int, ...], list[int]]], torch.Tensor]:
    """Active atoms keyed by the channel spaces they cut, in graph order; and each atom's group index (-1: none).

    Vectorised: atoms cutting equally many spaces are rows of one matrix (their spaces, ascending), and equal
    rows are found by ``torch.unique(dim=0)``; a Python loop over every (atom, space) pair cost seconds at 1B."""
    spaces = atoms.ids.spaces
    space_of = _space_index(spaces, atoms.ids.size)
    pairs = torch.unique(atoms.atom_of * len(spaces) + space_of)  # by atom, then space
    pair_atom, pair_space = pairs // len(spaces), pairs % len(spaces)
    active = torch.nonzero(atoms.active).flatten()  # parameter-only dims are no channels
    counts = torch.bincount(pair_atom, minlength=atoms.count)
    pair_count = counts[pair_atom]
    found: list[tuple[tuple[int, ...], list[int]]] = []
    for length in torch.unique(counts[active]).tolist():
        members = active[counts[active] == length]  # ascending
        if length == 0:
            found.append(((), members.tolist()))
            continue
        rows = pair_space[(pair_count == length) & atoms.active[pair_atom]].reshape(-1, length)
        inverse = torch.zeros(len(rows), dtype=torch.long)
        for column in rows.unbind(1):  # equal rows, column by column (torch.unique(dim=0) is slow)
            inverse = torch.unique(inverse * len(spaces) + column, return_inverse=True)[1]
        order = torch.argsort(inverse, stable=True)  # members of each signature, still ascending
        sizes = torch.bincount(inverse).tolist()
        for group in members[order].split(sizes):
            found.append((tuple(rows[int(torch.searchsorted(members, group[0]))].tolist()), group.tolist()))
    first = first_id.tolist()
    ordered = sorted(found, key=lambda kv: first[kv[1][0]])
    group_of = torch.full((atoms.count,), -1, dtype=torch.long)
    for g, (_, members) in enumerate(ordered):
        group_of[torch.tensor(members)] = g
    return ordered, group_of


def _head_layouts(atoms: Atoms, group_of: torch.Tensor) -> tuple[dict[int, list[torch.Tensor]], dict[int, str]]:
    """The recorded head layouts (rows of atoms) of each group, and the groups whose layouts mix groups."""
    layouts: dict[int, list[torch.Tensor]] = defaultdict(list)
    irregular: dict[int, str] = {}
    for rows in atoms.rows:
        owners = torch.unique(group_of[rows]).tolist()
        row_owner = group_of[rows[:, 0]] if rows.numel() else group_of[rows.reshape(-1)]
        if len(owners) == 1 and owners[0] >= 0:
            layouts[owners[0]].append(rows)
        elif rows.numel() and bool((group_of[rows] == row_owner[:, None]).all()) and bool((row_owner >= 0).all()):
            # each row (head) lies in one group, the groups differ between heads (CoaT: heads split between
            # convolutions of several kernel sizes): each group gets its heads' rows
            for g in owners:
                layouts[g].append(rows[row_owner == g])
        elif rows.numel() and bool((group_of[rows] >= 0).all()) and _split_by_group(rows, group_of, layouts):
            pass  # every head holds as many channels of each group (partial rotary: rotated and passed channels)
        else:
            for g in owners:
                if g >= 0:
                    irregular[g] = "a head layout mixes channels of several groups"
    return layouts, irregular


def _split_by_group(rows: torch.Tensor, group_of: torch.Tensor, layouts: dict[int, list[torch.Tensor]]) -> bool:
    """Rows (heads) that each hold the same number of channels of every group they touch: each group gets the
    rows touching it, restricted to its own channels (every group keeping the same count per head keeps the heads equal).
    False (nothing recorded) where the counts differ between heads."""
    owners = group_of[rows]
    pieces = {}
    for g in torch.unique(owners).tolist():
        mine = owners == g
        counts = mine.sum(1)
        touching = counts > 0  # heads of several groups side by side (EfficientViT-MIT's v of two scales, each
        # beside a padded column): each group's layout is the heads holding its channels
        if int(counts[touching].min()) != int(counts[touching].max()):
            return False
        pieces[g] = rows[touching][mine[touching]].reshape(int(touching.sum()), -1)
    for g, piece in pieces.items():
        layouts[g].append(piece)
    return True


def _describe_heads(group: Group, members: list[int], atoms: Atoms, owners: dict[int, set[int]],
                    group_of: list[int], groups: list[Group], used: set[str]) -> None:
    """Name a head group after the channels its heads own, and freeze it where whole-head removal is unsafe."""
    linked: set[int] = set()
    for head in members:
        channels = atoms.head_links.get(head)
        if not channels:
            group.frozen.append("a head whose channels are unknown")
            continue
        linked |= channels
    if any(len(owners[c]) > 1 for c in linked):
        layout = query_heads(atoms, members)
        one_kv_head = layout is not None and len(layout) == 1 and len(layout[0]) > 1
        group.frozen.append(MQA if one_kv_head else "channels are shared across heads (the same offsets in every head)")
    for c in sorted(linked):
        if group_of[c] >= 0 and not groups[group_of[c]].members:
            continue  # positions no parameter holds (EfficientViT-MIT's padded column): they go with the head's row
        for reason in atoms.frozen.get(c, []):
            if reason not in group.frozen:
                group.frozen.append(reason)
    whole = [*atoms.whole_sets, *atoms.stream_norm_sets]  # norms over heads' channels are either, by their width
    sets_of: dict[int, list[int]] = defaultdict(list)  # channel atom -> all-or-nothing sets holding it
    for i, (atom_set, _) in enumerate(whole):
        for a in atom_set & linked:
            sets_of[a].append(i)
    for head in members:  # a set all heads' channels make up (Olmo2's q/k norm over every head) cannot lose one
        channels = atoms.head_links.get(head, set())
        for i in sorted({i for c in channels for i in sets_of.get(c, ())}):
            atom_set, reason = whole[i]
            why = f"{reason} (across heads: a head cannot go alone)"
            if not atom_set <= channels and why not in group.frozen:
                group.frozen.append(why)
    for head in members:  # removing a head must take whole rows of every channel group it reaches
        channels = atoms.head_links.get(head, set())
        for g in sorted({group_of[c] for c in channels if group_of[c] >= 0}):
            if any(0 < sum(1 for a in row if a in channels) < len(row) for row in groups[g].rows):
                why = f"a head owns only part of a row of '{groups[g].name}' (its channels are tied to other heads)"
                if why not in group.frozen:
                    group.frozen.append(why)
    anchors = sorted({groups[group_of[c]].name.split(":")[0] for c in linked if group_of[c] >= 0})
    anchor = anchors[0] if anchors else "attention"
    name, k = f"{anchor}:heads", 2
    while name in used:
        name, k = f"{anchor}:heads#{k}", k + 1
    used.add(name)
    group.name = name


def _stacked_groups(atoms: Atoms, group_of: torch.Tensor, blocks: Iterable[Block]) -> list[set[int]]:
    """Sets of groups whose channels share a tensor row by row: each must keep the same count per row."""
    parent: dict[int, int] = {}

    def find(g: int) -> int:
        while parent.setdefault(g, g) != g:
            g = parent[g]
        return g

    for block in blocks:
        if not block.row_dims():
            continue
        row_groups = torch.unique(group_of[atoms.atom_of[block.rows()[:, 0]]]).tolist()
        row_groups = [g for g in row_groups if g >= 0]
        for g in row_groups[1:]:
            parent[find(g)] = find(row_groups[0])
    sets: dict[int, set[int]] = defaultdict(set)
    for g in list(parent):
        sets[find(g)].add(g)
    return [s for s in sets.values() if len(s) > 1]


def _kind(roles: set[str], spaces: list[Space], param_ndim: dict[str, int]) -> str:
    if "qk" in roles:
        return "qk"
    if "v" in roles:
        return "v"
    producers = sum(1 for s in spaces if s.dim == 0 and param_ndim.get(s.param, 0) >= 2)
    consumers = sum(1 for s in spaces if s.dim == 1 and param_ndim.get(s.param, 0) >= 2)
    # a hidden layer: one producer (fc1), or two multiplied (a gated MLP's gate and up), read by one layer;
    # a residual stream is written and read by many
    if consumers and (producers == 1 or (producers == 2 and consumers == 1)):
        return "mlp"
    return "other"


def _name(kind: str, spaces: list[Space], param_ndim: dict[str, int], used: set[str]) -> str:
    producers = [s for s in spaces if s.dim == 0 and param_ndim.get(s.param, 0) >= 2]
    anchor = (producers or spaces)[0].param
    for suffix in (".weight", ".bias"):
        if anchor.endswith(suffix):
            anchor = anchor[: -len(suffix)]
    name = f"{anchor}:{kind}"
    k = 2
    while name in used:
        name = f"{anchor}:{kind}#{k}"
        k += 1
    used.add(name)
    return name


def _head_rows(members: list[int], layouts: list[torch.Tensor], first_id: list[int]):
    """Distinct head rows of a group, its heads × head_dim layout, whether heads share offsets, what is wrong
    with the layout (or None) and how many channels of a head each atom holds.

    A head may hold an atom more than once (a rotary embedding couples channel i with its rotation partner):
    allowed when every atom of every row appears equally often; rows then list each atom once."""
    whole = [sorted(members, key=first_id.__getitem__)]
    if not layouts:
        return whole, 1, len(members), False, None, 1
    distinct: dict[frozenset, list[int]] = {}
    multiplicities = set()
    for layout in layouts:
        for row in layout.tolist():
            counts = Counter(row)
            multiplicities |= set(counts.values())
            distinct.setdefault(frozenset(row), list(counts))
    if len(multiplicities) != 1:
        return [members], 1, len(members), False, "a head uses some channels more often than others", 1
    per_atom = multiplicities.pop()
    keys = list(distinct)
    covered = set()
    for key in keys:
        if covered & key:
            return [members], 1, len(members), False, "heads overlap irregularly", 1
        covered |= key
    if covered != set(members):
        return [members], 1, len(members), False, "the head layout covers only part of the group", 1
    heads = layouts[0].shape[0]
    return [distinct[k] for k in keys], heads, layouts[0].shape[1] // per_atom, len(keys) < heads, None, per_atom
