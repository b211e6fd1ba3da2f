"""The op registry: one registration per op, holding everything fxprune knows about it.

An op is what a graph node *does*, whatever its spelling: ``F.linear``, ``nn.Linear`` modules and
``aten.linear`` are all the op "linear". ``register_op`` records, in one place,

- its spellings: fx functions, ``Tensor`` method names, ATen overloads (graphs from ``torch.export``) and
  module classes (with a function reading the module's arguments);
- its signature: argument names, so a rule reads ``call.args["weight"]`` whatever the spelling;
- its rule: how channel ids flow through it (the rule contract is in ``rules/__init__.py``);
- what later stages need: ``macs`` (its multiply-accumulates at the new shapes, for budgets),
  ``produces_channels`` (its output holds fresh channels, e.g. a Linear's: soft gates go there) and
  ``resize`` (how to rewrite the sizes it bakes into the graph when its output shrinks).

``normalize(node, root)`` turns a node into an ``OpCall`` through these tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch.fx as fx
import torch.nn as nn

from ...errors import InvalidArgumentError


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer a module uses directly (not through a get_attr node)."""

    name: str
    shape: tuple[int, ...]


@dataclass
class OpCall:
    """A node seen as an op: its registered name and its arguments by name."""

    op: str
    node: fx.Node
    args: dict[str, Any] = field(default_factory=dict)


Rule = Callable[[Any, OpCall], Any]  # (RuleContext, call) -> the output's labels
# (module, ref) -> the call's arguments other than "input"; ref(attr) names one of the module's tensors
ModuleArgs = Callable[[nn.Module, Callable[[str], "ParamRef | None"]], dict]
# (call, new shape of the output, new shape of any argument) -> multiply-accumulates
Macs = Callable[[OpCall, tuple, Callable[[Any], "tuple | None"]], int]
# (node in the graph being rewritten, call, old output shape(s), new output shape(s)) -> None
Resize = Callable[[fx.Node, OpCall, Any, Any], None]
# (node, args, kwargs) -> arguments by name, or None when this spelling is not this op here
Binder = Callable[[fx.Node, tuple, dict], "dict | None"]


@dataclass
class OpSpec:
    name: str
    signature: tuple[str, ...]
    rule: Rule
    macs: Macs | None = None
    produces_channels: bool = False
    resize: Resize | None = None
    bind: Binder | None = None


OPS: dict[str, OpSpec] = {}
FUNCTIONS: dict[Any, str] = {}  # fx function or ATen overload -> op name
METHODS: dict[str, str] = {}  # Tensor method name -> op name
MODULES: dict[type, tuple[str, ModuleArgs]] = {}  # module class -> (op name, argument reader)


def register_op(name: str, signature: Iterable[str], *, functions: Iterable[Any] = (), methods: Iterable[str] = (),
                aten: Iterable[Any] = (), modules: Mapping[type, ModuleArgs] | None = None, macs: Macs | None = None,
                produces_channels: bool = False, resize: Resize | None = None, bind: Binder | None = None,
                replace: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: register the decorated rule as op ``name`` with all its spellings and properties.

    ``signature``: argument names in positional order; ``"*name"`` collects the remaining positional
    arguments into a list. A keyword argument named like a parameter fills it; other keywords join the
    ``*`` collector if there is one. ``modules``: module class -> function ``(module, ref)`` returning the
    call's arguments besides ``input``; a subclass that overrides ``forward`` is not matched. Spellings that
    another op already owns are an error unless ``replace=True``.

    Example (an op that scales its input by a constant and keeps its channels)::

        @register_op("my_scale", ("input", "factor"), functions=[my_scale])
        def rule_my_scale(ctx, call):
            return ctx.labels(call.args["input"])
    """
    signature = tuple(signature)

    def decorate(rule: Rule) -> Rule:
        claims = [(FUNCTIONS, key) for key in [*functions, *aten]] + [(METHODS, key) for key in methods]
        if not replace:  # check every spelling before registering any: a refused op leaves no trace
            if name in OPS:
                raise InvalidArgumentError(f"fxprune: op '{name}' is already registered (pass replace=True to override)")
            for table, key in claims:
                if table.get(key, name) != name:
                    raise InvalidArgumentError(
                        f"fxprune: {getattr(key, '__name__', key)!s} is already spelled as op '{table[key]}'")
            for cls in modules or {}:
                if MODULES.get(cls, (name,))[0] != name:
                    raise InvalidArgumentError(f"fxprune: module {cls.__name__} is already op '{MODULES[cls][0]}'")
        OPS[name] = OpSpec(name, signature, rule, macs, produces_channels, resize, bind)
        for table, key in claims:
            table[key] = name
        MODULES.update({cls: (name, reader) for cls, reader in (modules or {}).items()})
        return rule

    return decorate


def spec_of(call: OpCall | None) -> OpSpec | None:
    return None if call is None else OPS.get(call.op)


def _bind(spec: OpSpec, node: fx.Node, args: tuple, kwargs: dict) -> OpCall:
    bound: dict[str, Any] = {}
    star = None
    for i, name in enumerate(spec.signature):
        if name.startswith("*"):
            star = name[1:]
            rest = list(args[i:])
            if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
                rest = list(rest[0])
            bound[star] = rest
            break
        if i < len(args):
            bound[name] = args[i]
    for key, value in kwargs.items():
        key = "input" if key == "self" else key
        bound[key] = list(value) if key == star and isinstance(value, (list, tuple)) else value
    return OpCall(spec.name, node, bound)


def module_entry(module: nn.Module) -> tuple[str, ModuleArgs] | None:
    """(op name, argument reader) of the op that reads ``module`` whole, or None. A subclass that overrides
    ``forward`` computes something else and is no such op."""
    for cls in type(module).__mro__:
        if cls in MODULES:
            return MODULES[cls] if type(module).forward is cls.forward else None
    return None


def _module_call(node: fx.Node, module: nn.Module) -> OpCall | None:
    entry = module_entry(module)
    if entry is None:
        return None
    name, reader = entry
    path = str(node.target)

    def ref(attr: str) -> ParamRef | None:
        tensor = getattr(module, attr, None)
        return None if tensor is None else ParamRef(f"{path}.{attr}", tuple(tensor.shape))

    x = node.args[0] if node.args else node.kwargs.get("input")
    return OpCall(name, node, {"input": x, **reader(module, ref)})


def normalize(node: fx.Node, root: nn.Module) -> OpCall | None:
    """The OpCall for ``node``, or None when no registered op does what it does."""
    if node.op == "call_module":
        return _module_call(node, root.get_submodule(str(node.target)))
    if node.op == "call_function":
        try:
            name = FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable callable
            name = None
    elif node.op == "call_method":
        name = METHODS.get(str(node.target))
    else:
        return None
    spec = OPS.get(name) if name is not None else None
    if spec is None:
        return None
    if spec.bind is not None:
        bound = spec.bind(node, node.args, dict(node.kwargs))
        return None if bound is None else OpCall(spec.name, node, bound)
    return _bind(spec, node, node.args, dict(node.kwargs))
