"""Normalise fx nodes into ``OpCall``s: what an op does, with named arguments.

Symbolic tracing spells one op many ways (``torch.add``, ``operator.add``, ``x.add``, ``nn.Linear``
modules, ``F.linear``). The rule table is keyed by what the op does, so each way needs one line here.
To teach fxprune a new op: map its spellings to an op name here and give that name a rule in
``rules.py``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer a module uses directly (not through a get_attr node)."""

    name: str
    shape: tuple[int, ...]


@dataclass
class OpCall:
    op: str
    node: fx.Node
    args: dict[str, Any] = field(default_factory=dict)


# op name -> argument names; "*name" collects the remaining positional arguments into a list
SIGNATURES: dict[str, tuple[str, ...]] = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "elementwise": ("*operands",),
    "unary": ("input",),
    "reshape": ("input", "*shape"),
    "permute": ("input", "*dims"),
    "transpose": ("input", "dim0", "dim1"),
    "matmul": ("input", "other"),
    "sdpa": ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
    "softmax": ("input", "dim"),
    "normalize": ("input", "p", "dim", "eps"),
    "sum": ("input", "dim", "keepdim"),
    "mean": ("input", "dim", "keepdim"),
    "amax": ("input", "dim", "keepdim"),
    "norm": ("input", "p", "dim", "keepdim"),
    "cat": ("tensors", "dim"),
    "stack": ("tensors", "dim"),
    "unbind": ("input", "dim"),
    "split": ("input", "split_size_or_sections", "dim"),
    "chunk": ("input", "chunks", "dim"),
    "getitem": ("input", "index"),
    "expand": ("input", "*sizes"),
    "shape_query": ("input", "*rest"),
    "like": ("input",),
    "pad": ("input", "pad", "mode", "value"),
    "roll": ("input", "shifts", "dims"),
    "select": ("input", "dim", "index"),
    "slice": ("input", "dim", "start", "end", "step"),
}

_ELEMENTWISE = ["add", "sub", "mul", "div", "truediv", "floordiv", "pow", "maximum", "minimum", "where",
                "rsub", "true_divide", "addcmul"]
_UNARY = ["relu", "gelu", "silu", "sigmoid", "tanh", "neg", "exp", "abs", "sqrt", "rsqrt", "log", "erf",
          "dropout", "contiguous", "clone", "float", "half", "bfloat16", "to", "type_as", "type", "detach",
          "softplus", "elu", "leaky_relu", "hardswish", "hardsigmoid", "mish", "relu6", "square", "sin", "cos",
          "clamp", "clamp_min", "clamp_max", "reciprocal", "sign", "gelu_tanh"]
# constants shaped like their input: their channels are free; the rewrite gives them explicit sizes
LIKE_CREATORS = {"zeros_like": "new_zeros", "ones_like": "new_ones", "empty_like": "new_empty"}
_RESHAPE = ["reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"]

FUNCTIONS: dict[Callable, str] = {
    F.linear: "linear",
    F.conv1d: "conv",
    F.conv2d: "conv",
    F.layer_norm: "layer_norm",
    F.batch_norm: "batch_norm",
    F.scaled_dot_product_attention: "sdpa",
    F.pad: "pad",
    torch.roll: "roll",
    F.softmax: "softmax",
    torch.softmax: "softmax",
    F.normalize: "normalize",
    torch.matmul: "matmul",
    torch.bmm: "matmul",
    operator.matmul: "matmul",
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.cat: "cat",
    torch.concat: "cat",
    torch.stack: "stack",
    torch.unbind: "unbind",
    torch.split: "split",
    torch.chunk: "chunk",
    operator.getitem: "getitem",
    torch.sum: "sum",
    torch.mean: "mean",
    torch.amax: "amax",
    torch.norm: "norm",
    torch.linalg.vector_norm: "norm",
    operator.add: "elementwise",
    operator.sub: "elementwise",
    operator.mul: "elementwise",
    operator.truediv: "elementwise",
    operator.neg: "unary",
    operator.pow: "elementwise",
    torch.where: "elementwise",
    F.dropout: "unary",
    F.gelu: "unary",
    F.relu: "unary",
    F.silu: "unary",
    F.softplus: "unary",
    F.hardswish: "unary",
    F.elu: "unary",
    F.leaky_relu: "unary",
    F.sigmoid: "unary",
    F.tanh: "unary",
    torch.flatten: "reshape",
    torch.reshape: "reshape",
    torch.squeeze: "reshape",
    torch.unsqueeze: "reshape",
}
# ATen spellings, for graphs captured with torch.export (the capture fallback): the same rules serve both
_aten = torch.ops.aten
ATEN: dict[Any, str] = {
    _aten.linear.default: "linear",
    _aten.conv1d.default: "conv",
    _aten.conv2d.default: "conv",
    _aten.layer_norm.default: "layer_norm",
    _aten.scaled_dot_product_attention.default: "sdpa",
    _aten.matmul.default: "matmul",
    _aten.bmm.default: "matmul",
    _aten.softmax.int: "softmax",
    _aten._softmax.default: "softmax",
    _aten.reshape.default: "reshape",
    _aten.view.default: "reshape",
    _aten.flatten.using_ints: "reshape",
    _aten.unflatten.int: "reshape",
    _aten.unsqueeze.default: "reshape",
    _aten.squeeze.dim: "reshape",
    _aten.permute.default: "permute",
    _aten.transpose.int: "transpose",
    _aten.t.default: "transpose",
    _aten.expand.default: "expand",
    _aten.cat.default: "cat",
    _aten.stack.default: "stack",
    _aten.unbind.int: "unbind",
    _aten.split.Tensor: "split",
    _aten.split_with_sizes.default: "split",
    _aten.chunk.default: "chunk",
    _aten.select.int: "select",
    _aten.slice.Tensor: "slice",
    _aten.sum.dim_IntList: "sum",
    _aten.mean.dim: "mean",
    _aten.amax.default: "amax",
    _aten.linalg_vector_norm.default: "norm",
    _aten.pad.default: "pad",
    _aten.constant_pad_nd.default: "pad",
    _aten.roll.default: "roll",
    _aten.zeros_like.default: "like",
    _aten.ones_like.default: "like",
    _aten.sym_size.int: "shape_query",
}
for _name in ("add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor", "add.Scalar", "mul.Scalar", "div.Scalar",
              "sub.Scalar", "pow.Tensor_Scalar", "maximum.default", "minimum.default", "where.self", "rsub.Scalar"):
    _packet, _overload = _name.split(".")
    ATEN[getattr(getattr(_aten, _packet), _overload)] = "elementwise"
