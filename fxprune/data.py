"""Calibration data: input batches from whatever users hand over (DataLoaders, lists, tuples, dicts)."""
from __future__ import annotations

from typing import Iterable

import torch

from .errors import InvalidArgumentError


def batches(data: Iterable | None, limit: int | None = None):
    """Input batches from ``data`` (tensors, tuples whose first item is the input, or dicts with 'image')."""
    if data is None:
        raise InvalidArgumentError("fxprune: this importance criterion needs calibration data: pass data=[batch, ...] "
                                   "(a DataLoader or a list of input tensors)")
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            return
        if isinstance(item, dict):
            item = item.get("image", next(iter(item.values())))
        if isinstance(item, (list, tuple)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            raise InvalidArgumentError(f"fxprune: calibration batch {i} is a {type(item).__name__}, not a tensor")
        yield item
