"""The op rules: how channel ids flow through each op, and which channels each op couples.

One file per family of ops; every op is one ``register_op`` call (``registry.py``) naming its spellings,
its signature, its rule and what budgets and the rewrite need of it.

The rule contract. A rule receives the ``RuleContext`` (``analysis/propagate.py``) and the normalised
``OpCall`` and returns the output's labels: a tuple of ``Block``s for a tensor, a list of those for a tuple
of tensors. It couples ids with ``ctx.ch.union``, freezes channels it cannot shrink consistently with
``ctx.freeze`` (saying why), marks sets that may only go as a whole with ``ctx.whole``, tags attention
roles with ``ctx.ch.tag`` and records head layouts with ``ctx.ch.record_rows`` / ``ctx.ch.record_heads``.

Masked equivalence is the contract: removing a channel must compute what the original computes with
that channel's weights zeroed. Ops that would see the zeros (normalisation or softmax over channels,
means over channels) only allow removing the whole normalised set (e.g. a whole head).

An op without a rule is not an error: every channel it touches is frozen, and ``analyze`` names it.
"""
from __future__ import annotations

from . import attention, elementwise, indexing, layout, linear, norms  # noqa: F401  (register the built-in ops)
from .registry import OPS, OpCall, OpSpec, ParamRef, normalize, register_op, spec_of

__all__ = ["OPS", "OpCall", "OpSpec", "ParamRef", "normalize", "register_op", "spec_of"]
