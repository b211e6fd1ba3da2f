"""Never broken, never silent: every prune/apply checks its own result, and says when it did less than asked."""
import operator
import warnings

import pytest
import torch

import fxprune
import fxprune.rewrite as rewrite
from fxprune import meta
from fxprune.masked_reference import weight_masked
from helpers import masked_error, small_vit
from toy_models import CatBiasAttention, ConvMlp, Residual, SharedDepthwiseOnV, UnknownOpMlp

X = torch.randn(1, 3, 16, 16)


def test_the_self_check_runs_by_default_at_two_batch_sizes():
    pruned = fxprune.prune(small_vit(), 0.5, example_inputs=(X,), head_ratio=0.5)
    check = fxprune.check_of(pruned)
    assert check.batch_sizes == [1, 2] and check.reference == "weights" and check.error < 1e-5
    assert check.seconds > 0
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


def _misalign_first_mlp(slice_parameters):
    """A rewrite bug: fc1 of the first block keeps its hidden channels in reverse order, fc2 does not."""
    def wrong(gm, keep):
        keep = {name: dict(dims) for name, dims in keep.items()}
        for name in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias"):
            keep[name][0] = keep[name][0].flip(0)
        return slice_parameters(gm, keep)
    return wrong


def test_a_wrong_slice_is_caught(monkeypatch):
    """The reference zeroes fc1/fc2 through activation masks, not copies: it must still see misaligned channels."""
    monkeypatch.setattr(rewrite, "slice_parameters", _misalign_first_mlp(rewrite.slice_parameters))
    model = small_vit()
    unchecked = fxprune.prune(model, 0.5, example_inputs=(X,), verify=False)
    analysis = fxprune.analyze(model, (X,))
    assert masked_error(model, analysis, fxprune.plan_of(unchecked), unchecked, X) > 1e-3
    with pytest.raises(fxprune.RewriteError, match="differs from the masked original"):
        fxprune.prune(model, 0.5, example_inputs=(X,))


def _conv_mlp() -> torch.nn.Module:
    model = ConvMlp(8, 12)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


class FunctionalMlp(torch.nn.Module):
    """An MLP of F.linear calls on its own parameters (get_attr nodes in the trace), as an exported graph has
    aten.linear calls; sigmoid(0) = 0.5, so the second call must ignore removed channels by its input mask.
    With ``tied``, the first weight is read by a second call (a gate), so it must be copied instead."""

    def __init__(self, dim: int = 8, hidden: int = 12, tied: bool = False) -> None:
        super().__init__()
        self.w1, self.b1 = torch.nn.Parameter(torch.randn(hidden, dim)), torch.nn.Parameter(torch.randn(hidden))
        self.w2 = torch.nn.Parameter(torch.randn(dim, hidden) / hidden ** 0.5)
        self.tied = tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(torch.nn.functional.linear(x, self.w1, self.b1))
        if self.tied:
            h = h * torch.nn.functional.linear(x, self.w1)
        return torch.nn.functional.linear(h, self.w2)


@pytest.mark.filterwarnings("ignore::fxprune.PruningShortfallWarning")
@pytest.mark.parametrize("model, x, copied, calls", [
    (small_vit(), X, set(), set()),  # every masked weight belongs to a Linear: nothing is copied
    # sigmoid(0) = 0.5: fc2 must ignore the removed channels by its zeroed columns (an input mask)
    (Residual(torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Sigmoid(), torch.nn.Linear(12, 8)), 8).eval(),
     torch.randn(2, 5, 8), set(), set()),
    (Residual(SharedDepthwiseOnV(16, 2), 16).eval(), torch.randn(2, 9, 16), set(), set()),  # depthwise conv too
    (Residual(CatBiasAttention(16, 2), 16).eval(), torch.randn(2, 9, 16),  # its bias is computed: copied
     {"block.qkv.weight", "block.q_bias", "block.v_bias"}, set()),
    (_conv_mlp(), torch.randn(2, 8, 5, 5), {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}, set()),
    # F.linear on get_attr weights and bias, each read by that call alone: masked activations, nothing copied
    (Residual(FunctionalMlp(), 8).eval(), torch.randn(2, 5, 8), set(), {"block.w1", "block.w2"}),
    # w1 is read by two calls: it (and b1, the bias of one of them) are copied; w2 is still masked by its call
    (Residual(FunctionalMlp(tied=True), 8).eval(), torch.randn(2, 5, 8), {"block.w1", "block.b1"}, {"block.w2"}),
], ids=["vit", "sigmoid-mlp", "depthwise-conv", "f.linear-cat-bias", "conv-batchnorm", "f.linear", "f.linear-tied"])
def test_the_check_reference_is_the_weight_masked_model(model, x, copied, calls):
    """The self-check's reference (activation masks where a Linear, conv or linear call reads its weights
    whole, copies elsewhere) computes what fxprune.mask's copy with zeroed weights computes."""
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.plan(analysis, 0.5)
    reference = weight_masked(analysis, plan.removed_atoms(analysis))
    assert set(reference.tensors) == copied and set(reference.linear_calls) == calls
    with torch.no_grad():
        got, want = reference.run(analysis.gm, (x,)), fxprune.mask(model, plan, example_inputs=(x,))(x)
        assert fxprune.relative_error(got, want) < 1e-6 < fxprune.relative_error(got, model(x))


def _misalign_w1(slice_parameters):
    """A rewrite bug: w1 (and b1) keep their hidden channels in reverse order, w2 does not."""
    def wrong(gm, keep):
        keep = {name: dict(dims) for name, dims in keep.items()}
        for name in ("block.w1", "block.b1"):
            keep[name][0] = keep[name][0].flip(0)
        return slice_parameters(gm, keep)
    return wrong


def test_a_wrong_slice_behind_a_linear_call_is_caught(monkeypatch):
    """The reference zeroes F.linear's weights through activation masks: it must still see misaligned channels."""
    monkeypatch.setattr(rewrite, "slice_parameters", _misalign_w1(rewrite.slice_parameters))
    model, x = Residual(FunctionalMlp(), 8).eval(), torch.randn(2, 5, 8)
    unchecked = fxprune.prune(model, 0.5, example_inputs=(x,), verify=False)
    analysis = fxprune.analyze(model, (x,))
    assert masked_error(model, analysis, fxprune.plan_of(unchecked), unchecked, x) > 1e-3
    with pytest.raises(fxprune.RewriteError, match="differs from the masked original"):
        fxprune.prune(model, 0.5, example_inputs=(x,))


def test_unknown_kinds_are_errors():
    with pytest.raises(fxprune.InvalidArgumentError, match="unknown kind.*'width'"):
        fxprune.prune(small_vit(), target_macs=0.92, example_inputs=(X,), kinds=("depth", "width"))
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
    with pytest.warns(fxprune.PruningShortfallWarning, match=r"kept .*% of the MACs where 40\.0% was the target"):
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
