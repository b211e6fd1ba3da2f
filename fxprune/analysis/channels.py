"""Channel ids and their couplings.

Every index of every parameter dimension that may be a channel gets one global integer id. Rules couple
ids that must be removed together (``union``), forbid removing some (``freeze``), say which ids play
which role in attention (``tag``), and record how ids are laid out in heads (``record_rows``). Nothing is
resolved until ``resolve()``: unions are collected as edge lists and solved at once, vectorised.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Space:
    """One dimension of one parameter (or buffer), by qualified name."""

    param: str
    dim: int
    size: int
    start: int  # first global id
    virtual: bool = False  # a constant made in forward (zeros_like...), not a parameter to slice

    @property
    def label(self) -> str:
        return f"{self.param}[{self.dim}]"


class ChannelIds:
    def __init__(self) -> None:
        self._spaces: dict[tuple[str, int], Space] = {}
        self._edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ties: list[tuple[torch.Tensor, torch.Tensor]] = []  # copies and their source (see ``tie``)
        self._frozen: list[tuple[torch.Tensor, str]] = []
        self._tags: list[tuple[torch.Tensor, str]] = []
        self._rows: list[torch.Tensor] = []
        self._active: list[torch.Tensor] = []
        self._heads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._whole: list[tuple[torch.Tensor, str]] = []
        self._stream_norms: list[tuple[torch.Tensor, str]] = []
        self._regions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rows_together: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.size = 0

    def space(self, param: str, dim: int, size: int, virtual: bool = False) -> torch.Tensor:
        """The ids of ``param``'s dimension ``dim`` (created on first use)."""
        key = (param, dim)
        space = self._spaces.get(key)
        if space is None:
            space = Space(param, dim, size, self.size, virtual)
            self._spaces[key] = space
            self.size += size
        return torch.arange(space.start, space.start + space.size)

    @property
    def spaces(self) -> list[Space]:
        """Every space, virtual ones included, in id order."""
        return sorted(self._spaces.values(), key=lambda s: s.start)

    @property
    def param_spaces(self) -> list[Space]:
        """The spaces of real parameters and buffers."""
        return [s for s in self.spaces if not s.virtual]

    def spaces_of(self, ids: torch.Tensor) -> list[Space]:
        """The spaces ``ids`` belong to."""
        spaces = self.spaces
        starts = torch.tensor([s.start for s in spaces], dtype=torch.long)
        found = torch.unique(torch.searchsorted(starts, ids.reshape(-1), right=True) - 1).tolist()
        return [spaces[i] for i in found]

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        differ = a != b
        if differ.any():
            self._edges.append((a[differ], b[differ]))

    def tie(self, copies: torch.Tensor, source: torch.Tensor) -> None:
        """``copies`` are broadcast copies of ``source`` (grouped-query attention's keys and values repeated for
        every query head of their group): removed together, as ``union``, but separable where one copy goes
        on its own (a query head removed inside its group, see ``Atoms.fine_of``)."""
        a, b = torch.broadcast_tensors(copies, source)
        self._ties.append((a.reshape(-1).clone(), b.reshape(-1).clone()))

    def union_within(self, ids: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """Join ids along ``dims`` (a parameter shared along them) and return ids reduced to size 1 there."""
        first = ids
        for d in dims:
            first = first.narrow(d, 0, 1)
        self.union(ids, first)
        return first

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        self._frozen.append((ids.reshape(-1).clone(), reason))

    def tag(self, ids: torch.Tensor, role: str) -> None:
        self._tags.append((ids.reshape(-1).clone(), role))

    def mark_active(self, ids: torch.Tensor) -> None:
        """These ids index channels of an activation (not only a parameter dim such as a kernel window)."""
        self._active.append(torch.unique(ids))

    def record_rows(self, rows: torch.Tensor) -> None:
        """Ids laid out as (heads, channels of one head); heads must keep equally many channels."""
        self._rows.append(rows.reshape(-1, rows.shape[-1]).clone())

    def record_heads(self, head_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Head ``head_ids[h]`` owns the channels ``rows[h]``: removing the head removes them all."""
        self._heads.append((head_ids.reshape(-1).clone(), rows.reshape(head_ids.numel(), -1).clone()))

    def record_region(self, rows: torch.Tensor, region: torch.Tensor) -> None:
        """A slice reads the channels at ``region`` (bool, per position) of every row of ``rows`` (rows,
        channels): every row must keep as many channels there. Resolved with the other couplings: where the
        coupled channels do not guarantee it (rotation pairs straddling the two halves do), the rows share
        offsets. The channels read there are marked (joined with virtual ids of their own), so channels wholly
        inside the region and channels wholly outside never share a group: each group keeping the same count
        per row then keeps the same count inside (a partial rotary embedding's rotated and passed channels)."""
        self._regions.append((rows.clone(), region.clone()))
        inside = rows[:, region]
        self.union(inside, self.space(f"<region {len(self._regions)}>", 0, inside.numel(), True).reshape(inside.shape))

    def rows_together(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Row r of ``a`` and row r of ``b`` (rows, channels) lose all their channels together or not at all (a
        grouped convolution's input and output channels of one group): the heads owning them are coupled."""
        self._rows_together.append((a.reshape(a.shape[0], -1).clone(), b.reshape(b.shape[0], -1).clone()))

    def whole(self, rows: torch.Tensor, reason: str) -> None:
        """Each row is a set of ids that is removed entirely or not at all (normalised together)."""
        self._whole.append((rows.reshape(-1, rows.shape[-1]).clone(), reason))

    def stream_norm(self, rows: torch.Tensor, reason: str) -> None:
        """Each row is normalised together by a norm over a residual stream: removed whole, unless the groups
        find it is a residual stream (kind "residual"), whose norms then compute over the kept channels."""
        self._stream_norms.append((rows.reshape(-1, rows.shape[-1]).clone(), reason))

    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every coupling made so far, as two id tensors."""
        edges = self._edges + self._ties
        if not edges:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty
        return torch.cat([a for a, _ in edges]), torch.cat([b for _, b in edges])

    def resolve(self) -> "Atoms":
        return Atoms.build(self)


def _components(n: int, edges: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Smallest id of each id's connected component (min-label propagation with pointer jumping)."""
    labels = torch.arange(n)
    if not edges or n == 0:
        return labels
    src, dst = torch.cat([a for a, _ in edges]), torch.cat([b for _, b in edges])
    while True:
        low = torch.minimum(labels[src], labels[dst])
        new = labels.clone()
        new.scatter_reduce_(0, src, low, reduce="amin")
        new.scatter_reduce_(0, dst, low, reduce="amin")
        new = new[new]
        if torch.equal(new, labels):
            return labels
        labels = new


def _rows_sharing_offsets_for_slices(root: torch.Tensor, regions: list[tuple[torch.Tensor, torch.Tensor]]
                                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Couplings that make every row keep as many channels inside each sliced region: none where every atom
    of the rows lies in the region equally often (then equal counts per row suffice), else shared offsets."""
    edges = []
    for rows, region in regions:
        roots = root[rows]
        inside: dict[tuple[int, int], int] = {}
        for r, (row, row_inside) in enumerate(zip(roots.tolist(), roots[:, region].tolist())):
            for atom in row:
                inside.setdefault((r, atom), 0)
            for atom in row_inside:
                inside[(r, atom)] += 1
        if len(set(inside.values())) > 1 and rows.shape[0] > 1 and not _wholly_in_or_out(roots, inside):
            edges.append((rows[1:].reshape(-1), rows[:1].expand(rows.shape[0] - 1, -1).reshape(-1)))
    return edges


def _wholly_in_or_out(roots: torch.Tensor, inside: dict[tuple[int, int], int]) -> bool:
    """Whether every atom lies wholly inside the region in every row that holds it, or wholly outside it in
    every row (``record_region`` keeps the two kinds apart in groups)."""
    status: dict[int, bool] = {}
    for r, row in enumerate(roots.tolist()):
        for atom, total in Counter(row).items():
            count = inside[(r, atom)]
            if count not in (0, total) or status.setdefault(atom, count > 0) != (count > 0):
                return False
    return True


def _heads_reading_the_same_channels(root: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor]]
                                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Couplings of heads that own exactly the same channels: the query heads of one key/value group
    (grouped-query attention) go together, as one kv group. Where every head shares the same channels
    (offsets shared by all heads) nothing is coupled: the heads stay separate and their analysis says why."""
    edges = []
    for head_ids, rows in heads:
        classes: dict[frozenset, list[int]] = {}
        for head, row in zip(head_ids.tolist(), root[rows].tolist()):
            classes.setdefault(frozenset(row), []).append(head)
        if len(classes) < 2 or all(len(members) == 1 for members in classes.values()):
            continue
        keys = list(classes)
        if any(a & b for i, a in enumerate(keys) for b in keys[i + 1:]):
            continue  # heads overlap partially: no kv-group structure
        for members in classes.values():
            if len(members) > 1:
                edges.append((torch.tensor(members[1:]), torch.tensor(members[:1] * (len(members) - 1))))
    return edges


def _heads_of_rows_together(root: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor]],
                            together: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Couplings of the heads owning row r of ``a`` with the heads owning row r of ``b`` (``rows_together``):
    removing one head then removes the other, so no group keeps its inputs without its outputs."""
    if not together or not heads:
        return []
    owner: dict[int, int] = {}  # channel root -> head root owning it
    for head_ids, rows in heads:
        for head, row in zip(root[head_ids].tolist(), root[rows].tolist()):
            for channel in row:
                owner.setdefault(channel, head)
    src, dst = [], []
    for a, b in together:
        for row_a, row_b in zip(root[a].tolist(), root[b].tolist()):
            found = {owner[c] for c in row_a + row_b if c in owner}
            first = min(found, default=None)
            for head in found - {first}:
                src.append(head)
                dst.append(first)
    return [(torch.tensor(src), torch.tensor(dst))] if src else []


def _atom_sets(atom_of: torch.Tensor, recorded: list[tuple[torch.Tensor, str]]) -> list[tuple[frozenset, str]]:
    """Recorded rows of ids as distinct (atom set, reason) pairs."""
    seen: set[tuple[frozenset, str]] = set()
    found = []
    for rows, reason in recorded:
        for row in atom_of[rows].tolist():
            key = (frozenset(row), reason)
            if key not in seen:
                seen.add(key)
                found.append(key)
    return found


@dataclass
class Atoms:
    """Classes of ids that must be removed together: the unit a pruning plan keeps or removes."""

    ids: ChannelIds
    atom_of: torch.Tensor  # id -> atom index
    count: int
    frozen: dict[int, list[str]] = field(default_factory=dict)  # atom -> reasons
    roles: dict[int, set[str]] = field(default_factory=dict)
    rows: list[torch.Tensor] = field(default_factory=list)  # each (heads, channels) of atom indices
    active: torch.Tensor | None = None  # atom -> True when some activation carries it
    head_links: dict[int, set[int]] = field(default_factory=dict)  # head atom -> channel atoms it owns
    whole_sets: list[tuple[frozenset, str]] = field(default_factory=list)  # all-or-nothing atom sets
    # id -> atom of the finer classes that leave out ties and the coupling of query heads into kv groups: a
    # query head's own channels (its q rows, its o columns, its copies of k and v) are atoms of their own
    # there; None where the model has no ties (then nothing is finer)
    fine_of: torch.Tensor | None = None
    # atom sets a norm over a residual stream normalises: all-or-nothing unless their group is a residual stream
    stream_norm_sets: list[tuple[frozenset, str]] = field(default_factory=list)

    @staticmethod
    def build(ids: ChannelIds) -> "Atoms":
        edges = ids._edges + ids._ties
        root = _components(ids.size, edges)
        shared = _rows_sharing_offsets_for_slices(root, ids._regions)
        if shared:
            root = _components(ids.size, edges + shared)
        grouped = _heads_reading_the_same_channels(root, ids._heads)
        if grouped:
            root = _components(ids.size, edges + shared + grouped)
        together = _heads_of_rows_together(root, ids._heads, ids._rows_together)
        if together:
            root = _components(ids.size, edges + shared + grouped + together)
        roots, atom_of = torch.unique(root, return_inverse=True)
        atoms = Atoms(ids=ids, atom_of=atom_of, count=len(roots))
        if ids._ties:
            atoms.fine_of = torch.unique(_components(ids.size, ids._edges + shared), return_inverse=True)[1]
        for member_ids, reason in ids._frozen:
            for atom in torch.unique(atom_of[member_ids]).tolist():
                reasons = atoms.frozen.setdefault(atom, [])
                if reason not in reasons:
                    reasons.append(reason)
        for member_ids, role in ids._tags:
            for atom in torch.unique(atom_of[member_ids]).tolist():
                atoms.roles.setdefault(atom, set()).add(role)
        atoms.rows = [atom_of[r] for r in ids._rows]
        for head_ids, rows in ids._heads:
            for head, row in zip(atom_of[head_ids].tolist(), atom_of[rows].tolist()):
                atoms.head_links.setdefault(head, set()).update(row)
        atoms.whole_sets = _atom_sets(atom_of, ids._whole)
        atoms.stream_norm_sets = _atom_sets(atom_of, ids._stream_norms)
        atoms.active = torch.zeros(atoms.count, dtype=torch.bool)
        if ids._active:
            atoms.active[atom_of[torch.cat(ids._active)]] = True
        return atoms

    def of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.atom_of[ids]
