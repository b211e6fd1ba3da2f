"""Calibration statistics: where the layers and attention products are, and running graphs to read them.

Compensation (``rewrite/compensate.py``) and the reconstruction criterion (``importance/reconstruction.py``)
both accumulate second moments of activations on calibration batches: of every Linear's inputs, and of every
attention product's queries and keys, head by head. This module finds those places in an analysed graph
(with the channel ids the analysis gave their operands) and runs graphs to hand their values over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.interpreter import Interpreter

from . import meta
from .analysis.labels import block_on
from .analysis.rules import ParamRef

# ridge of the least-squares solves, relative to the mean diagonal of the Gram: keeps near-collinear inputs stable
RIDGE = 1e-3
# ... raised to RIDGE_PER_FEATURE x features / rows where calibration data are few for the features: a fit's
# variance grows with that ratio (with 966 token rows for 768 features, MiniLM's fc2 fitted the calibration
# batches and lost on held-out sentences)
RIDGE_PER_FEATURE = 0.3


def ridge_strength(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """The absolute ridge of a solve with this Gram: ``ridge`` times its mean diagonal (so ``ridge`` is relative)."""
    return ridge * gram.diagonal().mean().clamp_min(1e-12)


def relative_ridge(features: int, rows: int, ridge: float | None = None) -> float:
    """The ridge relative to the Gram's mean diagonal for ``features`` inputs fitted on ``rows`` rows; an explicit
    ``ridge`` is used as it is."""
    if ridge is not None:
        return float(ridge)
    return max(RIDGE, RIDGE_PER_FEATURE * features / max(rows, 1))


class Moments:
    """Running second moments of calibration rows, without storing them: for inputs X (features last) and
    outputs Y, ``XᵀX``, ``XᵀY`` and ``||Y||²``; with ``ones``, X is extended by a ones column, so the Gram also
    holds X's column sums and the row count, and the cross term Y's column sums.

    Cost and precision, batch by batch: the rows are gathered once into a buffer ``Z = [X | Y]`` (``columns``
    picks X's features) shifted by the first batch's means, so that large means do not swamp the float32
    products; one float32 product (float64 for float64 inputs) covers the Gram's block-rows from the diagonal
    rightwards only (the Gram is symmetric: three blocks compute about 2/3 of a full product) and the cross
    term, added in place into a running sum that goes into float64 every ``FLUSH`` batches. Column sums are
    pairwise sums. The unshifted moments are put back together in float64 when read."""

    BLOCK = 256  # Gram block-rows of about this many features: fewer products, each still large
    FLUSH = 8

    def __init__(self, ones: bool = False) -> None:
        self.ones = ones
        self.rows, self.width = 0, 0
        self._shift: torch.Tensor | None = None  # of Z's columns
        self._recent: torch.Tensor | None = None  # block-upper ZᵀZ[:width] since the last flush
        self._total: torch.Tensor | None = None  # float64
        self._sums: torch.Tensor | float = 0.0  # of Z's shifted columns, float64
        self._squares: torch.Tensor | float = 0.0  # of Y's shifted columns, float64
        self._pending = 0
        self._whole: tuple[torch.Tensor, torch.Tensor] | None = None  # what _unshifted made of the sums so far

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (only its ``columns`` features when given) and of ``y`` (the same rows)."""
        x = x.detach().reshape(-1, x.shape[-1])
        dtype = torch.promote_types(x.dtype, torch.float32)
        width = x.shape[1] if columns is None else len(columns)
        outs = 0 if y is None else y.shape[-1]
        z = torch.empty(x.shape[0], width + outs, dtype=dtype)
        if columns is None:
            z[:, :width].copy_(x)
        elif x.dtype == dtype:
            torch.index_select(x, 1, columns, out=z[:, :width])
        else:
            z[:, :width].copy_(x.index_select(1, columns))
        if y is not None:
            y = y.detach().reshape(-1, outs)
            z[:, width:].copy_(y)
        if self._recent is None:
            self.width = width
            self._shift = z.mean(0)
            self._recent = torch.zeros(width, width + outs, dtype=dtype)
        z.sub_(self._shift)
        for start, end in self._blocks():
            self._recent[start:end, start:].addmm_(z[:, start:end].T, z[:, start:])
        self._sums = self._sums + z.sum(0).double()
        if y is not None:  # Y's shifted squares, column by column: small numbers summed pairwise in float32
            self._squares = self._squares + z[:, width:].square().sum(0).double()
        self.rows += x.shape[0]
        self._pending += 1
        self._whole = None
        if self._pending == self.FLUSH:
            self._flush()

    def _blocks(self) -> list[tuple[int, int]]:
        count = max(1, round(self.width / self.BLOCK))
        edges = [round(i * self.width / count) for i in range(count + 1)]
        return list(zip(edges, edges[1:]))

    def _flush(self) -> None:
        if self._pending:
            recent = self._recent.to(torch.float64, copy=True)  # a copy even when already float64
            self._total = recent if self._total is None else self._total.add_(recent)
            self._recent.zero_()
            self._pending = 0

    def _unshifted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ZᵀZ[:width] (the Gram made whole from its upper blocks) and Zᵀ1 of the unshifted rows, float64."""
        self._flush()
        if self._total is None:
            raise ValueError("fxprune: no calibration rows were recorded")
        if self._whole is None:
            moments = self._total.clone()
            for start, end in self._blocks():  # the blocks left of the diagonal were never computed
                moments[end:, start:end] = moments[start:end, end:self.width].T
            shift, sums, w = self._shift.double(), self._sums, self.width
            # (Z_c + 1 sᵀ)ᵀ(Z_c + 1 sᵀ) = Z_cᵀZ_c + Z_cᵀ1 sᵀ + s (Z_cᵀ1 + n s)ᵀ, its first width rows
            moments.addr_(sums[:w], shift).addr_(shift[:w], sums + self.rows * shift)
            self._whole = moments, sums + self.rows * shift
        return self._whole

    @property
    def yy(self) -> float:
        """||Y||² (0 without outputs)."""
        shift, sums = self._shift.double()[self.width:], self._sums[self.width:]
        return float((self._squares + 2 * shift * sums + self.rows * shift.square()).sum())

    @property
    def gram(self) -> torch.Tensor:
        """XᵀX (float64, symmetric), with the ones column last when ``ones``."""
        moments, sums = self._unshifted()
        gram = moments[:, :self.width]
        if not self.ones:
            return gram
        corner = torch.tensor([[float(self.rows)]], dtype=torch.float64)
        return torch.cat([torch.cat([gram, sums[:self.width, None]], 1),
                          torch.cat([sums[None, :self.width], corner], 1)], 0)

    @property
    def cross(self) -> torch.Tensor:
        """XᵀY (float64), with Y's column sums as a last row when ``ones``."""
        moments, sums = self._unshifted()
        cross = moments[:, self.width:]
        return torch.cat([cross, sums[None, self.width:]], 0) if self.ones else cross


def tensor_name(x: Any) -> str | None:
    """The parameter or buffer a node argument names (a module's ParamRef or a get_attr node)."""
    if isinstance(x, ParamRef):
        return x.name
    if isinstance(x, fx.Node) and x.op == "get_attr":
        return str(x.target)
    return None


@dataclass
class LinearCall:
    """A Linear (or addmm: a weight stored [in, out]) by its node name, the same in a pruned copy."""

    node: str
    weight: str
    bias: str | None  # None: no bias
    in_dim: int  # the weight dim holding input features: 1 for Linear ([out, in]), 0 for addmm
    input_position: int  # where the input sits among the node's args


def linear_calls(analysis) -> list[LinearCall]:
    """Every Linear / addmm whose weight and bias are parameters (not computed in the graph), in graph order."""
    found = []
    for node in analysis.gm.graph.nodes:
        call = node.meta.get(meta.OP)
        if call is None or call.op not in ("linear", "addmm"):
            continue
        weight_arg, x_arg, in_dim = (call.args.get("weight"), call.args.get("input"), 1) if call.op == "linear" \
            else (call.args.get("mat2"), call.args.get("mat1"), 0)
        weight, bias = tensor_name(weight_arg), tensor_name(call.args.get("bias"))
        if weight is None or x_arg not in node.args or (call.args.get("bias") is not None and bias is None):
            continue
        found.append(LinearCall(node.name, weight, bias, in_dim, node.args.index(x_arg)))
    return found


# ops that re-lay a tensor out (views mostly): values pass through them unchanged, in another layout
LAYOUT_OPS = {"reshape", "permute", "transpose", "expand", "getitem", "select", "slice", "unbind", "split", "chunk"}
SAME_VALUE = {"contiguous", "clone", "to", "type_as", "float", "half", "bfloat16", "detach", "dropout", "alias",
               "_to_copy", "Dropout", "Identity"}


def base_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def linear_source(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The Linear/addmm node whose output reaches ``node`` through layout ops and scalar factors only."""
    while isinstance(node, fx.Node):
        call = node.meta.get(meta.OP)
        if call is None:
            return None
        if call.op in ("linear", "addmm"):
            return node
        if call.op in LAYOUT_OPS or (call.op == "unary" and base_name(gm, node) in SAME_VALUE):
            node = call.args.get("input")
        elif call.op == "elementwise" and base_name(gm, node) in ("mul", "truediv", "div") \
                and len(call.args["operands"]) == 2 and isinstance(call.args["operands"][0], fx.Node) \
                and isinstance(call.args["operands"][1], (int, float)):
            node = call.args["operands"][0]
        else:
            return None
    return None


@dataclass
class Operand:
    """One side of an attention product: where it sits among the node's args and its channel ids per head."""

    position: int
    ids: torch.Tensor  # (rows, channels): one row per head position of the product
    row_dims: list[int]
    channel_dim: int

    def rows(self, value: torch.Tensor) -> torch.Tensor:
        """The operand's value as (rows, positions, channels), rows in the order of ``ids``."""
        order = self.row_dims + [d for d in range(value.ndim) if d not in self.row_dims and d != self.channel_dim]
        return value.permute(order + [self.channel_dim]).reshape(self.ids.shape[0], -1, value.shape[self.channel_dim])


@dataclass
class Product:
    """An attention product q·kᵀ (matmul or SDPA) between two activations with channel ids."""

    node: str
    query: Operand
    key: Operand
    key_source: str | None  # the Linear node k comes from through layout ops only (None: another path)


def operand(node: fx.Node, x: Any, channel_dim_from_end: int) -> Operand | None:
    value = x.meta.get(meta.VALUE) if isinstance(x, fx.Node) else None
    ndim = getattr(value, "ndim", 0)
    if ndim < 2 or x.meta.get(meta.CONST) or x not in node.args:
        return None
    block = block_on(x.meta.get(meta.LABELS) or (), ndim - channel_dim_from_end)
    if block is None:
        return None
    ids = block.ids.reshape((1,) * (ndim - block.ids.ndim) + tuple(block.ids.shape))
    row_dims = [d for d in range(ndim) if d != block.dim and ids.shape[d] > 1]
    order = row_dims + [d for d in range(ndim) if d not in row_dims and d != block.dim] + [block.dim]
    return Operand(node.args.index(x), ids.permute(order).reshape(-1, ids.shape[block.dim]), row_dims, block.dim)


def attention_products(analysis) -> list[Product]:
    """Every q·kᵀ of the analysed graph whose operands both carry channel ids."""
    found = []
    for node in analysis.gm.graph.nodes:
        call = node.meta.get(meta.OP)
        if call is None or call.op not in ("matmul", "sdpa"):
            continue
        q, k = (call.args.get("query"), call.args.get("key")) if call.op == "sdpa" \
            else (call.args.get("input"), call.args.get("other"))
        query, key = operand(node, q, 1), operand(node, k, 1 if call.op == "sdpa" else 2)
        if query is None or key is None:
            continue
        source = linear_source(analysis.gm, k)
        found.append(Product(node.name, query, key, source.name if source is not None else None))
    return found


def _watched(gm: fx.GraphModule, callbacks: dict[str, Callable[[tuple, Any], None]]) -> fx.GraphModule:
    """A copy of ``gm`` whose code calls ``callbacks[name](args, output)`` right after node ``name`` (the
    generated code runs at plain forward speed, where an Interpreter costs Python work per node)."""
    graph = fx.Graph()
    graph.set_codegen(gm.graph._codegen)  # exported graphs take and return pytrees
    copies: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        copies[node] = graph.node_copy(node, lambda n: copies[n])
        callback = callbacks.get(node.name)
        if callback is not None:
            graph.call_function(callback, (copies[node].args, copies[node]))
    return fx.GraphModule(gm, graph)


def watch(gm: fx.GraphModule, batches: Iterable[tuple], callbacks: dict[str, Callable[[tuple, Any], None]]) -> None:
    """Run ``gm`` on every batch; after each named node runs, call its callback with (args, output)."""
    if callbacks:
        watched = _watched(gm, callbacks)
        with torch.no_grad():
            for batch in batches:
                watched(*batch)


class Runner(Interpreter):
    """Runs a graph on one batch a stretch at a time, so that later stretches resume where earlier ones stopped."""

    def __init__(self, gm: fx.GraphModule, batch: tuple,
                 callbacks: dict[str, Callable[[tuple, Any], None]] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.nodes, self.position = list(gm.graph.nodes), 0
        self.args_iter = iter(batch)
        self.callbacks = callbacks or {}  # as ``watch``'s: called with (args, output) after the node runs

    def run_until(self, name: str, inclusive: bool) -> Any:
        """Run the nodes before ``name`` (and ``name`` too when ``inclusive``); the args of ``name`` (or its output).

        Parameters are read as each node runs, so what changed since the last stretch counts from here on."""
        with torch.no_grad():
            while self.position < len(self.nodes):
                node = self.nodes[self.position]
                if node.name == name and not inclusive:
                    return tuple(self.env[a] if isinstance(a, fx.Node) else a for a in node.args)
                self.position += 1
                self.env[node] = self.run_node(node)
                callback = self.callbacks.get(node.name)
                if callback is not None:
                    callback(tuple(self.env[a] if isinstance(a, fx.Node) else a for a in node.args), self.env[node])
                for dead in self.user_to_last_uses.get(node, []):
                    del self.env[dead]
                if node.name == name:
                    return self.env[node]
        raise KeyError(name)

    def run_to_end(self) -> None:
        """Run what is left of the graph (for the callbacks)."""
        with torch.no_grad():
            while self.position < len(self.nodes) and self.nodes[self.position].op != "output":
                self.run_until(self.nodes[self.position].name, inclusive=True)

    def refresh(self, targets: set[str]) -> None:
        """Re-read parameters replaced since they were fetched (an exported graph fetches them all up front)."""
        for node in list(self.env):
            if node.op == "get_attr" and str(node.target) in targets:
                self.env[node] = self.fetch_attr(str(node.target))
