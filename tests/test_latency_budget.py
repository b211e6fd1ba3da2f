"""Latency budgets (fxprune/latency_budget.py): node times scaled by the work a plan keeps; target_latency."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxprune
from fxprune import budget, depth
from fxprune.latency_budget import Estimator, profile
from helpers import examples, masked_error, small_vit

X = torch.randn(1, 3, 16, 16)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        hidden = F.gelu(self.fc1(self.norm(x))).transpose(1, 2)  # a layout op on the channels that go
        return x + self.fc2(hidden.transpose(1, 2))


@settings(max_examples=examples(10))
@given(ratio=st.floats(0.0, 0.9), heads=st.integers(1, 3), residual=st.booleans())
def test_times_proportional_to_macs_give_the_macs_budget(ratio, heads, residual):
    """Where only MAC ops take time, and each the time of its MACs, the estimate is the MACs count."""
    model = small_vit(num_heads=heads)
    analysis = fxprune.analyze(model, (X,))
    nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    per_node = budget.node_macs(analysis, Estimator(analysis, {}).shapes)
    estimate = Estimator(analysis, {name: 1e-9 * count for name, count in per_node.items()})
    kinds = ("qk", "v", "mlp", "residual") if residual else ("qk", "v", "mlp")
    removed = fxprune.plan(analysis, ratio, kinds=kinds).removed_atoms(analysis)
    assert estimate(removed) / estimate(nothing) == pytest.approx(
        budget.macs(analysis, removed) / budget.macs(analysis, nothing), rel=1e-9)


def test_other_ops_scale_with_their_output_and_layout_ops_keep_their_time():
    analysis = fxprune.analyze(Mlp().eval(), (torch.randn(2, 5, 8),))
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    transpose = next(n for n in nodes if n.startswith("transpose"))
    estimate = Estimator(analysis, {"gelu": 1.0, "norm": 10.0, transpose: 100.0})
    removed = fxprune.plan(analysis, 0.75).removed_atoms(analysis)
    assert estimate(removed) == pytest.approx(0.25 + 10.0 + 100.0)  # gelu's output lost 3/4 of its channels


def test_branches_removed_whole_lose_their_time():
    model = small_vit(depth=2)
    analysis = fxprune.analyze(model, (X,))
    times = {n.name: 1e-3 * (i + 1) for i, n in enumerate(analysis.gm.graph.nodes)}
    branches = depth.find_branches(analysis)
    dropped = depth.dropped_nodes(branches[:1])
    estimate = Estimator(analysis, times)
    nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
    assert estimate(nothing, dropped) == pytest.approx(estimate(nothing) - sum(times[n] for n in dropped))


def _macs_times(analysis, fixed: float = 0.0) -> dict[str, float]:
    """Node times proportional to MACs (deterministic, unlike a real profile), plus ``fixed`` seconds on a layout op."""
    times = {name: 1e-9 * count for name, count in budget.node_macs(analysis, Estimator(analysis, {}).shapes).items()}
    layout = next(n.name for n in analysis.gm.graph.nodes if n.name.startswith(("reshape", "permute", "transpose")))
    return {**times, layout: fixed}


@pytest.mark.parametrize("kinds", [("qk", "v", "mlp"), ("qk", "v", "mlp", "residual", "depth")])
def test_target_latency_plans_reach_their_estimate_and_stay_exact(kinds, monkeypatch):
    model = small_vit(num_heads=2, depth=2)
    analysis = fxprune.analyze(model, (X,))
    monkeypatch.setattr("fxprune.latency_budget.profile", _macs_times)
    plan = fxprune.plan(analysis, target_latency=0.6, kinds=kinds)
    assert plan.options["budget"] == "latency" and plan.options["latency_ms"] > 0
    assert plan.options["reached"] == pytest.approx(0.6, abs=0.01) and not plan.options["coverage"]["short"]
    pruned = fxprune.apply(analysis, plan)
    if "residual" in kinds:  # against the model whose stream norms see the kept channels: the self-check's reference
        assert fxprune.check_of(pruned).error < 1e-5 and plan.branches
    else:
        assert masked_error(model, analysis, plan, pruned, torch.randn(3, 3, 16, 16)) < 1e-5
    assert fxprune.count_macs(pruned, (X,)) / fxprune.count_macs(model, (X,)) == pytest.approx(
        plan.options["reached"], abs=1e-6)  # times proportional to MACs: the estimate is the MACs kept


def test_a_latency_target_fixed_costs_put_out_of_reach_is_reported(monkeypatch):
    """Time that no channel removal touches (here a layout op holding most of it) bounds what a plan can
    reach: the plan says so, as for any target it misses."""
    model = small_vit(num_heads=2, depth=2)
    analysis = fxprune.analyze(model, (X,))
    monkeypatch.setattr("fxprune.latency_budget.profile",
                        lambda analysis: _macs_times(analysis, fixed=1e-9 * fxprune.count_macs(model, (X,))))
    with pytest.warns(fxprune.PruningShortfallWarning, match="of the estimated latency where 40.0% was the target"):
        plan = fxprune.plan(analysis, target_latency=0.4)
    assert plan.options["reached"] > 0.5
    with pytest.raises(fxprune.PlanError, match="estimated latency"):
        fxprune.plan(analysis, target_latency=0.4, strict=True)


def test_a_real_profile_times_every_node():
    analysis = fxprune.analyze(small_vit(depth=1), (X,))
    times = profile(analysis, repeats=1, warmup=0)
    assert set(times) == {n.name for n in analysis.gm.graph.nodes} and all(t >= 0 for t in times.values())
    assert sum(times.values()) > 0


def test_target_latency_arguments():
    model = small_vit()
    with pytest.raises(fxprune.InvalidArgumentError, match="one of"):
        fxprune.plan(model, 0.5, example_inputs=(X,), target_latency=0.5)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(fxprune.InvalidArgumentError, match="target_latency"):
            fxprune.plan(model, example_inputs=(X,), target_latency=bad)
    with pytest.raises(fxprune.InvalidArgumentError, match="target_latency"):
        fxprune.plan(model, example_inputs=(X,), target_latency=0.5, heads="q_heads")
    pruned = fxprune.prune(model, example_inputs=(X,), target_latency=0.95)  # prune() passes it on
    assert fxprune.plan_of(pruned).options["budget"] == "latency"


def _sdpa_head_dims(pruned, x):
    """(q head width, v head width) of every scaled_dot_product_attention the pruned model runs."""
    from fxprune.statistics import watch

    seen = []
    watch(pruned, [(x,)], {n.name: lambda args, out: seen.append((args[0].shape[-1], args[2].shape[-1]))
                           for n in pruned.graph.nodes if "scaled_dot_product" in str(n.target)})
    return seen


@pytest.mark.parametrize("round_to", [1, 4])
def test_fused_attention_keeps_equal_q_k_and_v_head_widths(round_to):
    """SDPA's fast kernels need one head width for q/k and v (unequal ones run the math kernel, 3–4x slower
    on CPU): budgets keep them equal by default, at the mean of what each group would keep; off, they differ."""
    model = small_vit(num_heads=2, embed_per_head=16, depth=3)
    analysis = fxprune.analyze(model, (X,))
    unequal = fxprune.plan(analysis, target_macs=0.45, importance="random", round_to=round_to, equal_head_dims=False)
    dims = _sdpa_head_dims(fxprune.apply(analysis, unequal), X)
    assert any(q != v for q, v in dims)  # the draw this test relies on: the constraint has work to do
    equal = fxprune.plan(analysis, target_macs=0.45, importance="random", round_to=round_to)
    pruned = fxprune.apply(analysis, equal)
    dims = _sdpa_head_dims(pruned, X)
    assert dims and all(q == v and q % round_to == 0 for q, v in dims)
    assert equal.options["reached"] == pytest.approx(0.45, abs=0.02)  # widths of 16 in steps of 4: coarse
    assert masked_error(model, analysis, equal, pruned, torch.randn(2, 3, 16, 16)) < 1e-5
    ratio = fxprune.apply(analysis, fxprune.plan(analysis, 0.4, importance="random", round_to=round_to))
    assert all(q == v for q, v in _sdpa_head_dims(ratio, X))
