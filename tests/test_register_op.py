"""Teaching fxprune a new op through the public registration, and pruning through it."""
import torch
import torch.fx
import torch.nn as nn

import fxprune
from helpers import masked_error


def soft_clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    """A channel-wise activation fx cannot see into (wrapped below), like a custom fused kernel."""
    return limit * torch.tanh(x / limit)


torch.fx.wrap("soft_clip")


class ClippedMlp(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(soft_clip(self.fc1(x), 2.0))


def _mlp_groups(analysis):
    return [g for g in analysis.groups if g.kind == "mlp"]


def test_an_op_registered_through_the_public_api_is_pruned_through():
    torch.manual_seed(0)
    model = ClippedMlp().eval()
    x = torch.randn(3, 5, 8)
    before = fxprune.analyze(model, (x[:1],))
    if "soft_clip" not in fxprune.analysis.rules.OPS:  # an op without a rule freezes what it touches
        assert not any(g.prunable for g in _mlp_groups(before))
        assert any("soft_clip" in op.target for op in before.unknown_ops)

    @fxprune.register_op("soft_clip", ("input", "limit"), functions=[soft_clip], replace=True)
    def rule_soft_clip(ctx, call):  # elementwise on each channel: ids pass through unchanged
        return ctx.labels(call.args["input"])

    analysis = fxprune.analyze(model, (x[:1],))
    assert not analysis.unknown_ops
    (group,) = _mlp_groups(analysis)
    assert group.prunable and group.width == 16
    plan = fxprune.plan(analysis, 0.5)
    pruned = fxprune.apply(analysis, plan)
    assert pruned.fc1.out_features == 8 and pruned.fc2.in_features == 8
    assert masked_error(model, analysis, plan, pruned, x) < 1e-6


def test_spellings_owned_by_another_op_are_refused_without_replace():
    import pytest

    with pytest.raises(fxprune.InvalidArgumentError, match="already"):
        fxprune.register_op("my_linear", ("input", "weight", "bias"), functions=[torch.nn.functional.linear])(
            lambda ctx, call: ())
    assert "my_linear" not in fxprune.analysis.rules.OPS
