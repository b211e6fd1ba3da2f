"""Example values recorded on every node: shapes of tensors, python values of scalars and sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.interpreter import Interpreter

from .. import meta
from ..errors import CaptureError


class _ValueRecorder(Interpreter):
    """Runs the graph and records every node's value: tensor shapes, and the python values (sizes, ints) that
    shape queries produce; with ``fake_mode``, on fake tensors (shapes without computing). What fx's ShapeProp
    does, without printing a traceback for a failure that capture recovers from (by exporting, or by a real
    run after a failed fake one)."""

    def __init__(self, gm: fx.GraphModule, fake_mode: Any = None) -> None:
        super().__init__(gm)
        self.fake_mode, self.real_module, self.fake_module = fake_mode, self.module, None
        if fake_mode is not None:
            from torch._dynamo.utils import deepcopy_to_fake_tensor

            self.fake_module = deepcopy_to_fake_tensor(self.module, fake_mode)

    def run_node(self, n: fx.Node) -> Any:
        try:
            if self.fake_mode is None:
                result = super().run_node(n)
            else:
                from torch._dispatch.python import enable_python_dispatcher

                self.module = self.fake_module  # parameters as fake tensors too, for this node only
                try:
                    with self.fake_mode, enable_python_dispatcher():
                        result = super().run_node(n)
                finally:
                    self.module = self.real_module
        except Exception as exc:  # noqa: BLE001 - named here, handled by the caller
            raise _NodeFailed(f"at node '{n.name}' ({n.format_node()}): {type(exc).__name__}: {exc}") from exc
        n.meta[meta.VALUE] = _describe(result)
        return result

    def propagate(self, *args: Any) -> Any:
        if self.fake_mode is not None:
            args = tuple(self.fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args)
        return self.run(*args)


class _NodeFailed(RuntimeError):
    pass


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
        shortcut = _module_shortcut(module, on_meta, args, kwargs)
        if shortcut is not None:
            return shortcut
        return torch.func.functional_call(module, on_meta, args, kwargs)
    if node.target is F.scaled_dot_product_attention and _plain_attention(args, kwargs):
        return args[0].new_empty((*args[0].shape[:-1], args[2].shape[-1]))  # its meta kernel: 10 ms a call
    if node.target in _SAME_AS_INPUT_FUNCTIONS and args and _same_as_input(args[0], [*args[1:], *kwargs.values()]):
        if node.target not in (F.layer_norm, torch.layer_norm) or _normalises_last_dims(args, kwargs):
            return torch.empty_like(args[0])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


# Ops whose result has their input's shape and dtype: their meta kernels are Python decompositions
# (layer_norm's was a third of recording ViT-B's values) and ``functional_call`` costs ~3 ms a module, so
# their result is made directly, where the input and every other tensor share one dtype and a norm's
# shape matches (anything else takes the general path, which raises what a real run would).
_SAME_AS_INPUT_MODULES = (nn.Identity, nn.Dropout, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LayerNorm)
_SAME_AS_INPUT_FUNCTIONS = {F.layer_norm, torch.layer_norm, F.gelu, F.relu, F.silu, F.dropout, torch.tanh,
                            torch.sigmoid}


def _same_as_input(x: Any, others: list) -> bool:
    return isinstance(x, torch.Tensor) and all(o.dtype == x.dtype for o in others if isinstance(o, torch.Tensor))


def _plain_attention(args: tuple, kwargs: dict) -> bool:
    """SDPA on q, k, v of one dtype with equal leading dims, without GQA broadcasting: out is q's rows x v's width."""
    if len(args) < 3 or kwargs.get("enable_gqa") or not all(isinstance(t, torch.Tensor) for t in args[:3]):
        return False
    q, k, v = args[:3]
    return (q.ndim == k.ndim == v.ndim >= 2 and q.dtype == k.dtype == v.dtype
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and k.shape[-2] == v.shape[-2]
            and q.shape[-1] == k.shape[-1])


def _normalises_last_dims(args: tuple, kwargs: dict) -> bool:
    shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
    return bool(shape) and tuple(args[0].shape[args[0].ndim - len(shape):]) == shape


def _module_shortcut(module: nn.Module, params: dict, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A leaf module's meta result without ``functional_call``, for the commonest leaves; None otherwise."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x, kind = args[0], type(module)
    if kind is nn.Linear and _same_as_input(x, list(params.values())) and x.ndim >= 1 \
            and x.shape[-1] == module.in_features:
        return x.new_empty((*x.shape[:-1], module.out_features))  # F.linear on meta: 2.5 ms a call
    if kind in _SAME_AS_INPUT_MODULES and _same_as_input(x, list(params.values())):
        if kind is nn.LayerNorm and not _normalises_last_dims((x, module.normalized_shape), {}):
            return None
        return torch.empty_like(x)
    return None


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