for _name in ("gelu", "relu", "silu", "sigmoid", "tanh", "neg", "exp", "abs", "sqrt", "rsqrt", "dropout", "clone",
              "contiguous", "softplus", "hardswish", "erf", "reciprocal", "alias", "detach", "_to_copy", "clamp"):
    if hasattr(_aten, _name) and hasattr(getattr(_aten, _name), "default"):
        ATEN[getattr(_aten, _name).default] = "unary"
FUNCTIONS.update(ATEN)

try:  # timm's wrapped attention helpers (leaf functions for fx): scores + mask when a mask is given
    from timm.layers.attention import maybe_add_mask as _timm_maybe_add_mask

    FUNCTIONS[_timm_maybe_add_mask] = "elementwise"
except ImportError:  # pragma: no cover - timm is a dependency, but keep the table importable without it
    pass
try:  # torchvision's per-sample drop path: identity in eval, a per-sample scale in training
    from torchvision.ops.stochastic_depth import stochastic_depth as _tv_stochastic_depth

    FUNCTIONS[_tv_stochastic_depth] = "unary"
except ImportError:  # pragma: no cover
    pass
for _name in LIKE_CREATORS:
    FUNCTIONS[getattr(torch, _name)] = "like"
for _name in _ELEMENTWISE:
    if hasattr(torch, _name):
        FUNCTIONS.setdefault(getattr(torch, _name), "elementwise")
for _name in _UNARY:
    for _namespace in (torch, F):
        if hasattr(_namespace, _name):
            FUNCTIONS.setdefault(getattr(_namespace, _name), "unary")

METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "permute": "permute", "transpose": "transpose",
    "softmax": "softmax", "unbind": "unbind", "split": "split", "chunk": "chunk",
    "sum": "sum", "mean": "mean", "amax": "amax", "norm": "norm",
    "expand": "expand", "expand_as": "expand", "roll": "roll", "size": "shape_query", "dim": "shape_query",
    **{n: "elementwise" for n in _ELEMENTWISE},
    **{n: "unary" for n in _UNARY},
    **{n: "reshape" for n in _RESHAPE},
}

_UNARY_MODULES = (nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish,
                  nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Hardsigmoid)


def _bind(op: str, node: fx.Node, args: tuple, kwargs: dict) -> OpCall:
    names = SIGNATURES[op]
    bound: dict[str, Any] = {}
    for i, name in enumerate(names):
        if name.startswith("*"):
            rest = list(args[i:])
            if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
                rest = list(rest[0])
            bound[name[1:]] = rest
            break
        if i < len(args):
            bound[name] = args[i]
    for key, value in kwargs.items():
        if op == "elementwise":
            bound.setdefault("operands", []).append(value)
        else:
            bound["input" if key == "self" else key] = value
    return OpCall(op, node, bound)


def _module_call(node: fx.Node, module: nn.Module) -> OpCall | None:
    path = str(node.target)

    def ref(attr: str) -> ParamRef | None:
        tensor = getattr(module, attr, None)
        return None if tensor is None else ParamRef(f"{path}.{attr}", tuple(tensor.shape))

    x = node.args[0] if node.args else node.kwargs.get("input")
    if isinstance(module, nn.Linear):
        return OpCall("linear", node, {"input": x, "weight": ref("weight"), "bias": ref("bias")})
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward):
        return OpCall("conv", node, {"input": x, "weight": ref("weight"), "bias": ref("bias"), "groups": module.groups})
    if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        return OpCall("layer_norm", node, {"input": x, "normalized_shape": module.normalized_shape,
                                           "weight": ref("weight"), "bias": ref("bias")})
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and type(module).forward is nn.modules.batchnorm._BatchNorm.forward:
        return OpCall("batch_norm", node, {"input": x, "running_mean": ref("running_mean"),
                                           "running_var": ref("running_var"), "weight": ref("weight"), "bias": ref("bias")})
    if type(module) in _UNARY_MODULES:
        return OpCall("unary", node, {"input": x})
    if type(module) is nn.Softmax:
        return OpCall("softmax", node, {"input": x, "dim": module.dim})
    if type(module) is nn.Flatten:
        return OpCall("reshape", node, {"input": x, "shape": []})
    return None


def normalize(node: fx.Node, root: nn.Module) -> OpCall | None:
    """The OpCall for ``node``, or None when fxprune has no rule for what it does."""
    if node.op == "call_module":
        return _module_call(node, root.get_submodule(str(node.target)))
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
            return OpCall("shape_query", node, {"input": node.args[0]})
        op = FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    elif node.op == "call_method":
        op = METHODS.get(str(node.target))
    else:
        return None
    if op is None:
        return None
    return _bind(op, node, node.args, dict(node.kwargs))
