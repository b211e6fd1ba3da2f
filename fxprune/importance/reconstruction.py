"""Reconstruction importance (OBS-style): what a channel's removal costs the layer that reads it, after
least-squares compensation of the rest.

- A channel read by a Linear (v by the attention's output projection, an MLP hidden channel by fc2 /
  down_proj): with ``H = X̃ᵀX̃`` the Gram of the layer's inputs (a ones column for the bias) on calibration
  data, removing input j and re-solving the others (what ``compensation="least_squares"`` does) raises the
  layer's squared error by ``||W[:, j]||² / (H⁻¹)_jj`` (Optimal Brain Surgeon for a linear layer).
- A q/k channel c of a head: the logits lose ``q_c k_c``. Compensation regresses q_c on the head's kept query
  channels, leaving the residual ``1 / (Q⁻¹)_cc`` (``Q`` the head's query Gram); over query-key pairs the
  squared logit error is that residual times the key channel's energy ``Σ k_c²``. Where k cannot take the
  compensation (it is not a Linear's rows: rotary embeddings, per-head norms) the residual is ``Q_cc``.

Channels count the sum over every place that reads them; a head the sum of its channels. A group with a
channel no statistic reaches (read by a convolution, say) is scored by l2 magnitude instead, all of it; so is
a residual stream (kind "residual"): every block reads it through a norm whose statistics its removal
changes, which no single layer's least squares describes.
Scores of different groups are on different scales (budgets compare them within their groups).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..data import batches, input_names
from ..errors import InvalidArgumentError
from ..statistics import (LinearCall, Moments, Product, attention_products, linear_calls, relative_ridge,
                          ridge_strength, watch)
from . import heads_from_channels, register
from .magnitude import l2


def _ridged_inverse_diagonal(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    strength = ridge_strength(gram, ridge)
    return torch.linalg.inv(gram + strength * torch.eye(gram.shape[0], dtype=gram.dtype)).diagonal()


def _input_space(analysis, call: LinearCall):
    return next((s for s in analysis.ids.param_spaces if s.param == call.weight and s.dim == call.in_dim), None)


def _gram_callback(call: LinearCall, moments: Moments) -> Callable:
    def record(args: tuple, output: Any) -> None:
        moments.add(args[call.input_position])
    return record


def _product_callback(product: Product, moments: dict, rows: dict) -> Callable:
    def record(args: tuple, output: Any) -> None:
        q = product.query.rows(args[product.query.position].detach().float())
        k = product.key.rows(args[product.key.position].detach().float())
        q_gram, k_energy = (q.transpose(1, 2) @ q).double(), k.square().sum(1).double()
        old = moments.get(product.node)
        moments[product.node] = (q_gram, k_energy) if old is None else (old[0] + q_gram, old[1] + k_energy)
        rows[product.node] = rows.get(product.node, 0) + q.shape[1]  # query positions, as compensation counts them
    return record


def _layer_costs(analysis, call: LinearCall, gram: torch.Tensor, rows: int,
                 ridge: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, squared-error increase of removing each input alone) for one layer."""
    space = _input_space(analysis, call)
    weight = analysis.tensor(call.weight).detach().to(torch.float64)
    column_energy = weight.square().sum(1 - call.in_dim)  # per input feature
    strength = relative_ridge(gram.shape[0], rows, ridge)
    inverse_diagonal = _ridged_inverse_diagonal(gram, strength)[:space.size]
    return torch.arange(space.start, space.start + space.size), column_energy / inverse_diagonal


def _product_costs(analysis, product: Product, q_gram: torch.Tensor, k_energy: torch.Tensor, rows: int,
                   ridge: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(atoms, squared logit error of removing each q/k channel alone) for one attention product, head by head."""
    atom_of = analysis.atoms.atom_of
    queries: dict[tuple, torch.Tensor] = {}
    energies: dict[tuple, torch.Tensor] = {}
    for ids, gram in zip(product.query.ids, q_gram):
        key = tuple(atom_of[ids].tolist())
        queries[key] = queries.get(key, 0) + gram
    for ids, energy in zip(product.key.ids, k_energy):
        key = tuple(atom_of[ids].tolist())
        energies[key] = energies.get(key, 0) + energy
    atoms, costs = [], []
    for key, gram in queries.items():
        if key not in energies:
            continue
        if product.key_source is not None:
            residual = 1 / _ridged_inverse_diagonal(gram, relative_ridge(gram.shape[0], rows, ridge))
        else:
            residual = gram.diagonal()
        atoms.append(torch.tensor(key))
        costs.append(residual * energies[key])
    if not atoms:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
    return torch.cat(atoms), torch.cat(costs)


@register("reconstruction", needs_data=True)
def reconstruction(analysis, data=None, max_batches: int | None = 8, ridge: float | None = None,
                   **_) -> torch.Tensor:
    """Scores from ``max_batches`` calibration batches. ``ridge`` (relative to each Gram's mean diagonal) is by
    default compensation's rule, ``statistics.relative_ridge`` of the Gram's features (all of them: which go is
    not known yet) and calibration rows, so scores and compensation regularise alike."""
    calibration = list(batches(data, max_batches, input_names(analysis.gm)))
    if not calibration:
        raise InvalidArgumentError("fxprune: the calibration data yielded no batch")
    atom_of = analysis.atoms.atom_of
    prunable = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    for group in analysis.groups:
        if group.prunable and group.kind in ("qk", "v", "mlp"):
            prunable[torch.tensor(group.atoms, dtype=torch.long)] = True
    layers = []
    for call in linear_calls(analysis):
        space = _input_space(analysis, call)
        if space is not None and bool(prunable[atom_of[space.start:space.start + space.size]].any()):
            layers.append(call)
    products = [p for p in attention_products(analysis) if bool(prunable[atom_of[p.query.ids]].any())]
    grams = {call.node: Moments(ones=call.bias is not None) for call in layers}
    moments: dict[str, tuple] = {}
    rows: dict[str, int] = {}
    callbacks = {call.node: _gram_callback(call, grams[call.node]) for call in layers}
    callbacks.update({product.node: _product_callback(product, moments, rows) for product in products})
    watch(analysis.gm, calibration, callbacks)

    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    covered = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    for call in layers:
        if not grams[call.node].rows:  # never ran on the calibration data: its channels fall back to magnitude
            continue
        ids, costs = _layer_costs(analysis, call, grams[call.node].gram, grams[call.node].rows, ridge)
        scores.index_add_(0, atom_of[ids], costs)
        covered[atom_of[ids]] = True
    for product in products:
        atoms, costs = _product_costs(analysis, product, *moments[product.node], rows[product.node], ridge)
        scores.index_add_(0, atoms, costs)
        covered[atoms] = True
    magnitude = None
    for group in analysis.groups:
        atoms = torch.tensor(group.atoms, dtype=torch.long)
        uncovered = group.kind in ("qk", "v", "mlp") and len(atoms) and not bool(covered[atoms].all())
        if uncovered or group.kind == "residual":
            magnitude = l2(analysis) if magnitude is None else magnitude
            scores[atoms] = magnitude[atoms]
    return heads_from_channels(analysis, scores)
