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


_NO_INPUT = object()


def record_values_on_meta(gm: fx.GraphModule, inputs: tuple, model_name: str, only_missing: bool = False) -> None:
    """Every node's value (``only_missing``: of the nodes without one, which a capture pass added) inferred
    on meta tensors: shapes and dtypes without computing anything. A real forward of ViT-B at the example
    batch was a sixth of the prune call, and normalising its stacked q/k/v cost a second one. Where meta
    tensors cannot stand in (data-dependent Python or ops, a value read from a tensor, an op without a meta
    kernel, a module holding plain tensors) the graph runs for real (``record_values``). The first real run
    of the graph is then the self-check's (or calibration's), which names inputs the model does not accept."""
    nodes = [n for n in gm.graph.nodes if n.op != "output" and not (only_missing and meta.VALUE in n.meta)]
    placeholders = iter(inputs)
    try:
        for node in nodes:
            if node.op == "placeholder":
                value = next(placeholders, _NO_INPUT)
                if value is _NO_INPUT:  # an input left to its default (``attn_mask=None``), as Interpreter does
                    if not node.args:
                        raise ValueError(f"no value for input '{node.name}'")
                    value = node.args[0]
            else:
                value = _run_on_meta(gm, node)
            node.meta[meta.VALUE] = _describe(value)
    except Exception:  # noqa: BLE001 - any doubt: the real forward records every value
        record_values(gm, inputs, model_name)


def _run_on_meta(gm: fx.GraphModule, node: fx.Node) -> Any:
    """``node``'s result on meta tensors standing for its arguments' recorded values."""
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    if node.op not in ("call_function", "call_method", "call_module"):
        raise ValueError(f"no meta inference for {node.op}")
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), _on_meta)
    if node.op == "call_module":  # e.g. the output projection of a decomposed nn.MultiheadAttention
        module = gm.get_submodule(str(node.target))
        on_meta = {name: t.to("meta") for name, t in [*module.named_parameters(), *module.named_buffers()]}
        return torch.func.functional_call(module, on_meta, args, kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _on_meta(arg: Any) -> Any:
    if not isinstance(arg, fx.Node):
        return arg.to("meta") if isinstance(arg, torch.Tensor) else arg
    return _meta_of(arg.meta[meta.VALUE])


def _meta_of(value: Any) -> Any:
    if isinstance(value, TensorValue):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, OpaqueValue):
        raise ValueError(f"no meta value for a {value.type_name}")
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_meta_of(v) for v in value)
    return value


def record_values(gm: fx.GraphModule, inputs: tuple, model_name: str) -> None:
    try:
        with torch.no_grad():
            _ValueRecorder(gm).propagate(*inputs)
    except Exception as exc:
        raise CaptureError(
            f"fxprune: running the traced {model_name} on the example inputs failed: "
            f"{type(exc).__name__}: {exc}. Check that example_inputs have the shape the model expects."
        ) from exc
