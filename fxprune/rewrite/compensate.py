"""Pass: least-squares compensation of what the removed channels contributed, folded into the kept weights.

Removing channels changes two kinds of computation, and both are re-fitted on calibration data:

- **Layers whose inputs shrank** (an attention's output projection after v, an MLP's fc2 / down_proj): the
  kept weight columns and the bias are solved so the layer reproduces the unpruned layer's output,
  ``min ||X_K Vᵀ - Y||² + λ||V - [W_K b]||²``, from the accumulated statistics ``X_KᵀX_K`` and ``X_KᵀY``
  (never the rows themselves). ``Y`` is the unpruned layer's output on the unpruned model; ``X_K`` the kept
  inputs, read from the unpruned model (one shot) or from the pruned model compensated so far
  (``sequential``: each later layer also corrects what earlier removals changed upstream, as layer-wise
  reconstruction methods for large models do). The ridge pulls towards the uncompensated weights, so a
  layer's calibration error never grows: ``V = [W_K b]`` is a candidate of the same objective.
- **The q·kᵀ product of a head that lost q/k channels**: its logits lose ``Σ_removed q_r k_r``. Over
  calibration queries the removed q channels are regressed on the kept ones, ``q_R ≈ Bᵀ q_K`` with
  ``B = (Q_KK + λ)⁻¹ Q_KR`` (``Q`` the head's query Gram), and ``B k_R`` moves into the kept k rows, so that
  ``q_K · (k_K + B k_R) ≈ q · k``. For keys independent of the queries this minimises the mean squared logit
  error whatever the keys' distribution. It needs k to be a Linear's rows reaching the product through
  layout ops only (no rotary embedding, no per-head norm); other products are left as they are. In
  ``sequential`` mode the query statistics still come from the unpruned model.

- **The residual stream after a removed branch** (``sequential`` only): the stream lacks what the branch added,
  and nothing whose inputs shrank is there to refit. Every later Linear that writes into the stream (its output
  reaching a residual add through same-value ops only: an attention's output projection, an MLP's fc2) is fitted
  to its unpruned output plus the stream's deviation at that add, ``Y + (s_unpruned − s_pruned)``, so the add's
  result comes back towards the unpruned model's, each writer taking back what the ones before left.

The result is a plain pruned model (no extra nodes); the diagonal reweight nodes (``reweight.py``) remain
the trainable alternative. ``least_squares(...)`` returns what it fitted, per layer, for reports and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from .. import meta
from ..statistics import (RIDGE, SAME_VALUE, LinearCall, Moments, Product, Runner, attention_products, base_name,
                          linear_calls, relative_ridge, ridge_strength, watch)



@dataclass
class Layer(LinearCall):
    """A Linear (or addmm) whose input features shrink."""

    kept: torch.Tensor = None  # kept input features (original numbering)


@dataclass
class QkSite:
    """An attention product whose k comes from a Linear's rows through layout ops only."""

    product: Product
    weight: str  # the k Linear's weight
    bias: str | None
    out_dim: int  # the weight dim holding k's channels (0 for Linear, 1 for addmm)
    key_rows: dict[tuple, torch.Tensor]  # a head's atoms -> the weight rows of its k channels


@dataclass
class Fitted:
    """What compensation changed in one place: calibration error before and after (sums of squares)."""

    name: str
    error_before: float
    error_after: float


def shrinking_layers(analysis, keep: dict[str, dict[int, torch.Tensor]]) -> list[Layer]:
    """Every Linear / addmm of the analysed graph whose input features lose channels, in graph order."""
    return [Layer(**vars(call), kept=keep[call.weight][call.in_dim]) for call in linear_calls(analysis)
            if call.in_dim in keep.get(call.weight, {})]


