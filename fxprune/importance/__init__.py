"""Importance criteria: one score per atom (a set of channels removed together); low scores go first.

A criterion is a function ``(analysis, **options) -> Tensor[atoms]`` registered under a name. To add one,
write a module here with a function decorated by ``@register("name")`` and import it below.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import InvalidArgumentError

Criterion = Callable[..., torch.Tensor]
_REGISTRY: dict[str, Criterion] = {}


def register(name: str) -> Callable[[Criterion], Criterion]:
    def wrap(fn: Criterion) -> Criterion:
        _REGISTRY[name] = fn
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def heads_from_channels(analysis, scores: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Give every head atom the sum (or mean) of the scores of the channels it owns, plus its own."""
    scores = scores.clone()
    for head, channels in analysis.atoms.head_links.items():
        owned = scores[torch.tensor(sorted(channels), dtype=torch.long)]
        scores[head] += owned.sum() if reduce == "sum" else owned.mean()
    return scores


def score(analysis, name: str, **options) -> torch.Tensor:
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"fxprune: unknown importance '{name}'; choose one of {available()}")
    scores = _REGISTRY[name](analysis, **options)
    if scores.shape != (analysis.atoms.count,):
        raise InvalidArgumentError(f"fxprune: importance '{name}' returned shape {tuple(scores.shape)}, "
                                   f"expected one score per atom ({analysis.atoms.count})")
    return scores


from . import attention, dimap, magnitude, random, taylor  # noqa: E402,F401  (registers the built-in criteria)
