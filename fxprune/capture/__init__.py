"""Capture: a model and example inputs become a torch.fx GraphModule with every node's shape known.

The user's model is copied first (its modules, buffers and configuration), so nothing done later can reach it.
Its parameters are shared, not copied: a copy of a 1B-parameter model's weights cost gigabytes and seconds.
Nothing in fxprune writes into the captured graph's parameters (the rewrite slices into new tensors, the
weight-masked reference masks activations or copies, importance reads or differentiates a deep copy), so
the user's weights stay untouched; a parameter the user changes in place after capture changes in the
captured graph too.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .. import meta
from ..errors import CaptureError, InvalidArgumentError
from .tracer import LeafAwareTracer
from .values import OpaqueValue, TensorValue, record_values, record_values_on_meta


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
    """Trace a copy of ``model`` (sharing its parameters) and record every node's example output shape.

    ``method``: "auto" (symbolic tracing, torch.export where that fails), "symbolic" or "export"."""
    if method not in ("auto", "symbolic", "export"):
        raise InvalidArgumentError(f"fxprune: capture method must be auto, symbolic or export, got {method!r}")
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgumentError(f"fxprune: expected a torch.nn.Module, got {type(model).__name__}")
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise InvalidArgumentError(f"fxprune: '{on_meta[0]}' is on the meta device (no values); importance and "
                                   "verification need real weights: materialise the model first (e.g. to_empty + load)")
    with paused_gc():
        return _capture(model, example_inputs, method)


def _capture(model: torch.nn.Module, example_inputs: Sequence | None, method: str) -> Captured:
    inputs = resolve_example_inputs(model, example_inputs)
    was_training = model.training
    model_copy = copy_sharing_parameters(model).eval()  # `if self.training` branches are traced as in eval
    if isinstance(model_copy, fx.GraphModule):
        gm = model_copy
        record_values(gm, inputs, type(model).__name__)
    else:
        gm = _symbolic_or_export(model, model_copy, inputs, method)
    from .decompose import make_attention_visible  # these passes need the recorded shapes
    from .normalize import fuse_rms_norm, unpack_stacked_heads

    for normalise in (make_attention_visible, unpack_stacked_heads, fuse_rms_norm):
        if normalise(gm).modified:  # values of the nodes the pass added; the others kept their shapes
            record_values_on_meta(gm, inputs, type(model).__name__, only_missing=True)
    cfg = getattr(model, "pretrained_cfg", None)
    architecture = cfg.get("architecture") if isinstance(cfg, dict) else None
    if architecture is None and isinstance(model, fx.GraphModule):
        architecture = model.meta.get(meta.ARCHITECTURE)
    return Captured(gm=gm, example_inputs=inputs, was_training=was_training, architecture=architecture)


@contextlib.contextmanager
def paused_gc():
    """Python's cyclic garbage collector paused for a bulk computation, then one collection of the young
    objects made meanwhile. Building hundreds of thousands of small objects (torch.export's graph and fake
    tensors, the analysis' per-atom lists and sets) otherwise sets off full collections over the whole heap
    again and again: at 1B parameters they were more than half of the analysis' time."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)


def copy_sharing_parameters(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters are the model's own ``Parameter`` objects (not copies).

    Modules, buffers (a model may update those in its forward) and plain attributes (a Hugging Face config,
    whose cache setting capture turns off) are copied as before; only the parameters, the bulk of the
    memory, are shared. The copy's module tree and attributes can be changed freely; its parameters must
    only ever be read or replaced, never written in place."""
    memo = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return copy.deepcopy(model, memo)


def _symbolic_or_export(model: torch.nn.Module, model_copy: torch.nn.Module, inputs: tuple,
                        method: str = "auto") -> fx.GraphModule:
    """A graph of ``model_copy`` with every node's example value recorded.

    Symbolic tracing with timm's leaves first (timm leaves without a module rule are traced into where they
    trace; one whose trace fails in context is closed again and the trace retried). Where tracing fails, or
    the traced graph fails on the example inputs (shape propagation), torch.export (specialised on the
    example inputs' shapes), whose ATen graph the same op rules read; where export fails too after a
    shape-propagation failure, the symbolic trace with every timm leaf kept opaque. A symbolic trace that
    had to keep a timm leaf opaque (untraceable) is replaced by torch.export's graph when export works, since
    export sees inside it."""
    name = type(model).__name__
    trace_error = "symbolic tracing was not asked for"
    opened: list[str] = []
    if method != "export":
        gm, trace_error, opened = _trace(model, model_copy, inputs, method, frozenset())
        if gm is not None and (method == "symbolic" or not gm.meta[meta.KEPT_LEAVES]):
            return gm
        if gm is not None:  # timm leaves stayed opaque (untraceable): export sees through them, if it works
            traced = gm
            try:
                return _export(model_copy, inputs, name)
            except Exception:  # noqa: BLE001 - export cannot either: the trace with opaque leaves it is
                return traced
    try:
        return _export(model_copy, inputs, name)
    except Exception as exc:  # noqa: BLE001 - both captures failed: report both
        export_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if opened:  # the traced-into timm leaves may be what failed on the example inputs: keep them opaque
            gm, _, _ = _trace(model, model_copy, inputs, method, frozenset(opened))
            if gm is not None:
                return gm
        raise CaptureError(
            f"fxprune: {trace_error}. torch.export failed too: {export_error}. "
            "Data-dependent Python control flow is the usual cause: make the module a leaf "
            "(timm.layers.register_notrace_module) so its channels are frozen, or rewrite the branch."
        ) from exc


def _export(model_copy: torch.nn.Module, inputs: tuple, name: str) -> fx.GraphModule:
    _without_cache(model_copy)
    with torch.no_grad():
        exported, static = _export_dynamic(model_copy, inputs)
        if exported is None:
            exported = torch.export.export(model_copy, inputs, strict=False)
    gm = exported.module()
    if static:
        shapes = [tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]
        static = (f"torch.export could not keep every batch and sequence dim dynamic ({static}); the pruned module "
                  f"accepts only the example inputs' sizes {shapes} in those dims")
        warnings.warn(f"fxprune: {name}: {static}", stacklevel=4)
        gm.meta[meta.STATIC_SHAPES] = static
    _constants_as_buffers(gm)
    gm.meta[meta.CAPTURE_METHOD] = "torch.export"
    _record_exported_values(gm, inputs, name)
    return gm


def _record_exported_values(gm: fx.GraphModule, inputs: tuple, name: str) -> None:
    """``record_values`` on fake tensors (shapes and dtypes without computing anything: a real forward of a
    1B-parameter decoder took seconds; meta tensors, as for symbolic traces, fail on the tensors an exported
    text model creates on the CPU, e.g. its position ids and masks), falling back to the real forward wherever
    fake propagation fails (an op without a fake kernel, a value the graph reads from data). torch.export traced this graph with
    fake tensors already, so it propagates; the shapes a fake tensor carries are the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .values import _ValueRecorder

    try:
        with torch.no_grad():
            _ValueRecorder(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    except Exception:  # noqa: BLE001 - the real forward records them (and reports what fails)
        record_values(gm, inputs, name)


def _export_dynamic(model_copy: torch.nn.Module, inputs: tuple) -> tuple[Any, str | None]:
    """The exported program with the batch and token-sequence dims dynamic, else the batch alone (None where
    neither exports), and what had to stay fixed on the way (None: nothing)."""
    if not any(isinstance(x, torch.Tensor) and x.ndim > 0 for x in inputs):
        return None, None
    attempts = [_dynamic_dims(inputs)]
    if _dynamic_dims(inputs, sequence=False) != attempts[0]:
        attempts.append(_dynamic_dims(inputs, sequence=False))
    reasons = []
    for dims in attempts:
        try:  # at a batch of two: export specialises sizes 0 and 1
            exported = torch.export.export(model_copy, _batch_of_two(inputs), dynamic_shapes=dims, strict=False)
        except Exception as exc:  # noqa: BLE001 - reported by the caller, and by analyze
            reasons.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            continue
        pinned = _specialised(exported, dims)
        if pinned is None:
            return exported, "; ".join(reasons) or None
        reasons.append(pinned)  # fixed at the batch of two: try fewer dynamic dims, or the example's own sizes
    return None, "; ".join(reasons)


def _specialised(exported, dims: tuple) -> str | None:
    """Which of the dims asked dynamic the exported program fixed (export specialises a dim the model pins,
    e.g. ``int(x.shape[0])``: a constant size, or a symbol whose range is a single value), or None."""
    user_inputs = set(exported.graph_signature.user_inputs)
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder" and n.name in user_inputs]

    def fixed(size: Any) -> bool:
        if isinstance(size, int) or getattr(size.node.expr, "is_number", False):
            return True
        span = exported.range_constraints.get(size.node.expr)
        return span is not None and span.lower == span.upper

    pinned = [f"input {position} dim {dim}" for position, (node, asked) in enumerate(zip(placeholders, dims))
              for dim in asked or {} if fixed(node.meta["val"].shape[dim])]
    return f"the model fixes {', '.join(pinned)}" if pinned else None


def _without_cache(model_copy: torch.nn.Module) -> None:
    """A Hugging Face decoder returns its key/value cache by default, an object export cannot return; the
    captured copy computes the same outputs without it (the user's model keeps its config)."""
    config = getattr(model_copy, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False


def _batch_of_two(inputs: tuple) -> tuple:
    """A batch of one grown to two (export specialises sizes 0 and 1, so a batch of one would pin the batch)."""
    return tuple(x.expand(2, *x.shape[1:]).contiguous() if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == 1
                 else x for x in inputs)


def _dynamic_dims(inputs: tuple, sequence: bool = True) -> tuple:
    """Dynamic dims for export: the batch of every tensor input, and (``sequence``) the sequence of integer
    (token, mask or position) inputs. ``Dim.AUTO`` lets export keep a dim static where the model needs it."""
    def dims(x: object) -> dict | None:
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            return None
        if sequence and x.ndim >= 2 and not x.is_floating_point() and x.shape[1] > 1:
            return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        return {0: torch.export.Dim.AUTO}

    return tuple(dims(x) for x in inputs)


def _constants_as_buffers(gm: fx.GraphModule) -> None:
    """export lifts tensor constants (e.g. TinyViT's attention-bias indices) to plain attributes; make them
    non-persistent buffers, which every later pass (slicing, copying, moving) treats like the others."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, attr = str(node.target).rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, attr, None)
        if (isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
                and attr not in owner._buffers and attr not in owner._parameters):
            delattr(owner, attr)
            owner.register_buffer(attr, value, persistent=False)


def _trace(model: torch.nn.Module, model_copy: torch.nn.Module, inputs: tuple, method: str,
           closed: frozenset[str]) -> tuple[fx.GraphModule | None, str, list[str]]:
    """Symbolic trace + shape propagation: (graph or None, why it failed, timm leaves traced into)."""
    closed = set(closed)
    probes: dict = {}
    while True:
        tracer = LeafAwareTracer(closed=closed, _probe_cache=probes)
        try:
            graph = tracer.trace(model_copy)
        except Exception as exc:  # fx raises many exception types; all mean "not traceable"
            inside = [path for path in reversed(tracer.scope_stack) if path in tracer.opened]
            if inside:  # an opened timm leaf traced alone but not in context: keep it opaque and retry
                closed.add(inside[0])
                continue
            where = tracer.scope_stack[-1] if tracer.scope_stack else "<root>"
            where_type = type(model_copy.get_submodule(where)).__name__ if tracer.scope_stack else type(model).__name__
            error = f"torch.fx cannot trace module '{where}' ({where_type}){_source_line(exc)}: {type(exc).__name__}: {exc}"
            if method == "symbolic":
                raise CaptureError(f"fxprune: {error}") from exc
            return None, error, []
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.meta[meta.OPENED_LEAVES] = list(tracer.opened)
        gm.meta[meta.KEPT_LEAVES] = {**tracer.kept, **{path: "its trace failed inside the model" for path in closed}}
        try:
            record_values_on_meta(gm, inputs, type(model).__name__)
            return gm, "", list(tracer.opened)
        except CaptureError as exc:
            if method == "symbolic":
                raise
            error = f"the symbolically traced graph failed on the example inputs ({str(exc).removeprefix('fxprune: ')})"
            return None, error, list(tracer.opened)


def _source_line(exc: BaseException) -> str:
    """' at file:line' of the innermost frame of the model's own code (not torch's) in the traceback."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/fxprune/" not in f.filename]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


__all__ = ["Captured", "CaptureError", "OpaqueValue", "TensorValue", "capture", "record_values", "resolve_example_inputs"]
