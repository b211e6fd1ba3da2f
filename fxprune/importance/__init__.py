"""Importance criteria: one score per atom (a set of channels removed together); low scores go first.

A criterion is a function ``(analysis, **options) -> Tensor[atoms]`` registered under a name, with its
properties. To add one, write a module here with a function decorated by ``@register("name", ...)`` and
import it at the bottom of this file (or register it from your own code: ``fxprune.importance.register``).

``comparable_across_groups``: the scores of different layers are on one scale (e.g. DIMAP's normalised
distortion), so budgets compare them directly; otherwise budgets compare within-group quantiles.
``needs_data``: the criterion reads calibration batches (``data=``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InvalidArgumentError

Criterion = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class CriterionSpec:
    name: str
    fn: Criterion
    comparable_across_groups: bool = False
    needs_data: bool = False


_REGISTRY: dict[str, CriterionSpec] = {}


def register(name: str, *, comparable_across_groups: bool = False,
             needs_data: bool = False) -> Callable[[Criterion], Criterion]:
    """Decorator: register an importance criterion under ``name`` with its properties."""
    def wrap(fn: Criterion) -> Criterion:
        _REGISTRY[name] = CriterionSpec(name, fn, comparable_across_groups, needs_data)
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def criterion(name: str) -> CriterionSpec:
    """The registered criterion ``name`` (an ``InvalidArgumentError`` naming the choices otherwise)."""
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"fxprune: unknown importance '{name}'; choose one of {available()}")
    return _REGISTRY[name]


def heads_from_channels(analysis, scores: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Give every head atom the sum (or mean) of the scores of the channels it owns, plus its own."""
    scores = scores.clone()
    for head, channels in analysis.atoms.head_links.items():
        owned = scores[torch.tensor(sorted(channels), dtype=torch.long)]
        scores[head] += owned.sum() if reduce == "sum" else owned.mean()
    return scores


def score(analysis, name: str, **options) -> torch.Tensor:
    scores = criterion(name).fn(analysis, **options)
    if scores.shape != (analysis.atoms.count,):
        raise InvalidArgumentError(f"fxprune: importance '{name}' returned shape {tuple(scores.shape)}, "
                                   f"expected one score per atom ({analysis.atoms.count})")
    return scores


from . import attention, dimap, magnitude, random, reconstruction, taylor  # noqa: E402,F401  (registers the built-in criteria)
