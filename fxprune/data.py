"""Calibration data: input batches from whatever users hand over (DataLoaders, lists, tuples, dicts).

Every batch becomes a tuple of the model's positional inputs. A model with one input (an image) takes the
first item of a tuple (a DataLoader's ``(images, labels)``) or a dict's "image"; a model with several
(a Hugging Face encoder's ``(input_ids, attention_mask)``) takes that many leading items of a tuple, or a
dict's entries by the names of the graph's inputs (a tokenizer's output).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.fx as fx

from .errors import InvalidArgumentError


def input_names(gm: fx.GraphModule) -> list[str]:
    """The graph's positional inputs by name (gates a gated graph adds are not among them)."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def batches(data: Iterable | None, limit: int | None = None, names: Sequence[str] = ("input",)):
    """Tuples of positional inputs, one per batch of ``data``, for a model whose inputs are ``names``."""
    if data is None:
        raise InvalidArgumentError("fxprune: this importance criterion needs calibration data: pass data=[batch, ...] "
                                   "(a DataLoader or a list of input tensors)")
    arity = max(1, len(names))
    for i, item in enumerate(data):
        if limit is not None and i >= limit:
            return
        if isinstance(item, dict):
            item = tuple(item[n] for n in names) if arity > 1 and all(n in item for n in names) \
                else (item.get("image", next(iter(item.values()))),)
        elif isinstance(item, (list, tuple)):
            item = tuple(item[:arity])
        else:
            item = (item,)
        if not all(isinstance(x, torch.Tensor) for x in item):
            kinds = ", ".join(type(x).__name__ for x in item)
            raise InvalidArgumentError(f"fxprune: calibration batch {i} holds {kinds}, not tensors")
        yield item
