"""Never broken, never silent: every prune/apply checks its own result, and says when it did less than asked."""
import operator
import warnings

import pytest
import torch

import fxprune
import fxprune.rewrite as rewrite
from fxprune import meta
from helpers import masked_error, small_vit
from toy_models import Residual, UnknownOpMlp

X = torch.randn(1, 3, 16, 16)


def test_the_self_check_runs_by_default_at_two_batch_sizes():
    pruned = fxprune.prune(small_vit(), 0.5, example_inputs=(X,), head_ratio=0.5)
    check = fxprune.check_of(pruned)
    assert check.batch_sizes == [1, 2] and check.reference == "weights" and check.error < 1e-5
    assert fxprune.check_of(fxprune.prune(small_vit(), 0.5, example_inputs=(X,), verify=False)) is None


def test_a_wrong_softmax_scale_is_caught_and_named(monkeypatch):
    """Without the pass that keeps SDPA's scale, the pruned model computes something else."""
    monkeypatch.setattr(rewrite, "keep_attention_scale", lambda gm, shapes: None)
    model = small_vit(num_heads=2, embed_per_head=8)
    unchecked = fxprune.prune(model, 0.5, example_inputs=(X,), verify=False)
    analysis = fxprune.analyze(model, (X,))
    assert masked_error(model, analysis, fxprune.plan_of(unchecked), unchecked, torch.randn(3, 3, 16, 16)) > 1e-3
    with pytest.raises(fxprune.RewriteError, match=r"first diverging node '.*scaled_dot_product_attention"):
        fxprune.prune(model, 0.5, example_inputs=(X,))


def _pin_batch_size(gm, shapes):
    """A rewrite bug: the example's batch size baked into the graph (x.shape[0] -> 1)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0 \
                and isinstance(node.meta.get(meta.VALUE), int):
            for user in list(node.users):
                user.args = tuple(node.meta[meta.VALUE] if a is node else a for a in user.args)


def test_a_model_that_only_runs_at_the_trace_batch_size_is_never_returned(monkeypatch):
    fix_sizes = rewrite.fix_sizes
    monkeypatch.setattr(rewrite, "fix_sizes", lambda gm, shapes: (fix_sizes(gm, shapes), _pin_batch_size(gm, shapes)))
    model = small_vit(fused_attn=False)
    unchecked = fxprune.prune(model, 0.5, example_inputs=(X,), verify=False)
    unchecked(X)
    with pytest.raises(RuntimeError):
        unchecked(torch.randn(2, 3, 16, 16))
    with pytest.raises(fxprune.RewriteError, match="fails at batch size 2"):
        fxprune.prune(model, 0.5, example_inputs=(X,))


def test_unknown_kinds_are_errors():
    with pytest.raises(fxprune.InvalidArgumentError, match="unknown kind.*'depth'"):
        fxprune.prune(small_vit(), target_macs=0.92, example_inputs=(X,), kinds=("depth",))
    with pytest.raises(fxprune.InvalidArgumentError, match="min_head_width"):
        fxprune.plan(small_vit(), target_macs=0.9, example_inputs=(X,), min_head_width=0)


def test_no_warning_when_the_request_is_met():
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.PruningShortfallWarning)
        plan = fxprune.plan(small_vit(), 0.5, example_inputs=(X,))
    assert plan.options["coverage"]["reached"] == 0.5 and not plan.options["coverage"]["short"]


def test_frozen_groups_are_reported_with_their_reason():
    """One of two MLPs goes through an op without a rule: a quarter of the hidden channels go, not half."""
    model = Residual(UnknownOpMlp(dim=8, hidden=12), 8).eval()
    x = torch.randn(2, 5, 8)
    with pytest.warns(fxprune.PruningShortfallWarning, match=r"removed 25\.0% of the channels where 50\.0% was asked.*"
                                                              r"no rule for function torch.cumsum"):
        pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
    assert fxprune.plan_of(pruned).options["coverage"]["short"]
    with pytest.raises(fxprune.PlanError, match="no rule for"):
        fxprune.prune(model, 0.5, example_inputs=(x,), strict=True)
    coverage = fxprune.analyze(model, (x,)).coverage()
    assert 0 < coverage["removable_macs"] < 0.5 and coverage["frozen"][0][0].startswith("no rule for")
    assert coverage["unknown_ops"] == ["function torch.cumsum"]


def test_a_missed_macs_target_is_reported():
    model = small_vit(depth=2)
    with pytest.warns(fxprune.PruningShortfallWarning, match=r"kept .*% of the MACS where 40\.0% was the target"):
        plan = fxprune.plan(model, target_macs=0.4, example_inputs=(X,), ignored_layers=["blocks.0"])
    coverage = plan.options["coverage"]
    assert coverage["measure"] == "macs" and coverage["reached"] > 0.41
    removable = fxprune.analyze(model, (X,)).coverage()["removable_macs"]
    assert 0 < coverage["removable_macs"] <= removable


class _PinsItsBatch(torch.nn.Module):
    """fx cannot trace ``int(size)``; torch.export can, but fixes the batch size there."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        batch = int(x.shape[0])
        return self.fc2(self.fc1(x).relu()).reshape(batch, -1)


def test_a_model_whose_export_fixes_the_batch_says_so():
    with pytest.warns(UserWarning, match="could not keep every batch and sequence dim dynamic"):
        analysis = fxprune.analyze(_PinsItsBatch().eval(), example_inputs=(torch.randn(2, 8),))
    assert "the model fixes input 0 dim 0" in str(analysis)


def test_token_inputs_keep_batch_and_sequence_dynamic_through_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=50)
    model = transformers.BertModel(config).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*could not keep every batch")  # no static-shape warning
        pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randint(0, 50, (2, 6)),))
    assert pruned.meta[meta.CAPTURE_METHOD] == "torch.export"
    for batch, length in ((1, 3), (4, 17)):
        assert pruned(torch.randint(0, 50, (batch, length))).last_hidden_state.shape == (batch, length, 32)
