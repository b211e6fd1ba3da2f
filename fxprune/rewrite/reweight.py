"""Passes: reweight nodes that compensate removed channels, and folding them away for deployment.

After pruning, every Linear whose input lost channels (an attention's output projection, an MLP's fc2) gets
a per-channel scale and bias on its remaining inputs, ``x * scale + bias``, as plain graph nodes (so a
reweighted model can be analysed and pruned again). They are fitted by least squares so the layer
reproduces the unpruned layer's output on calibration data (the removed channels' mean contribution goes into
the bias, their correlation with kept channels into the scales), with a small ridge towards the identity. The
fit needs only statistics of the layer's inputs (accumulated over every calibration row, never the rows);
then they train like any parameter. ``fold_reweights`` merges them into the following Linear:
``W (x s + b) + c = (W diag(s)) x + (W b + c)``.
"""
from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..statistics import ridge_strength, tensor_name, watch
from .compensate import set_tensor

PREFIX = meta.REWEIGHT_PREFIX


def consumers(analysis, keep: dict[str, dict[int, torch.Tensor]]) -> list[tuple[str, str, torch.Tensor]]:
    """(node name, weight name, kept input indices) of every Linear whose input features shrink."""
    found = []
    for node in analysis.gm.graph.nodes:
        call = node.meta.get(meta.OP)
        if call is None or call.op != "linear":
            continue
        weight = tensor_name(call.args.get("weight"))
        if weight is not None and 1 in keep.get(weight, {}):
            found.append((node.name, weight, keep[weight][1]))
    return found


class ReweightStatistics:
    """What the fit of one Linear's reweight needs, accumulated batch by batch (float32 products, float64 sums):
    the kept inputs' Gram X_KᵀX_K, the cross term Σ_n x_K ⊙ (x Wᵀ W_K), the inputs' sums and the row count."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor) -> None:
        self.weight, self.kept = weight.detach(), kept
        self.rows, self.xx, self.cross, self.sums = 0, 0, 0, 0

    def add(self, x: torch.Tensor) -> None:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 products unless the inputs are float64
        x = x.detach().reshape(-1, x.shape[-1]).to(dtype)
        w = self.weight.to(dtype)
        x_k = x[:, self.kept]
        through = (x @ w.T) @ w[:, self.kept]              # (N, K): the unpruned output seen through W_K
        self.xx = self.xx + (x_k.T @ x_k).double()
        self.cross = self.cross + (x_k * through).sum(0).double()
        self.sums = self.sums + x.sum(0).double()
        self.rows += x.shape[0]

    def fit(self, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale s and bias b on the kept inputs so that W_K (x_K s + b) best matches W x (least squares). With
        C = W_KᵀW_K the normal equations are ``[C ⊙ X_KᵀX_K, C ⊙ Σx_K; C ⊙ Σx_Kᵀ, n C] [s; b] = [cross; Σx Wᵀ W_K]``."""
        w = self.weight.to(torch.float64)
        w_k = w[:, self.kept]
        coupling = w_k.T @ w_k                             # (K, K)
        sums_k = self.sums[self.kept]
        top = torch.cat([coupling * self.xx, coupling * sums_k[:, None]], 1)
        bottom = torch.cat([coupling * sums_k[None, :], coupling * self.rows], 1)
        system = torch.cat([top, bottom], 0)
        rhs = torch.cat([self.cross, self.sums @ w.T @ w_k])
        k = len(self.kept)
        strength = ridge_strength(system, ridge)
        prior = torch.cat([torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)])
        solution = torch.linalg.solve(system + strength * torch.eye(2 * k, dtype=torch.float64),
                                      rhs + strength * prior)
        return solution[:k], solution[k:]


