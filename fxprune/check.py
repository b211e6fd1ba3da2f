"""Self-check: before fxprune returns a pruned module, it runs it and compares it with the masked original.

The contract is masked equivalence: the pruned module computes what the original computes with the removed
channels' weights zeroed. ``check_pruned`` runs both on the example inputs and on a batch of another size
(so a size baked into the graph is caught), against the weight-masked original and, where zeroed weights are
not what removal computes (FLatten's ReLU(x) + ε), the activation-masked one. On a mismatch it names the
first graph node whose kept channels differ, and raises ``RewriteError`` instead of returning a wrong model.
The weight-masked original zeroes most weights through activation masks rather than copies
(``masked_reference.py``): the check costs two forward passes, not a copy of the model's weights besides.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.interpreter import Interpreter
from torch.utils._pytree import tree_leaves

from . import meta
from .capture import paused_gc
from .errors import CaptureError, RewriteError
from .masked_reference import WeightMasked, weight_masked
from .verify import relative_error, zeroed_activations


@dataclass
class CheckResult:
    """What the self-check compared: the largest relative error, at which batch sizes, against which reference."""

    error: float
    batch_sizes: list[int]
    reference: str  # "weights" (zeroed weights) or "activations" (zeroed activations)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # wall time the check took (what verify=False saves)


def tolerance(gm: torch.nn.Module) -> float:
    """Relative error allowed: float32 rounding of reordered sums, looser for half precision."""
    dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), torch.float32)
    return 1e-4 if torch.finfo(dtype).bits >= 32 else 3e-2


def check_pruned(analysis, removed: torch.Tensor, pruned: fx.GraphModule) -> CheckResult:
    """Compare ``pruned`` with the masked original; raise ``RewriteError`` on a mismatch.

    The pruned module runs once, on the example batch grown by one item (another batch size); its leading
    rows must equal the weight-masked original's on the example batch. Where they do not, the original runs
    at the grown batch too (a model mixing batch items), then the activation-masked original (where zeroed
    weights are not what removal computes). Where the captured original itself cannot run at another
    batch size, only the example batch is checked.
    """
    with paused_gc():
        return _check_pruned(analysis, removed, pruned)


def _check_pruned(analysis, removed: torch.Tensor, pruned: fx.GraphModule) -> CheckResult:
    started = time.perf_counter()
    tol = tolerance(pruned)
    example = tuple(analysis.captured.example_inputs)
    grown = _other_batch(example)
    masked = weight_masked(analysis, removed)
    notes: list[str] = []
    with torch.no_grad():
        actual, inputs = _run_grown(analysis, masked, pruned, example, grown, notes)
        expected = _outputs(analysis.gm, example, masked)
        error, reference = _error(_leading(actual, expected), expected), "weights"
        if error > tol and inputs is not example:  # batch items may interact: compare at the grown batch
            error = _error(actual, _outputs(analysis.gm, inputs, masked))
        if error > tol:  # zeroed weights may differ from removal (e.g. ReLU(x) + ε): zeroed activations do not
            reference = "activations"
            expected = _outputs(zeroed_activations(analysis, removed), example)  # masks fit the example batch
            error = _error(_leading(actual, expected), expected)
    if error > tol:
        where = first_divergence(analysis, removed, pruned, example, tol)
        raise RewriteError(f"fxprune: the pruned model differs from the masked original (relative error {error:.2e} "
                           f"> {tol:.0e}); {where}. This is a bug in fxprune: please report it with the model.")
    return CheckResult(error, sorted({_batch_size(example), _batch_size(inputs)}), reference, notes,
                       time.perf_counter() - started)


def _run_grown(analysis, masked: WeightMasked, pruned: fx.GraphModule, example: tuple, grown: tuple | None,
               notes: list[str]) -> tuple[Outputs, tuple]:
    """The pruned module's outputs at the grown batch (and that batch), or at the example batch where the
    captured original cannot change its batch size either (a note says so)."""
    if grown is None:
        return _run_pruned(pruned, example, analysis), example
    try:
        return _outputs(pruned, grown), grown
    except Exception as exc:  # noqa: BLE001 - decided below: the original's failure or the rewrite's
        try:
            _outputs(analysis.gm, grown, masked)
        except Exception as original_exc:  # noqa: BLE001 - the original cannot run there either
            notes.append(f"checked at the example batch size only: the captured original does not run at batch "
                         f"{_batch_size(grown)} ({type(original_exc).__name__}: {str(original_exc).splitlines()[0][:120]})")
            return _run_pruned(pruned, example, analysis), example
        raise _unrunnable(grown, exc) from exc


def _leading(actual: Outputs, expected: Outputs) -> Outputs:
    """``actual`` cut to the leading rows of ``expected``'s sizes (the example's items in a grown batch)."""
    def cut(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return a[: e.shape[0]] if a.ndim == e.ndim and a.ndim and a.shape[1:] == e.shape[1:] else a

    return ([cut(a, e) for a, e in zip(actual[0], expected[0])] + actual[0][len(expected[0]):],
            [cut(a, e) for a, e in zip(actual[1], expected[1])] + actual[1][len(expected[1]):])


def _other_batch(inputs: tuple) -> tuple | None:
    """The example inputs with one more item in the batch: fresh values for floats, shifted tokens for ints."""
    generator = torch.Generator().manual_seed(7)
    out, grown = [], False
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[0] >= 1:
            first = x[:1]
            if x.is_floating_point():
                extra = torch.randn(first.shape, generator=generator, dtype=x.dtype) * x.std().nan_to_num(1.0) + x.mean()
            else:
                extra = first.roll(1, dims=-1) if first.ndim >= 2 else first
            out.append(torch.cat([x, extra]))
            grown = True
        else:
            out.append(x)
    return tuple(out) if grown else None


def _batch_size(inputs: tuple) -> int:
    return next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.ndim >= 1), 1)


_WATCHED = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


Outputs = tuple[list[torch.Tensor], list[torch.Tensor]]  # the model's outputs, the norms' outputs


def _outputs(gm: fx.GraphModule, inputs: tuple, masked: WeightMasked | None = None) -> Outputs:
    """The model's floating outputs, then the outputs of its norm modules in call order: the residual stream
    the norms read keeps its width, so they must match too (and they still differ where a zero-initialised
    classifier hides a wrong model). With ``masked``, the weight-masked ``gm``."""
    watched: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: watched.append(out))
               for m in gm.modules() if isinstance(m, _WATCHED)]
    try:
        result = gm(*inputs) if masked is None else masked.run(gm, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [t for t in tree_leaves(result) if isinstance(t, torch.Tensor) and t.is_floating_point()], watched


def _run_pruned(pruned: fx.GraphModule, inputs: tuple, analysis) -> Outputs:
    try:
        return _outputs(pruned, inputs)
    except Exception as exc:  # noqa: BLE001 - a pruned model that cannot run must never be returned
        try:
            analysis.gm(*inputs)
        except Exception as original_exc:  # noqa: BLE001 - the example inputs are at fault, not the rewrite
            raise CaptureError(  # capture records an exported graph's shapes on fake tensors: this is the first run
                f"fxprune: running the captured model on the example inputs failed: "
                f"{type(original_exc).__name__}: {str(original_exc).splitlines()[0] if str(original_exc) else ''}. "
                "Check that example_inputs are inputs the model accepts (shapes, token ids within the vocabulary)."
            ) from original_exc
        raise _unrunnable(inputs, exc) from exc


def _unrunnable(inputs: tuple, exc: Exception) -> RewriteError:
    return RewriteError(f"fxprune: the pruned model fails at batch size {_batch_size(inputs)} where the original "
                        f"runs: {type(exc).__name__}: {str(exc).splitlines()[0]}. This is a bug in fxprune: "
                        "please report it with the model.")


def _error(actual: Outputs, expected: Outputs) -> float:
    """Largest relative error: the model's outputs must match in number and shape; norms match where their
    width was kept (a norm over a pruned width is compared through what it feeds)."""
    (outputs, norms), (expected_outputs, expected_norms) = actual, expected
    if len(outputs) != len(expected_outputs) or any(a.shape != e.shape for a, e in zip(outputs, expected_outputs)):
        return float("inf")
    pairs = list(zip(outputs, expected_outputs))
    if len(norms) == len(expected_norms):
        pairs += [(a, e) for a, e in zip(norms, expected_norms) if a.shape == e.shape]
    return max((_relative(a, e) for a, e in pairs), default=0.0)


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return relative_error(actual.double(), expected.double())


class _Recorder(Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def first_divergence(analysis, removed: torch.Tensor, pruned: fx.GraphModule, inputs: tuple, tol: float) -> str:
    """Where the pruned graph first departs from the activation-masked original, on the kept channels."""
    reference, actual = _Recorder(zeroed_activations(analysis, removed)), _Recorder(pruned)
    with torch.no_grad():
        reference.run(*inputs)
        actual.run(*inputs)
    labels = {n.name: n.meta.get(meta.LABELS) for n in analysis.gm.graph.nodes}
    for node in pruned.graph.nodes:
        got, want = actual.values.get(node.name), reference.values.get(node.name)
        if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and want.is_floating_point()):
            continue
        keep = torch.ones((1,) * want.ndim, dtype=torch.bool)
        for block in labels.get(node.name) or ():
            keep = keep & ~removed[analysis.atoms.atom_of[block.ids]]
        try:
            kept = want[keep.expand(want.shape)]
        except RuntimeError:
            continue
        if kept.numel() != got.numel():
            return f"first diverging node '{node.name}' ({node.format_node()}): shape {tuple(got.shape)}, " \
                   f"but the original keeps {kept.numel()} values there"
        if _relative(got.flatten(), kept) > tol:
            return f"first diverging node '{node.name}' ({node.format_node()})"
    return "no single node diverges on the example inputs"

