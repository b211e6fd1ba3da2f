"""Importance criteria (shapes, invariances, zeroed channels lowest) and global MACs / parameter budgets."""
import warnings

import pytest
import timm
import torch
from hypothesis import example, given, settings, strategies as st

import fxprune
from fxprune import importance
from helpers import examples, masked_error, small_vit

X = torch.randn(1, 3, 16, 16)
DATA = [torch.randn(4, 3, 16, 16) for _ in range(2)]
CRITERIA = ["l1", "l2", "dimap", "taylor", "attention", "random"]


@pytest.fixture(scope="module")
def analysis():
    return fxprune.analyze(small_vit(num_heads=2, embed_per_head=8, depth=2), (X,))


@pytest.mark.parametrize("name", CRITERIA)
def test_one_finite_score_per_atom(analysis, name):
    scores = importance.score(analysis, name, data=DATA)
    assert scores.shape == (analysis.atoms.count,)
    assert torch.isfinite(scores).all() and (scores >= 0).all()


@pytest.mark.parametrize("name", ["l1", "l2", "dimap", "taylor", "attention"])
def test_zeroed_channel_scores_lowest_in_its_group(name):
    model = small_vit(num_heads=2, embed_per_head=8, depth=1)
    analysis = fxprune.analyze(model, (X,))
    group = analysis.group("blocks.0.mlp.fc1:mlp")
    victim = group.rows[0][5]
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[5].zero_()
        model.blocks[0].mlp.fc1.bias[5] = 0
        model.blocks[0].mlp.fc2.weight[:, 5].zero_()
    analysis = fxprune.analyze(model, (X,))
    scores = importance.score(analysis, name, data=DATA)
    row = torch.tensor(analysis.group("blocks.0.mlp.fc1:mlp").rows[0])
    assert int(row[scores[row].argmin()]) == victim


def test_dimap_order_within_a_layer_ignores_the_layer_scale():
    model = small_vit(num_heads=2, embed_per_head=8, depth=2)
    before = importance.score(fxprune.analyze(model, (X,)), "dimap")
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.mul_(37.0)
        model.blocks[0].attn.qkv.weight.mul_(0.01)
    after = importance.score(fxprune.analyze(model, (X,)), "dimap")
    assert torch.allclose(before, after, rtol=1e-9)  # distortion is scale-free, so scores do not move at all
    l2_before = importance.score(fxprune.analyze(small_vit(num_heads=2, embed_per_head=8, depth=2), (X,)), "l2")
    assert not torch.allclose(l2_before, importance.score(fxprune.analyze(model, (X,)), "l2"))


def test_taylor_needs_data():
    with pytest.raises(fxprune.InvalidArgumentError, match="calibration data"):
        fxprune.plan(small_vit(), 0.5, example_inputs=(X,), importance="taylor")


def test_data_driven_plan_runs_end_to_end():
    # block 0's MLP channel 3 has the largest weights but never fires (its bias keeps GELU at 0): magnitude keeps
    # it, a criterion that looks at the data removes it
    model = small_vit()
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    with torch.no_grad():
        fc1.weight[3].mul_(10)
        fc2.weight[:, 3].mul_(10)
        fc1.bias[3] = -1e4
    group = "blocks.0.mlp.fc1:mlp"
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,), importance="taylor", data=DATA)
    plan = fxprune.plan_of(pruned)
    assert plan.options["importance"] == "taylor"
    assert 3 in plan.removed[group][0]
    assert 3 not in fxprune.plan_of(fxprune.prune(model, 0.5, example_inputs=(X,))).removed[group][0]
    # the calibration data decides the plan: other batches, another plan
    other = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7 + i)) for i in range(2)]
    replanned = fxprune.plan(model, 0.5, example_inputs=(X,), importance="taylor", data=other).removed
    assert replanned != plan.removed
    reference = fxprune.mask(model, plan, example_inputs=(X,))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), reference(x)) < 1e-5


def test_budget_arguments():
    with pytest.raises(fxprune.InvalidArgumentError, match="one of"):
        fxprune.plan(small_vit(), 0.5, example_inputs=(X,), target_macs=0.5)
    with pytest.raises(fxprune.InvalidArgumentError, match="ratio"):
        fxprune.prune(small_vit(), example_inputs=(X,))
    for bad in (0.0, 1.5, float("nan"), True):
        with pytest.raises(fxprune.InvalidArgumentError, match="target_macs"):
            fxprune.plan(small_vit(), example_inputs=(X,), target_macs=bad)


@settings(max_examples=examples(15))
@given(target=st.floats(0.3, 1.0), criterion=st.sampled_from(["l2", "dimap"]), macs=st.booleans(),
       heads=st.integers(1, 4))
