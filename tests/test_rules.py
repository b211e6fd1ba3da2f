"""Op rules on hand-written blocks: couplings found from the graph, masked equivalence after pruning."""
import pytest
import torch
from hypothesis import given, strategies as st

import fxprune
from helpers import assert_unchanged, masked_error, state_snapshot
from toy_models import (CatBiasAttention, ChunkedAttention, ConvMlp, LinearAttention, OldStyleAttention, Residual,
                        SeparateProjections, SharedDepthwiseOnV, UnknownOpMlp)

TOKENS = 9


def _prune_and_check(model, x, ratio, importance="l2", head_ratio=0.0):
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, (x[:1],))
    plan = fxprune.plan(analysis, ratio, importance=importance, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    assert_unchanged(model, snapshot)
    return analysis, plan, pruned


def _groups(analysis, kind):
    return [g for g in analysis.groups if g.kind == kind]


ATTENTIONS = [OldStyleAttention, SeparateProjections, SharedDepthwiseOnV, LinearAttention, CatBiasAttention,
              ChunkedAttention]


@pytest.mark.parametrize("block", ATTENTIONS, ids=lambda c: c.__name__)
@given(ratio=st.floats(0.25, 0.9), batch=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]))
def test_attention_blocks_prune_equal_to_masked(block, ratio, batch, heads):
    model = Residual(block(dim=16, heads=heads), 16).eval()
    x = torch.randn(batch, TOKENS, 16)
    analysis, plan, pruned = _prune_and_check(model, x, ratio)
    assert _groups(analysis, "qk") and _groups(analysis, "v")
    assert fxprune.count_params(pruned) < fxprune.count_params(model)


def test_temperature_from_shape_keeps_original_value():
    model = Residual(OldStyleAttention(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    assert "8 ** -0.5" in pruned.code  # q.shape[-1] ** -0.5 keeps the original head_dim, 8
    assert "(1, 2, 9, 8)" not in pruned.code  # the batch size is not baked in


def test_a_parameter_shared_by_all_heads_is_gathered_per_head():
    """A head_dim-wide parameter broadcast over heads keeps its width; each head reads the entries of the
    channels it kept (a gather in the pruned graph), so heads choose their own channels and can go whole."""
    model = Residual(SeparateProjections(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (qk,) = _groups(analysis, "qk")
    (v,) = _groups(analysis, "v")
    assert not qk.shared_across_heads and len(qk.rows) == 2 and qk.heads == 2
    assert not v.shared_across_heads and len(v.rows) == 2
    assert pruned.get_submodule("block").temperature.shape == (8,)
    assert "gather_per_row" in pruned.code
    assert any(g.kind == "heads" and g.prunable for g in analysis.groups)
    _, _, without_a_head = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.0, head_ratio=0.5)
    assert without_a_head.get_parameter("block.q.weight").shape[0] == 8


def test_shared_depthwise_conv_on_v_forces_same_offsets():
    model = Residual(SharedDepthwiseOnV(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (v,) = _groups(analysis, "v")
    assert v.shared_across_heads and len(v.rows) == 1
    assert any(s.param == "block.dwc.weight" for s in v.members)
    dwc = pruned.get_submodule("block.dwc")
    assert dwc.weight.shape[0] == dwc.groups == dwc.out_channels == 4
    (qk,) = _groups(analysis, "qk")
    assert not qk.shared_across_heads and len(qk.rows) == 2


def test_heads_choose_their_own_channels():
    torch.manual_seed(1)
    model = Residual(OldStyleAttention(16, 2), 16).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, TOKENS, 16),))
    plan = fxprune.plan(analysis, 0.5)
    rows = plan.removed[_groups(analysis, "v")[0].name]
    assert len(rows) == 2 and rows[0] != rows[1]


def test_linear_attention_mean_over_tokens_is_allowed():
    model = Residual(LinearAttention(16, 2), 16).eval()
    analysis, _, _ = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    assert all(g.prunable for g in _groups(analysis, "qk") + _groups(analysis, "v"))


def test_conv_mlp_with_batch_norm():
    model = ConvMlp(8, 12)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 8, 5, 5), 0.5)
    (mlp,) = _groups(analysis, "mlp")
    assert {s.param for s in mlp.members} >= {"bn.weight", "bn.running_mean", "bn.running_var", "fc1.weight", "fc2.weight"}
    assert pruned.get_submodule("bn").num_features == 6
    assert pruned.get_submodule("bn").running_mean.shape == (6,)


def test_cat_bias_members():
    model = Residual(CatBiasAttention(16, 2), 16).eval()
    analysis, _, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (qk,) = _groups(analysis, "qk")
    assert "block.q_bias" in {s.param for s in qk.members}
    assert pruned.get_submodule("block").q_bias.shape == (8,)


def test_op_without_rule_freezes_its_channels_and_is_reported():
    model = UnknownOpMlp(8, 12).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 8), 0.5)
    frozen = analysis.group("fc1:other")  # the unknown op hides fc2's columns from the group
    assert not frozen.prunable and any("no rule" in r and "cumsum" in r for r in frozen.frozen)
    assert analysis.group("fc3:mlp").prunable
    assert pruned.get_submodule("fc1").out_features == 12
    assert pruned.get_submodule("fc3").out_features == 6
    assert any("cumsum" in op.target for op in analysis.unknown_ops)
    assert "cumsum" in str(analysis)


def test_chunk_becomes_split_when_q_k_and_v_widths_differ():
    model = Residual(ChunkedAttention(16, 2), 16).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, TOKENS, 16),))
    qk = _groups(analysis, "qk")[0]
    plan = fxprune.Plan({qk.name: [[0, 1, 2], [0, 1, 2]]})  # q/k lose 3 of 8 per head, v keeps all
    pruned = fxprune.apply(analysis, plan)
    assert "split" in pruned.code and "[10, 10, 16]" in pruned.code
    assert masked_error(model, analysis, plan, pruned, torch.randn(2, TOKENS, 16)) < 1e-5
