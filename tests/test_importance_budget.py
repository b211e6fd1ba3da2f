"""Importance criteria (shapes, invariances, zeroed channels lowest) and global MACs / parameter budgets."""
import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st

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
