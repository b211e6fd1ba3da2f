"""A torch.fx tracer that honours timm's registries of modules and functions not to trace into."""
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


class LeafAwareTracer(fx.Tracer):
    """Symbolic tracer that keeps timm's leaf modules opaque and remembers which module it is inside.

    The module stack lets a failed trace name the innermost module being traced.
    """

    def __init__(self, extra_leaf_modules: tuple[type, ...] = ()) -> None:
        leaf_modules, leaf_functions = _timm_leaves()
        super().__init__(autowrap_functions=leaf_functions)
        self._leaf_modules = leaf_modules + tuple(extra_leaf_modules)
        self.scope_stack: list[str] = []

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_modules):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:  # a module built inside forward (e.g. `nn.ReLU()(x)`): it has no name; trace through it
            return forward(*args, **kwargs)
        self.scope_stack.append(path)
        result = super().call_module(m, forward, args, kwargs)
        self.scope_stack.pop()
        return result
