"""Public API contract: arguments, errors, plans, the carried plan, training mode, MACs."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import fxprune
from helpers import small_vit
from toy_models import OldStyleAttention, Residual

X = torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_bad_ratio_is_rejected(ratio):
    with pytest.raises(fxprune.InvalidArgumentError, match="ratio"):
        fxprune.prune(small_vit(), ratio, example_inputs=(X,))


@given(ratio=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0), st.just(float("nan"))))
def test_out_of_range_ratios_never_prune(ratio):
    with pytest.raises(fxprune.InvalidArgumentError):
        fxprune.plan(fxprune.analyze(Residual(OldStyleAttention(), 16), (torch.randn(1, 4, 16),)), ratio)


def test_non_module_is_rejected():
    with pytest.raises(fxprune.InvalidArgumentError, match="nn.Module"):
        fxprune.prune(lambda x: x, 0.5, example_inputs=(X,))


def test_missing_example_inputs_asks_for_them():
    with pytest.raises(fxprune.InvalidArgumentError, match="example_inputs"):
        fxprune.prune(Residual(OldStyleAttention(), 16), 0.5)


def test_timm_input_size_is_used_when_no_inputs_are_given():
    model = small_vit()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)  # the cfg default; img_size=16 must win
    pruned = fxprune.prune(model, 0.5)
    with torch.no_grad():
        assert pruned(X).shape == (1, 5)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_untraceable_model_names_the_module_and_line():
    with pytest.raises(fxprune.CaptureError, match=r"inner\.1.*Branchy.*test_api\.py:\d+"):
        fxprune.prune(DataDependent(), 0.5, example_inputs=(torch.randn(2, 4),))


class TiedMlp(nn.Module):
    """One hidden layer used twice (tied weights)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_tied_parameters_are_pruned_consistently():
    model = TiedMlp().eval()
    x = torch.randn(2, 5, 8)
    analysis = fxprune.analyze(model, (x[:1],))
    plan = fxprune.plan(analysis, 0.5)
    pruned = fxprune.apply(analysis, plan)
    assert pruned.get_submodule("fc1").out_features == 6 and pruned.get_submodule("fc2").in_features == 6
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), fxprune.mask(model, plan, example_inputs=(x[:1],))(x)) < 1e-5


def test_wrong_input_shape_is_a_capture_error():
    with pytest.raises(fxprune.CaptureError, match="example_inputs"):
        fxprune.prune(small_vit(), 0.5, example_inputs=(torch.randn(1, 5, 16, 16),))


def test_unknown_option_and_importance():
    with pytest.raises(fxprune.InvalidArgumentError, match="unknown option"):
        fxprune.prune(small_vit(), 0.5, example_inputs=(X,), head_ratio_typo=0.5)
    with pytest.raises(fxprune.InvalidArgumentError, match="importance"):
        fxprune.prune(small_vit(), 0.5, example_inputs=(X,), importance="nope")


def test_plan_round_trips_through_json_and_replays():
    model = small_vit(depth=2)
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    plan = fxprune.plan_of(pruned)
    again = fxprune.apply(model, fxprune.Plan.from_json(plan.to_json()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))
    assert fxprune.plan_of(again).removed == plan.removed


def test_plan_for_another_model_is_rejected():
    plan = fxprune.plan_of(fxprune.prune(small_vit(depth=2), 0.5, example_inputs=(X,)))
    with pytest.raises(fxprune.PlanError, match="blocks.1"):
        fxprune.apply(small_vit(depth=1), plan, example_inputs=(X,))


def test_plan_that_empties_a_head_is_rejected():
    analysis = fxprune.analyze(small_vit(), (X,))
    group = next(g for g in analysis.groups if g.kind == "v")
    plan = fxprune.Plan({group.name: [list(range(len(r))) for r in group.rows]})
    with pytest.raises(fxprune.PlanError, match="keep at least one"):
        fxprune.apply(analysis, plan)


def test_training_mode_is_kept_and_model_untouched():
    model = small_vit().train()
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    assert model.training and pruned.training
    assert all(not p.is_inference() for p in pruned.parameters())


def test_pruned_model_fine_tunes():
    pruned = fxprune.prune(small_vit(), 0.5, example_inputs=(X,)).train()
    loss = pruned(torch.randn(4, 3, 16, 16)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


def test_analysis_table_and_dependency_graph():
    analysis = fxprune.analyze(small_vit(depth=1, num_heads=2, embed_per_head=4), (X,))
    table = str(analysis)
    for name in ("blocks.0.attn.qkv:qk", "blocks.0.attn.qkv:v", "blocks.0.mlp.fc1:mlp"):
        assert name in table
    qk = analysis.group("blocks.0.attn.qkv:qk")
    assert (qk.heads, qk.head_dim, qk.width) == (2, 4, 8)
    graph = analysis.graph()
    edge = graph.edges["blocks.0.attn.qkv.weight[0]", "blocks.0.attn.proj.weight[1]"]
    assert edge["spaces"] == ("blocks.0.attn.qkv.weight[0]", "blocks.0.attn.proj.weight[1]")
    assert edge["index_map"] == [(16 + i, i) for i in range(8)]  # v rows of qkv feed proj columns
    assert not edge["identity"]
    assert "blocks.0.attn.qkv:v" in graph.nodes["blocks.0.attn.proj.weight[1]"]["groups"]


def test_macs_count_attention_fused_or_not():
    fused, manual = small_vit(fused_attn=True), small_vit(fused_attn=False)
    macs_fused, macs_manual = fxprune.count_macs(fused, (X,)), fxprune.count_macs(manual, (X,))
    assert macs_fused == macs_manual
    tokens, width = 5, 16
    linear_only = 2 * (tokens * width * (3 * width + width + 2 * 2 * width))  # qkv, proj, fc1, fc2 per block
    assert macs_fused > linear_only  # attention's q·kᵀ and attn·v are counted
    pruned = fxprune.prune(fused, 0.5, example_inputs=(X,))
    assert fxprune.count_macs(pruned, (X,)) < macs_fused


class ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic tracing fails, torch.export specialises on it."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        if N > 4:
            x = x * 1.0
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def test_capture_falls_back_to_torch_export():
    model = Residual(ShapeBranch(), 16).eval()
    x = torch.randn(1, 9, 16)
    analysis = fxprune.analyze(model, (x,))
    assert analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD) == "torch.export"
    plan = fxprune.plan(analysis, 0.5, head_ratio=0.5)
    assert {analysis.group(g).kind for g in plan.removed} == {"qk", "v", "heads"}
    pruned = fxprune.apply(analysis, plan)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), fxprune.mask(model, plan, example_inputs=(x,))(x)) < 1e-5


@pytest.mark.parametrize("fused", [True, False])
def test_export_graph_of_a_vit_prunes_like_the_symbolic_one(fused):
    from fxprune.analysis import analyze_captured
    from fxprune.capture import capture

    model = small_vit(num_heads=2, embed_per_head=8, depth=2, fused_attn=fused)
    analysis = analyze_captured(capture(model, (X,), method="export"))
    symbolic = fxprune.analyze(model, (X,))
    assert sorted(g.kind for g in analysis.groups if g.prunable) == sorted(g.kind for g in symbolic.groups if g.prunable)
    plan = fxprune.plan(analysis, 0.5, head_ratio=0.5)
    pruned = fxprune.apply(analysis, plan)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(X), fxprune.mask(model, plan, example_inputs=(X,))(X)) < 1e-5
