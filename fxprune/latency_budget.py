"""Latency budgets: a pruned model's time, estimated from the original's node timings without building it.

``profile`` times every node of the captured graph on the example inputs, on the device the model lives on
(the median of several runs after a warm-up; CUDA is synchronised around each node). ``estimate`` scales each
node's time by the share of its work a plan leaves: MACs for ops that declare them (Linear, matmul,
convolution, attention), output elements for every other op that computes (norms, activations, softmax,
adds). Ops that only re-lay a tensor out (views, permutes, getitem) and nodes without a tensor shape keep
their time; nodes of residual branches removed whole lose it. Each node's time per MAC (or per element) is
thus taken as fixed: window attention's small batched products keep costing more per MAC than a large
Linear, which a MACs budget cannot see. It is a first-order model: kernels change speed with their sizes
(see ``benchmarks/latency_budget.py`` for estimate against measurement), and the Interpreter that times the
nodes adds a few microseconds to each, which only matters for very small inputs.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch
from torch.fx.interpreter import Interpreter

from . import meta
from .analysis.shapes import new_shapes
from .budget import node_macs
from .statistics import LAYOUT_OPS


class _NodeTimer(Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, synchronize: Callable[[], None]) -> None:
        super().__init__(gm)
        self.synchronize = synchronize
        self.times: dict[str, list[float]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        self.synchronize()
        started = time.perf_counter()
        result = super().run_node(n)
        self.synchronize()
        self.times.setdefault(n.name, []).append(time.perf_counter() - started)
        return result


def profile(analysis, repeats: int = 5, warmup: int = 2) -> dict[str, float]:
    """Seconds per node (median of ``repeats`` runs on the example inputs after ``warmup`` runs)."""
    tensors = [t for t in (*analysis.gm.parameters(), *analysis.captured.example_inputs) if isinstance(t, torch.Tensor)]
    cuda = any(t.is_cuda for t in tensors)
    timer = _NodeTimer(analysis.gm, torch.cuda.synchronize if cuda else (lambda: None))
    with torch.no_grad():
        for _ in range(warmup + repeats):
            timer.run(*analysis.captured.example_inputs)
    return {name: statistics.median(runs[warmup:]) for name, runs in timer.times.items()}


class Estimator:
    """The estimated seconds of one forward pass at the example inputs after a removal, from ``times``."""

    def __init__(self, analysis, times: dict[str, float]) -> None:
        self.analysis, self.times = analysis, times
        nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
        self.shapes = new_shapes(analysis.gm, analysis.atoms.atom_of, nothing)
        self.macs = node_macs(analysis, self.shapes)
        self.fixed = {node.name for node in analysis.gm.graph.nodes if _keeps_its_time(node)}

    def __call__(self, removed: torch.Tensor, dropped: frozenset[str] | set[str] = frozenset()) -> float:
        shapes = new_shapes(self.analysis.gm, self.analysis.atoms.atom_of, removed)
        macs = node_macs(self.analysis, shapes)
        total = 0.0
        for name, seconds in self.times.items():
            if name in dropped:
                continue
            if name in self.macs and self.macs[name] > 0:
                total += seconds * macs.get(name, 0) / self.macs[name]
            elif name not in self.fixed and isinstance(shapes.get(name), tuple) and math.prod(self.shapes[name]):
                total += seconds * math.prod(shapes[name]) / math.prod(self.shapes[name])
            else:
                total += seconds
        return total


def _keeps_its_time(node: torch.fx.Node) -> bool:
    call = node.meta.get(meta.OP)
    return call is None or call.op in LAYOUT_OPS
