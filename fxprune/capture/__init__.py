"""Capture: a model and example inputs become a torch.fx GraphModule with every node's shape known.

The user's model is deep-copied first, so nothing done later can reach it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from .. import meta
from ..errors import CaptureError, InvalidArgumentError
from .tracer import LeafAwareTracer
from .values import OpaqueValue, TensorValue, record_values


@dataclass
class Captured:
    """A traced copy of the model; node.meta[meta.VALUE] describes each node's example output."""

    gm: fx.GraphModule
    example_inputs: tuple
    was_training: bool
    untied: bool = False  # head-shared depthwise convs were untied (the graph's parameters differ from the model's)
    architecture: str | None = None  # timm's name for the model's architecture, when it has one


def resolve_example_inputs(model: torch.nn.Module, example_inputs: Sequence | None) -> tuple:
    """The example inputs to trace with: the user's, or one random batch of timm's declared input size."""
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            return (example_inputs,)
        if not isinstance(example_inputs, (tuple, list)):
            raise InvalidArgumentError(
                f"fxprune: example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; "
                "pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
            )
        return tuple(example_inputs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if input_size is None:
        raise InvalidArgumentError(
            f"fxprune: cannot tell the input shape of {type(model).__name__}: it carries no "
            "pretrained_cfg['input_size']. Pass example_inputs=(torch.randn(1, C, H, W),)."
        )
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and len(input_size) == 3 and tuple(img_size) != tuple(input_size[1:]):
        input_size = (input_size[0], *img_size)  # models built with img_size= override the cfg
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, *input_size, generator=generator),)


def capture(model: torch.nn.Module, example_inputs: Sequence | None = None, method: str = "auto") -> Captured:
    """Trace a deep copy of ``model`` and record every node's example output shape.

    ``method``: "auto" (symbolic tracing, torch.export where that fails), "symbolic" or "export"."""
    if method not in ("auto", "symbolic", "export"):
        raise InvalidArgumentError(f"fxprune: capture method must be auto, symbolic or export, got {method!r}")
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"fxprune: expected a torch.nn.Module, got {type(model).__name__}")
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise InvalidArgumentError(f"fxprune: '{on_meta[0]}' is on the meta device (no values); importance and "
                                   "verification need real weights: materialise the model first (e.g. to_empty + load)")
    inputs = resolve_example_inputs(model, example_inputs)
    was_training = model.training
    model_copy = copy.deepcopy(model).eval()  # python-level `if self.training` branches are traced as in eval
    if isinstance(model_copy, fx.GraphModule):
        gm = model_copy
    else:
        gm = _symbolic_or_export(model, model_copy, inputs, method)
    record_values(gm, inputs, type(model).__name__)
    from .decompose import make_attention_visible  # these passes need the recorded shapes
    from .normalize import unpack_stacked_heads

    for normalise in (make_attention_visible, unpack_stacked_heads):
        if normalise(gm).modified:
            record_values(gm, inputs, type(model).__name__)
    cfg = getattr(model, "pretrained_cfg", None)
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if architecture is None and isinstance(model, fx.GraphModule):
        architecture = model.meta.get(meta.ARCHITECTURE)
    return Captured(gm=gm, example_inputs=inputs, was_training=was_training, architecture=architecture)


def _symbolic_or_export(model: torch.nn.Module, model_copy: torch.nn.Module, inputs: tuple,
                        method: str = "auto") -> fx.GraphModule:
    """Symbolic tracing with timm's leaves; where Python control flow defeats it, torch.export (specialised
    on the example inputs' shapes), whose ATen graph the same op rules read."""
    trace_error = "symbolic tracing was not asked for"
    if method != "export":
        tracer = LeafAwareTracer()
        try:
            graph = tracer.trace(model_copy)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
        except Exception as exc:  # fx raises many exception types; all mean "not traceable"
            where = tracer.scope_stack[-1] if tracer.scope_stack else "<root>"
            where_type = type(model_copy.get_submodule(where)).__name__ if tracer.scope_stack else type(model).__name__
            trace_error = f"torch.fx cannot trace module '{where}' ({where_type}){_source_line(exc)}: {type(exc).__name__}: {exc}"
            if method == "symbolic":
                raise CaptureError(f"fxprune: {trace_error}") from exc
    try:
        with torch.no_grad():
            exported = torch.export.export(model_copy, inputs, strict=False)
        gm = exported.module()
        gm.meta[meta.CAPTURE_METHOD] = "torch.export"
        return gm
    except Exception as exc:  # noqa: BLE001 - both captures failed: report both
        raise CaptureError(
            f"fxprune: {trace_error}. torch.export failed too: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
            "Data-dependent Python control flow is the usual cause: make the module a leaf "
            "(timm.layers.register_notrace_module) so its channels are frozen, or rewrite the branch."
        ) from exc


def _source_line(exc: BaseException) -> str:
    """' at file:line' of the innermost frame of the model's own code (not torch's) in the traceback."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/fxprune/" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


__all__ = ["Captured", "CaptureError", "OpaqueValue", "TensorValue", "capture", "record_values", "resolve_example_inputs"]
