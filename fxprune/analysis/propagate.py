"""Run the op rules over a captured graph, node by node, and collect every coupling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import meta
from ..capture import Captured, TensorValue
from .channels import ChannelIds
from .labels import Block, Labels, param_labels
from .rules import ParamRef, normalize, spec_of


UNKNOWN_OP = "no rule for"  # how a frozen reason names an op without a rule


@dataclass
class UnknownOp:
    node: str
    target: str
    touched_channels: bool


class RuleContext:
    def __init__(self, gm: fx.GraphModule, ch: ChannelIds) -> None:
        self.gm = gm
        self.ch = ch
        self.node: fx.Node | None = None
        self._param_labels: dict[str, Labels] = {}

    # --- what rules read ---
    def labels(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            return x.meta.get(meta.LABELS, ())
        if isinstance(x, ParamRef):
            if x.name not in self._param_labels:
                self._param_labels[x.name] = param_labels(self.ch, x.name, x.shape)
            return self._param_labels[x.name]
        return ()

    def shape(self, x: Any) -> tuple[int, ...] | None:
        if isinstance(x, ParamRef):
            return x.shape
        if isinstance(x, fx.Node):
            value = x.meta.get(meta.VALUE)
            if isinstance(value, TensorValue):
                return value.shape
        return None

    def is_const(self, x: Any) -> bool:
        if isinstance(x, ParamRef):
            return True
        if isinstance(x, fx.Node):
            return bool(x.meta.get(meta.CONST, False))
        return True

    @property
    def out(self) -> TensorValue:
        return self.node.meta[meta.VALUE]

    def describe(self, x: Any) -> str:
        if isinstance(x, ParamRef):
            return f"'{x.name}'"
        if isinstance(x, fx.Node):
            return f"node '{x.name}'"
        return repr(x)

    # --- what rules write ---
    def freeze(self, ids: torch.Tensor, why: str) -> None:
        self.ch.freeze(ids, f"{self.node.name}: {why}")

    def whole(self, rows: torch.Tensor, why: str) -> None:
        self.ch.whole(rows, f"{self.node.name}: {why}")

    def stream_norm(self, rows: torch.Tensor, why: str) -> None:
        """Rows normalised together by this node, a norm over a residual stream (``ChannelIds.stream_norm``)."""
        self.ch.stream_norm(rows, f"{self.node.name}: {why}")
        self.node.meta[meta.STREAM_NORM] = True

    def freeze_labels(self, labels: Any, why: str) -> bool:
        """Freeze every block in (possibly nested) labels; True if there was any."""
        found = False
        if isinstance(labels, Block):
            self.freeze(labels.ids, why)
            return True
        if isinstance(labels, (list, tuple)):
            for item in labels:
                found |= self.freeze_labels(item, why)
        return found


def _input_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _mark_const(node: fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        return False
    # only tensors count: a constant reshaped with sizes read from the input's shape is still a constant
    tensors = [i for i in _input_nodes(node) if _holds_tensor(i.meta.get(meta.VALUE))]
    return all(i.meta.get(meta.CONST, False) for i in tensors)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, TensorValue):
        return True
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return any(_holds_tensor(v) for v in value)
    return False


def _tensor_labels_of_args(ctx: RuleContext, node: fx.Node) -> list[Any]:
    return [ctx.labels(i) for i in _input_nodes(node)]


def _empty_like(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return [_empty_like(v) for v in value]
    return () if isinstance(value, TensorValue) else None


def propagate(captured: Captured) -> tuple[ChannelIds, list[UnknownOp]]:
    """Label every node with its channel blocks; return the couplings and the ops without rules."""
    gm = captured.gm
    ch = ChannelIds()
    ctx = RuleContext(gm, ch)
    unknown: list[UnknownOp] = []
    for node in gm.graph.nodes:
        ctx.node = node
        node.meta[meta.CONST] = _mark_const(node)
        value = node.meta.get(meta.VALUE)
        if node.op == "placeholder":
            node.meta[meta.LABELS] = _empty_like(value)
            continue
        if node.op == "get_attr":
            shape = value.shape if isinstance(value, TensorValue) else None
            node.meta[meta.LABELS] = param_labels(ch, str(node.target), shape) if shape is not None else None
            continue
        if node.op == "output":
            ctx.freeze_labels(_tensor_labels_of_args(ctx, node), "reaches the model output")
            continue
        call = normalize(node, gm)
        node.meta[meta.OP] = call
        if value is not None and not isinstance(value, TensorValue) and not _holds_tensor(value):
            node.meta[meta.LABELS] = None  # python scalars, sizes, dtypes: no channels
            continue
        spec = spec_of(call)
        rule = spec.rule if spec is not None else None
        if rule is None and value is None:  # produced no tensor (e.g. a helper returning no mask)
            node.meta[meta.LABELS] = None
            continue
        if rule is None:
            touched = ctx.freeze_labels(_tensor_labels_of_args(ctx, node),
                                        f"{UNKNOWN_OP} {_target_name(node)}; channels through it are kept")
            unknown.append(UnknownOp(node.name, _target_name(node), touched))
            node.meta[meta.LABELS] = _empty_like(value)
            continue
        labels = rule(ctx, call)
        node.meta[meta.LABELS] = labels
        if not node.meta[meta.CONST]:
            _mark_active(ch, labels)
    return ch, unknown


def _mark_active(ch: ChannelIds, labels: Any) -> None:
    if isinstance(labels, Block):
        ch.mark_active(labels.ids)
    elif isinstance(labels, (list, tuple)):
        for item in labels:
            _mark_active(ch, item)


def _target_name(node: fx.Node) -> str:
    if node.op == "call_module":
        gm = node.graph.owning_module
        name = f"module '{node.target}' ({type(gm.get_submodule(str(node.target))).__name__})"
        why_opaque = gm.meta.get(meta.KEPT_LEAVES, {}).get(str(node.target))
        return f"{name}, a timm leaf kept opaque because {why_opaque}" if why_opaque else name
    target = node.target
    if node.op == "call_method":
        return f"method Tensor.{target}"
    name = getattr(target, "__name__", None) or str(target)
    for namespace, prefix in ((torch, "torch."), (torch.nn.functional, "torch.nn.functional.")):
        if getattr(namespace, name, None) is target:
            return f"function {prefix}{name}"
    module = getattr(target, "__module__", None)
    return f"function {module + '.' if module else ''}{getattr(target, '__qualname__', name)}"