def test_budget_plans_are_masked_equivalent_and_do_not_overshoot(target, criterion, macs, heads):
    model = small_vit(num_heads=heads, embed_per_head=8, depth=2)
    analysis = fxprune.analyze(model, (X,))
    key = "target_macs" if macs else "target_params"
    plan = fxprune.plan(analysis, importance=criterion, **{key: target})
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, torch.randn(2, 3, 16, 16)) < 1e-5
    measure = fxprune.count_macs if macs else (lambda m, _: fxprune.count_params(m))
    reached = measure(pruned, (X,)) / measure(model, (X,))
    assert reached == pytest.approx(plan.options["reached"], abs=1e-9)
    for group in analysis.groups:  # a minimum width per head stays
        removed = plan.removed.get(group.name)
        if removed and group.kind != "heads":
            assert all(len(r) < len(row) for r, row in zip(removed, group.rows))


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "swin_tiny_patch4_window7_224",
                                  "flatten_swin_tiny_patch4_window7_224"])
def test_macs_budget_within_one_point(name):
    model = timm.create_model(name).eval()
    analysis = fxprune.analyze(model)
    inputs = analysis.captured.example_inputs
    original = fxprune.count_macs(model, inputs)
    for target in (0.8, 0.6, 0.4):
        pruned = fxprune.apply(analysis, fxprune.plan(analysis, target_macs=target))
        assert abs(fxprune.count_macs(pruned, inputs) / original - target) <= 0.01, (name, target)


@settings(max_examples=examples(8), deadline=None)
@given(target=st.floats(0.35, 0.95), heads=st.integers(2, 6), residual=st.booleans())
@example(target=0.4, heads=4, residual=False)
def test_whole_heads_are_a_budget_kind(target, heads, residual):
    """kinds with "heads": whole heads sit under the budget's one threshold with the other kinds; no channel is
    removed inside a head (what a model's own code can run, ``fxprune.to_module``), and each layer keeps a head."""
    model = small_vit(num_heads=heads, embed_per_head=8, depth=3)
    analysis = fxprune.analyze(model, (X,))
    kinds = ("heads", "mlp", "residual") if residual else ("heads", "mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.PruningShortfallWarning)  # one head per layer stays: a floor
        plan = fxprune.plan(analysis, target_macs=target, kinds=kinds)
    assert not any(any(rows) for name, rows in plan.removed.items() if name.endswith((":qk", ":v")))
    removed_heads = [len(rows[0]) for name, rows in plan.removed.items() if name.endswith(":heads")]
    assert all(n < heads for n in removed_heads)
    pruned = fxprune.apply(analysis, plan)
    reached = fxprune.count_macs(pruned, (X,)) / fxprune.count_macs(model, (X,))
    assert reached == pytest.approx(plan.options["reached"], abs=1e-9)
    assert reached <= target + 0.01 or plan.options["coverage"]["short"]
    if target < 0.6 and not residual:  # more than the MLPs can give: heads must go
        assert sum(removed_heads) > 0
    small = fxprune.to_module(model, pruned, example_inputs=(X,))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert fxprune.relative_error(small(x), pruned(x)) < 1e-5


def test_heads_kind_with_a_ratio_is_head_ratio_and_not_both():
    model = small_vit(num_heads=4)
    analysis = fxprune.analyze(model, (X,))
    as_kind = fxprune.plan(analysis, 0.5, kinds=("heads", "mlp"))
    as_ratio = fxprune.plan(analysis, 0.5, kinds=("mlp",), head_ratio=0.5)
    assert as_kind.removed == as_ratio.removed and any(n.endswith(":heads") for n in as_kind.removed)
    with pytest.raises(fxprune.InvalidArgumentError, match="asked twice"):
        fxprune.plan(analysis, 0.5, kinds=("heads",), head_ratio=0.5)
    with pytest.raises(fxprune.InvalidArgumentError, match="per head"):
        fxprune.auto_prune(model, [(X,)], 0.5, kinds=("heads", "mlp"))


def test_whole_units_short_of_the_ratio_say_what_they_count():
    """Three heads at 0.5 leave two (whole heads round down): the warning counts heads, not channels; a plan of
    whole blocks counts blocks."""
    model = small_vit(num_heads=3, depth=3)
    analysis = fxprune.analyze(model, (X,))
    with pytest.warns(fxprune.PruningShortfallWarning, match=r"removed 33\.3% of the channels and heads where 50"):
        fxprune.plan(analysis, 0.5, kinds=("heads",))
    coverage = fxprune.plan(analysis, 0.4, kinds=("layers",)).options["coverage"]
    assert (coverage["unit"], coverage["reached"]) == ("blocks", pytest.approx(1 / 3, abs=1e-4))
