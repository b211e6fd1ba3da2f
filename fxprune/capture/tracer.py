"""A torch.fx tracer that honours timm's registries of modules and functions not to trace into.

timm marks modules "notrace" when *its* feature extraction cannot trace them; many of them trace fine
(``BatchNormAct2d``, ``TinyVitBlock``, ``MobileVitBlock``) and keeping them opaque would freeze every channel
through them. So a timm leaf is kept opaque only when fxprune has a rule for the module itself (the rule
reads it whole) or when it cannot be traced; every other one is traced into ("opened").
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx


def _timm_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional for non-timm models
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


def has_module_rule(module: torch.nn.Module) -> bool:
    """Whether a registered op reads ``module`` whole (a module spelling of an op, see rules/registry.py)."""
    from ..analysis.rules import registry  # the package import registers the built-in ops

    return registry.module_entry(module) is not None


class LeafAwareTracer(fx.Tracer):
    """Symbolic tracer that keeps timm's leaf modules opaque where it must and remembers which module it is in.

    ``closed``: paths of modules to keep opaque whatever they are (capture closes an opened leaf whose trace
    failed in context). ``opened``: paths of timm leaves this trace went into; ``kept``: path -> why a timm
    leaf stayed opaque. The module stack lets a failed trace name the innermost module being traced.
    """

    def __init__(self, extra_leaf_modules: tuple[type, ...] = (), closed: frozenset[str] | set[str] = frozenset(),
                 _probe_cache: dict | None = None) -> None:
        leaf_modules, leaf_functions = _timm_leaves()
        super().__init__(autowrap_functions=leaf_functions)
        self._timm_leaf_modules = leaf_modules
        self._extra_leaf_modules = tuple(extra_leaf_modules)
        self.closed = set(closed)
        self.opened: list[str] = []
        self.kept: dict[str, str] = {}
        self.scope_stack: list[str] = []
        self._probe_cache = {} if _probe_cache is None else _probe_cache  # id(module) -> None (traceable) or why not

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._extra_leaf_modules) or module_qualified_name in self.closed:
            return True
        if isinstance(m, self._timm_leaf_modules):
            if has_module_rule(m):
                return True
            why = self._probe(m)
            if why is None:
                if module_qualified_name not in self.opened:
                    self.opened.append(module_qualified_name)
                return False
            self.kept[module_qualified_name] = why
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def _probe(self, m: torch.nn.Module) -> str | None:
        """None when ``m`` traces on its own (with the same leaf policy inside it), else why it does not."""
        key = id(m)
        if key not in self._probe_cache:
            self._probe_cache[key] = "probing"  # a module reached again while probing itself stays a leaf
            try:
                LeafAwareTracer(self._extra_leaf_modules, _probe_cache=self._probe_cache).trace(m)
                self._probe_cache[key] = None
            except Exception as exc:  # noqa: BLE001 - fx raises many exception types; all mean "not traceable"
                self._probe_cache[key] = f"torch.fx cannot trace it: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return self._probe_cache[key]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """A parameter's ``get_attr`` proxy, its name looked up by identity. fx's own ``getattr`` searches
        ``root.named_parameters()`` from the start on every parameter read: quadratic in depth (more than
        a tenth of the prune call at depth 48)."""
        if isinstance(attr_val, torch.nn.Parameter) and not self.param_shapes_constant:
            name = self._parameter_names().get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _parameter_names(self) -> dict[int, str]:
        """id -> the first name ``root.named_parameters()`` gives each parameter (as fx's search finds)."""
        if getattr(self, "_names_root", None) is not self.root:
            self._names_root, self._names = self.root, {}
            for name, p in self.root.named_parameters():
                self._names.setdefault(id(p), name)
        return self._names

    def call_module(self, m: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:  # a module built inside forward (e.g. `nn.ReLU()(x)`): it has no name; trace through it
            return forward(*args, **kwargs)
        self.scope_stack.append(path)
        result = super().call_module(m, forward, args, kwargs)
        self.scope_stack.pop()
        return result