def reweight_statistics(gm: fx.GraphModule, targets: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                        data: Iterable[tuple]) -> dict[str, ReweightStatistics]:
    """One pass of ``gm`` over ``data``: the statistics of every (node name, weight, kept inputs) Linear that ran."""
    statistics = {name: ReweightStatistics(weight, kept) for name, weight, kept in targets}
    watch(gm, data, {name: (lambda args, _out, s=stats: s.add(args[0])) for name, stats in statistics.items()})
    return {name: stats for name, stats in statistics.items() if stats.rows}


def fit_reweight(weight: torch.Tensor, inputs: torch.Tensor, kept: torch.Tensor, ridge: float = 1e-3):
    """The reweight of one Linear fitted on input rows ``inputs`` (N, F)."""
    statistics = ReweightStatistics(weight, kept)
    statistics.add(inputs)
    return statistics.fit(ridge)


def insert_reweights(gm: fx.GraphModule, fits: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> PassResult:
    """Pass: insert ``x * scale + bias`` in front of each named Linear node of ``gm``."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.name not in fits:
            continue
        scale, bias = fits[node.name]
        x = node.args[0]
        dtype = next(gm.parameters()).dtype
        base = f"{PREFIX}_{count}"
        gm.register_parameter(f"{base}_scale", nn.Parameter(scale.to(dtype)))
        gm.register_parameter(f"{base}_bias", nn.Parameter(bias.to(dtype)))
        with gm.graph.inserting_before(node):
            s = gm.graph.get_attr(f"{base}_scale")
            b = gm.graph.get_attr(f"{base}_bias")
            scaled = gm.graph.call_function(operator.mul, (x, s))
            shifted = gm.graph.call_function(operator.add, (scaled, b))
        node.args = (shifted, *node.args[1:])
        count += 1
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, count > 0)


def _linear_parts(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module | None, str | None, str | None]:
    """(module, weight attr path, bias attr path) of a Linear call (module or F.linear with get_attr weights)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.Linear):
            return module, f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None
    if node.op == "call_function" and node.target is F.linear:
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(weight, fx.Node) and weight.op == "get_attr" and (bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr")):
            return None, str(weight.target), (str(bias.target) if bias is not None else None)
    return None, None, None


def fold_reweights(gm: fx.GraphModule) -> int:
    """Fold every reweight (``x * scale + bias`` before a Linear) into that Linear; returns how many."""
    folded = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is operator.add and len(node.args) == 2):
            continue
        scaled, bias_node = node.args
        if not (isinstance(bias_node, fx.Node) and bias_node.op == "get_attr" and str(bias_node.target).startswith(PREFIX)):
            continue
        if not (isinstance(scaled, fx.Node) and scaled.target is operator.mul and len(scaled.users) == 1):
            continue
        x, scale_node = scaled.args
        users = list(node.users)
        if len(users) != 1:
            continue
        linear = users[0]
        module, weight_path, bias_path = _linear_parts(gm, linear)
        if weight_path is None:
            continue
        scale = gm.get_parameter(str(scale_node.target)).detach()
        shift = gm.get_parameter(str(bias_node.target)).detach()
        weight = gm.get_parameter(weight_path).detach()
        with torch.no_grad():
            new_bias = weight @ shift + (gm.get_parameter(bias_path).detach() if bias_path else 0)
            set_tensor(gm, weight_path, weight * scale)
            if bias_path:
                set_tensor(gm, bias_path, new_bias)
            elif module is not None:
                module.bias = nn.Parameter(new_bias)
            else:
                name = f"{weight_path.replace('.', '_')}_folded_bias"
                gm.register_parameter(name, nn.Parameter(new_bias))
                with gm.graph.inserting_before(linear):
                    b = gm.graph.get_attr(name)
                linear.args = (*linear.args[:2], b)
        linear.replace_input_with(node, x)
        for dead in (node, scaled, bias_node, scale_node):
            if not dead.users:
                gm.graph.erase_node(dead)
        for path in (str(scale_node.target), str(bias_node.target)):
            delattr(gm, path)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded
