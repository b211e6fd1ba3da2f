"""Example values recorded on every node: shapes of tensors, python values of scalars and sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from .. import meta
from ..errors import CaptureError


class _ValueRecorder(ShapeProp):
    """ShapeProp that also records python values (sizes, ints) that shape queries produce."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta[meta.VALUE] = _describe(result)
        return result


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorValue(tuple(value.shape), value.dtype)
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_describe(v) for v in value)
    if isinstance(value, (int, float, bool, str, torch.Size, type(None), torch.dtype, torch.device)):
        return value
    return OpaqueValue(type(value).__name__)


@dataclass(frozen=True)
class TensorValue:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class OpaqueValue:
    type_name: str


def record_values(gm: fx.GraphModule, inputs: tuple, model_name: str) -> None:
    try:
        with torch.no_grad():
            _ValueRecorder(gm).propagate(*inputs)
    except Exception as exc:
        raise CaptureError(
            f"fxprune: running the traced {model_name} on the example inputs failed: "
            f"{type(exc).__name__}: {exc}. Check that example_inputs have the shape the model expects."
        ) from exc