def qk_sites(analysis, removed: torch.Tensor) -> list[QkSite]:
    """Every attention product whose q/k lose channels and whose k can take the removed rows' share."""
    atom_of = analysis.atoms.atom_of
    calls = {call.node: call for call in linear_calls(analysis)}
    sites = []
    for product in attention_products(analysis):
        source = calls.get(product.key_source)
        if source is None or not bool(removed[atom_of[product.query.ids]].any()):
            continue
        out_dim = 1 - source.in_dim
        space = next((s for s in analysis.ids.param_spaces if s.param == source.weight and s.dim == out_dim), None)
        key_ids = product.key.ids
        if space is None or not bool(((key_ids >= space.start) & (key_ids < space.start + space.size)).all()):
            continue  # k's ids are not that Linear's rows: leave this product alone
        key_rows = {tuple(atom_of[row].tolist()): row - space.start for row in key_ids}
        if all(tuple(atom_of[row].tolist()) in key_rows for row in product.query.ids):
            sites.append(QkSite(product, source.weight, source.bias, out_dim, key_rows))
    return sites


@dataclass
class StreamFix:
    """A Linear writing into the residual add ``add`` (``skip``: the stream operand) after a removed branch."""

    add: str
    skip: int


def stream_writers(analysis, removed_branches: Iterable) -> dict[str, StreamFix]:
    """Linear node -> its residual add, for every branch kept after the first removed one whose output comes
    from one Linear through same-value ops (dropout, casts, identity) only."""
    from ..depth import find_branches

    removed_branches = list(removed_branches)
    if not removed_branches:
        return {}
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    gone = {b.name for b in removed_branches}
    first = min(order[b.add] for b in removed_branches)
    calls = {call.node for call in linear_calls(analysis)}
    fixes = {}
    for branch in find_branches(analysis):
        if branch.name in gone or order[branch.add] < first:
            continue
        node = nodes[branch.add].args[1 - branch.skip]
        while isinstance(node, fx.Node) and node.name not in calls:
            call = node.meta.get(meta.OP)
            if call is None or call.op != "unary" or base_name(analysis.gm, node) not in SAME_VALUE:
                break
            node = call.args.get("input")
        if isinstance(node, fx.Node) and node.name in calls:
            fixes[node.name] = StreamFix(branch.add, branch.skip)
    return fixes


