"""Depth (kinds=("depth",)): whole residual branches removed, exactly the model with their outputs zeroed."""
import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st

import fxprune
from fxprune.errors import PlanError
from fxprune.plan import Plan
from helpers import assert_unchanged, examples, randomize, small_vit, state_snapshot


def _zeroed(model, branches):
    """The original with the named branches' outputs zeroed by forward hooks (independent of fxprune's graph)."""
    hooks = []
    for name in branches:
        path, kind = name.split(":")
        module = model.get_submodule(path).get_submodule("attn" if kind == "attention" else "mlp")
        hooks.append(module.register_forward_hook(lambda m, i, o: torch.zeros_like(o)))
    return hooks


def _check_against_zeroed(model, pruned, branches, x):
    hooks = _zeroed(model, branches)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), expected) < 1e-5


@settings(max_examples=examples(6), deadline=None)
@given(depth=st.integers(1, 3), heads=st.integers(1, 3), ratio=st.sampled_from([0.25, 0.5, 1.0 - 1e-9]),
       fused=st.booleans(), batch=st.integers(2, 4))
def test_removed_branches_equal_their_zeroed_outputs_vit(depth, heads, ratio, fused, batch):
    model = small_vit(num_heads=heads, depth=depth, fused_attn=fused)
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    assert [b.name for b in analysis.branches()] == [f"blocks.{i}:{k}" for i in range(depth) for k in ("attention", "mlp")]
    plan = fxprune.plan(analysis, ratio, kinds=("depth",), data=[torch.randn(4, 3, 16, 16)])
    assert len(plan.branches) == round(ratio * 2 * depth)
    pruned = fxprune.apply(analysis, plan)
    _check_against_zeroed(model, pruned, plan.branches, torch.randn(batch, 3, 16, 16))
    names = {n for n, _ in pruned.named_parameters()}
    for branch in plan.branches:  # their parameters are gone
        path, kind = branch.split(":")
        assert not any(n.startswith(f"{path}.{'attn' if kind == 'attention' else 'mlp'}.") for n in names)
    assert fxprune.count_params(pruned) < fxprune.count_params(model) or not plan.branches
    assert_unchanged(model, snapshot)


def test_removed_branches_equal_their_zeroed_outputs_swin_with_channels():
    model = randomize(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16,
                                        depths=(1, 2), num_heads=(2, 4), num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32)
    analysis = fxprune.analyze(model, (x,))
    assert len(analysis.branches()) == 6
    plan = fxprune.plan(analysis, target_macs=0.6, kinds=("depth", "qk", "v", "mlp"))
    assert plan.branches and any(plan.removed.values())  # both kinds were used under one budget
    pruned = fxprune.apply(analysis, plan)
    reached = fxprune.count_macs(pruned, (x,)) / fxprune.count_macs(model, (x,))
    assert reached == pytest.approx(plan.options["reached"], abs=1e-6)  # the budget counted what removal removes
    assert abs(reached - 0.6) < 0.05
    assert fxprune.check_of(pruned).error < 1e-5  # against the masked original with those branches zeroed


def test_the_branch_that_changes_its_input_least_goes_first():
    model = small_vit(depth=3)
    with torch.no_grad():  # block 1's MLP writes almost nothing into the residual stream
        model.blocks[1].mlp.fc2.weight.mul_(1e-3)
        model.blocks[1].mlp.fc2.bias.zero_()
    plan = fxprune.plan(model, 1 / 6, kinds=("depth",), example_inputs=(torch.randn(1, 3, 16, 16),),
                        data=[torch.randn(4, 3, 16, 16)])
    assert plan.branches == ["blocks.1:mlp"]
    assert min(plan.options["branch_scores"], key=plan.options["branch_scores"].get) == "blocks.1:mlp"


def test_plans_with_branches_round_trip_and_are_checked(tmp_path):
    model = small_vit(depth=2)
    x = torch.randn(1, 3, 16, 16)
    pruned = fxprune.prune(model, 0.5, kinds=("depth", "mlp"), example_inputs=(x,))
    plan = fxprune.plan_of(pruned)
    assert Plan.from_json(plan.to_json()).branches == plan.branches and plan.branches
    fxprune.save(pruned, tmp_path / "saved")
    loaded = fxprune.load(tmp_path / "saved", model=model)
    batch = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(batch), pruned(batch))
    with pytest.raises(PlanError, match="residual branches"):
        fxprune.apply(model, Plan({}, branches=["blocks.9:mlp"]), example_inputs=(x,))
    assert "residual branches removable whole" in str(fxprune.analyze(model, (x,)))


@pytest.mark.parametrize("compensation", ["least_squares", "sequential"])
def test_compensation_after_removing_branches(compensation):
    """The layers left are fitted to the unpruned model's outputs, which the removed branches still shaped."""
    model = small_vit(depth=2)
    data = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    plan = fxprune.plan(analysis, 0.5)
    plan.branches = ["blocks.1:attention"]  # its q/k lost channels too: nothing left to compensate there
    plain = fxprune.apply(analysis, plan)
    compensated = fxprune.apply(analysis, plan, reweight_data=data, compensation=compensation)
    fitted = compensated.meta[fxprune.meta.COMPENSATED]
    assert fitted and all(f.error_after <= f.error_before * (1 + 1e-6) + 1e-9 for f in fitted)
    assert fxprune.count_params(compensated) == fxprune.count_params(plain)


def test_block_scores_are_the_output_change_of_removing_each_block_and_the_least_goes():
    """Kind "layers" scores a block by what removing it alone does to the outputs on the data (not by a local
    norm); a ratio removes the blocks of the smallest scores."""
    model = small_vit(num_heads=2, depth=4)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    analysis = fxprune.analyze(model, (x[:2],))
    plan = fxprune.plan(analysis, 0.25, kinds=("layers",), data=[(x,)])
    scores = plan.options["branch_scores"]
    assert sorted(scores) == [f"blocks.{i}" for i in range(4)]
    with torch.no_grad():
        reference = model(x)
        for block in scores:
            alone = fxprune.plan(analysis, 0.0)
            alone.branches, alone.options["layers"] = [f"{block}:attention", f"{block}:mlp"], [block]
            change = float(torch.linalg.vector_norm(fxprune.apply(analysis, alone)(x) - reference)
                           / torch.linalg.vector_norm(reference))
            assert scores[block] == pytest.approx(change, rel=1e-4, abs=1e-6), block
    assert plan.options["layers"] == [min(scores, key=scores.get)]


def test_whole_blocks_asked_of_a_model_without_residual_blocks_warn():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.warns(fxprune.PruningShortfallWarning, match="removed 0.0% of the blocks"):
        plan = fxprune.plan(model, 0.5, example_inputs=(torch.randn(2, 8),), kinds=("layers",))
    assert plan.branches == [] and plan.options["coverage"]["short"]