def _deviation(original: Runner, current: Runner, add_original: fx.Node, add_pruned: fx.Node, skip: int,
               kept: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    """The stream operand of a residual add, unpruned minus pruned (at the kept channels), where both runs hold
    it in the layer output's shape; 0 otherwise."""
    stream_original = original.env.get(add_original.args[skip])
    stream_pruned = current.env.get(add_pruned.args[skip])
    if not (isinstance(stream_original, torch.Tensor) and isinstance(stream_pruned, torch.Tensor)):
        return 0.0
    if kept is not None:
        stream_original = stream_original.index_select(-1, kept)
    if stream_original.shape != like.shape or stream_pruned.shape != like.shape:
        return 0.0
    return stream_original - stream_pruned


def _layer_callback(layer: Layer, moments: Moments) -> Callable:
    """Records the unpruned layer's kept inputs and its output (one-shot statistics)."""
    def record(args: tuple, output: Any) -> None:
        moments.add(args[layer.input_position], output, columns=layer.kept)
    return record


def _query_callback(site: QkSite, grams: dict[str, torch.Tensor], counts: dict[str, int]) -> Callable:
    def record(args: tuple, output: Any) -> None:
        rows = site.product.query.rows(args[site.product.query.position].detach().float())
        grams[site.product.node] = grams.get(site.product.node, 0) + (rows.transpose(1, 2) @ rows).double()
        counts[site.product.node] = counts.get(site.product.node, 0) + rows.shape[1]
    return record


# --- solving and folding -----------------------------------------------------------------------------------

def ridge_solve(xx: torch.Tensor, xy: torch.Tensor, prior: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """argmin_V ||X V - Y||² + λ||V - prior||² from XᵀX and XᵀY, λ = ridge x the mean diagonal of XᵀX.

    XᵀX + λI is symmetric positive definite: a Cholesky solve (half an LU's work), LU where rounding makes
    the factorisation fail."""
    strength = ridge_strength(xx, ridge)
    system = xx + strength * torch.eye(xx.shape[0], dtype=xx.dtype)
    rhs = xy + strength * prior
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(system, rhs)


def _error(xx: torch.Tensor, xy: torch.Tensor, yy: float, v: torch.Tensor) -> float:
    """||X V - Y||² from the statistics."""
    return float((v * (xx @ v)).sum() - 2 * (v * xy).sum() + yy)


def _solution_error(xx: torch.Tensor, xy: torch.Tensor, yy: float, v: torch.Tensor, prior: torch.Tensor,
                    ridge: float) -> float:
    """``_error`` of ``v = ridge_solve(xx, xy, prior, ridge)`` without a product with ``xx``: the solve's
    equations give XᵀX V = XᵀY + λ (prior - V), so ||X V - Y||² = ||Y||² - V·XᵀY + λ V·(prior - V)."""
    return float(yy - (v * xy).sum() + ridge_strength(xx, ridge) * (v * (prior - v)).sum())


def set_tensor(gm: fx.GraphModule, path: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer by a new tensor (never writes into one the user's model may share)."""
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, attr)
    value = value.to(old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = value


def _get(gm: fx.GraphModule, path: str) -> torch.Tensor:
    owner_path, _, attr = path.rpartition(".")
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, attr)


def _original_rows(analysis, keep: dict, layer: Layer) -> torch.Tensor:
    """The layer's unpruned kept inputs' weights and bias as (K [+1], out kept by the plan), float64."""
    w = analysis.tensor(layer.weight).detach().to(torch.float64)
    w = w if layer.in_dim == 0 else w.T  # (in, out)
    out_kept = keep.get(layer.weight, {}).get(1 - layer.in_dim)
    if out_kept is not None:
        w = w.index_select(1, out_kept)
    v = w.index_select(0, layer.kept)
    if layer.bias is not None:
        b = analysis.tensor(layer.bias).detach().to(torch.float64)
        b = b.index_select(0, out_kept) if out_kept is not None else b
        v = torch.cat([v, b[None]], 0)
    return v


def _fold_layer(gm: fx.GraphModule, layer: Layer, v: torch.Tensor) -> None:
    k = len(layer.kept)
    weight = v[:k] if layer.in_dim == 0 else v[:k].T
    set_tensor(gm, layer.weight, weight)
    if layer.bias is not None:
        set_tensor(gm, layer.bias, v[k])


def _solve_layer(gm, analysis, keep, layer: Layer, moments: Moments, ridge: float | None) -> Fitted:
    prior = _original_rows(analysis, keep, layer)
    xx, xy = moments.gram, moments.cross  # with a ones column for the bias, if the layer has one
    strength = relative_ridge(xx.shape[0], moments.rows, ridge)
    v = ridge_solve(xx, xy, prior, strength)  # Y was recorded at the kept outputs only
    before, after = _error(xx, xy, moments.yy, prior), _solution_error(xx, xy, moments.yy, v, prior, strength)
    _fold_layer(gm, layer, v)
    return Fitted(layer.node, before, after)


def _fold_keys(gm, analysis, keep, site: QkSite, gram: torch.Tensor, rows_seen: int, removed: torch.Tensor,
               ridge: float | None) -> list[Fitted]:
    """Move every head's removed k rows, regressed through its queries, into its kept k rows."""
    atom_of = analysis.atoms.atom_of
    original = analysis.tensor(site.weight).detach().to(torch.float64)
    original = original if site.out_dim == 0 else original.T  # (k channels, in)
    in_kept = keep.get(site.weight, {}).get(1 - site.out_dim)
    if in_kept is not None:
        original = original.index_select(1, in_kept)
    if site.bias is not None:  # the bias as one more input column: it moves with its row
        original = torch.cat([original, analysis.tensor(site.bias).detach().to(torch.float64)[:, None]], 1)
    pruned = _get(gm, site.weight).detach().to(torch.float64)
    pruned = pruned if site.out_dim == 0 else pruned.T
    if site.bias is not None:
        pruned = torch.cat([pruned, _get(gm, site.bias).detach().to(torch.float64)[:, None]], 1)
    rows_kept = keep.get(site.weight, {}).get(site.out_dim)
    per_head: dict[tuple, torch.Tensor] = {}
    for r, ids in enumerate(site.product.query.ids):  # q heads reading the same k (GQA) add up
        key = tuple(atom_of[ids].tolist())
        per_head[key] = per_head.get(key, 0) + gram[r]
    fitted = []
    for key, q_gram in per_head.items():
        gone = removed[torch.tensor(key)]
        if not gone.any() or gone.all():
            continue
        rows = site.key_rows[key]
        kept_pos, gone_pos = torch.nonzero(~gone).flatten(), torch.nonzero(gone).flatten()
        q_kk, q_kr = q_gram[kept_pos][:, kept_pos], q_gram[kept_pos][:, gone_pos]
        b = ridge_solve(q_kk, q_kr, torch.zeros_like(q_kr), relative_ridge(len(kept_pos), rows_seen, ridge))  # q_R ≈ bᵀ q_K
        targets = rows[kept_pos]
        where = torch.searchsorted(rows_kept, targets) if rows_kept is not None else targets
        pruned[where] = original[targets] + b @ original[rows[gone_pos]]
        # logits lose q_R·k_R; what of q_R the kept queries cannot explain, before and after (per unit key)
        before = float(q_gram[gone_pos][:, gone_pos].trace())
        fitted.append(Fitted(f"{site.product.node}:{site.weight}[{int(targets[0])}..]", before, before - float((q_kr * b).sum())))
    if site.bias is not None:
        set_tensor(gm, site.bias, pruned[:, -1])
        pruned = pruned[:, :-1]
    set_tensor(gm, site.weight, pruned if site.out_dim == 0 else pruned.T)
    return fitted


def least_squares(gm: fx.GraphModule, analysis, keep: dict, removed: torch.Tensor, batches: Iterable[tuple],
                  sequential: bool = False, ridge: float | None = None,
                  removed_branches: Iterable = ()) -> list[Fitted]:
    """Pass: compensate ``gm`` (the pruned copy of ``analysis.gm``) in place; returns what was fitted. ``ridge``
    (relative to each Gram's mean diagonal; default: ``statistics.relative_ridge`` of the layer's features and
    calibration rows) regularises every solve towards the uncompensated weights. ``removed_branches``: the
    residual branches the plan removes; in ``sequential`` mode the stream writers after them are refitted too."""
    batches = list(batches)
    present = {n.name for n in gm.graph.nodes}  # a removed residual branch takes its layers with it
    layers = [layer for layer in shrinking_layers(analysis, keep) if layer.node in present]
    fixes = {node: fix for node, fix in stream_writers(analysis, removed_branches).items() if node in present} \
        if sequential else {}
    if fixes:  # writers whose inputs kept every feature are fitted too, in graph order
        order = {node.name: i for i, node in enumerate(analysis.gm.graph.nodes)}
        fitted_already = {layer.node for layer in layers}
        layers += [Layer(**vars(call), kept=torch.arange(analysis.tensor(call.weight).shape[call.in_dim]))
                   for call in linear_calls(analysis) if call.node in fixes and call.node not in fitted_already]
        layers.sort(key=lambda layer: order[layer.node])
    sites = [site for site in qk_sites(analysis, removed) if site.product.node in present]
    keys = _KeyFolds(gm, analysis, keep, removed, ridge)
    moments = {layer.node: Moments(ones=layer.bias is not None) for layer in layers}
    out_kept = {layer.node: keep.get(layer.weight, {}).get(1 - layer.in_dim) for layer in layers}
    if sequential:
        return _sequential(gm, analysis, layers, sites, keys, moments, out_kept, batches, ridge, fixes)
    callbacks = {site.product.node: keys.recorder(site) for site in sites}
    callbacks.update({layer.node: _kept_outputs(_layer_callback(layer, moments[layer.node]), out_kept[layer.node])
                      for layer in layers})
    watch(analysis.gm, batches, callbacks)
    fitted = [f for site in sites for f in keys.fold(site)]
    return fitted + [_solve_layer(gm, analysis, keep, layer, moments[layer.node], ridge) for layer in layers]


class _KeyFolds:
    """The q·kᵀ sites' query Grams, recorded on the unpruned model, and their folds into ``gm``'s k rows."""

    def __init__(self, gm: fx.GraphModule, analysis, keep: dict, removed: torch.Tensor, ridge: float | None) -> None:
        self.gm, self.analysis, self.keep, self.removed, self.ridge = gm, analysis, keep, removed, ridge
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def recorder(self, site: QkSite) -> Callable:
        return _query_callback(site, self.grams, self.rows)

    def fold(self, site: QkSite) -> list[Fitted]:
        node = site.product.node
        if node not in self.grams:  # the product never ran on the calibration data
            return []
        return _fold_keys(self.gm, self.analysis, self.keep, site, self.grams[node], self.rows[node], self.removed,
                          self.ridge)


def _kept_outputs(callback: Callable, out_kept: torch.Tensor | None) -> Callable:
    """A layer callback that sees only the output features the plan keeps."""
    if out_kept is None:
        return callback
    return lambda args, output: callback(args, output.index_select(-1, out_kept))


def _sequential(gm, analysis, layers: list[Layer], sites: list[QkSite], keys: _KeyFolds, moments: dict,
                out_kept: dict, batches: list[tuple], ridge: float | None,
                fixes: dict[str, StreamFix] | None = None) -> list[Fitted]:
    """Layer after layer: X_K from the pruned model as compensated so far, Y from the unpruned model.

    The query Grams are recorded on the way by the same unpruned runs (no extra forward pass): a site is folded
    once every unpruned run has passed its product and before any pruned run reaches its k Linear. A site whose
    k Linear comes before an earlier shrinking layer (which the pruned runs may have passed already) is recorded
    by a pass of its own first."""
    order = {node.name: i for i, node in enumerate(analysis.gm.graph.nodes)}
    starts = [order[layer.node] for layer in layers]

    def recorded_on_the_way(site: QkSite) -> bool:
        before = [start for start in starts if start < order[site.product.node]]
        return not before or order[site.product.key_source] > max(before)

    early = [site for site in sites if not recorded_on_the_way(site)]
    watch(analysis.gm, batches, {site.product.node: keys.recorder(site) for site in early})
    fitted = [f for site in early for f in keys.fold(site)]
    pending = sorted((site for site in sites if recorded_on_the_way(site)), key=lambda site: order[site.product.node])
    recorders = {site.product.node: keys.recorder(site) for site in pending}
    originals = [Runner(analysis.gm, batch, recorders) for batch in batches]
    pruned = [Runner(gm, batch) for batch in batches]

    def fold_passed(position: float) -> None:  # sites whose product every unpruned run has passed
        while pending and order[pending[0].product.node] <= position:
            site = pending.pop(0)
            fitted.extend(keys.fold(site))
            for current in pruned:
                current.refresh({site.weight, site.bias} - {None})

    fixes = fixes or {}
    nodes_original = {n.name: n for n in analysis.gm.graph.nodes}
    nodes_pruned = {n.name: n for n in gm.graph.nodes}
    for layer in layers:
        outputs = [original.run_until(layer.node, inclusive=True) for original in originals]
        fold_passed(order[layer.node])
        fix = fixes.get(layer.node)
        for y, current, original in zip(outputs, pruned, originals):
            x = current.run_until(layer.node, inclusive=False)[layer.input_position]
            kept = out_kept[layer.node]
            target = y if kept is None else y.index_select(-1, kept)
            if fix is not None:  # and what the stream lacks at its add, for this writer to take back
                target = target + _deviation(original, current, nodes_original[fix.add], nodes_pruned[fix.add],
                                             fix.skip, kept, target)
            moments[layer.node].add(x, target)
        fitted.append(_solve_layer(gm, analysis, keys.keep, layer, moments[layer.node], ridge))
        for current in pruned:  # what the solve replaced, wherever a runner already fetched it
            current.refresh({layer.weight, layer.bias} - {None})
    if pending:
        for original in originals:
            original.run_to_end()
        fold_passed(float("inf"))
    return fitted
