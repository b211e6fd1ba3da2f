"""The automatic method end to end on a tiny model: budget met, parts switchable, deterministic, reweighted."""
import pytest
import torch

import fxprune
from fxprune.rewrite.reweight import PREFIX
from helpers import small_vit

DATA = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
HELD_OUT = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(100 + i)) for i in range(4)]
X = DATA[0][:1]


@pytest.fixture(scope="module")
def model():
    return small_vit(num_heads=4, embed_per_head=8, depth=2)


def _error(model, pruned):
    with torch.no_grad():
        return sum(float((pruned(x) - model(x)).square().sum()) for x in HELD_OUT) / \
            sum(float(model(x).square().sum()) for x in HELD_OUT)


def test_auto_prune_meets_the_budget_and_is_reweighted(model):
    pruned = fxprune.auto_prune(model, DATA, target_macs=0.6, steps=40, progress=False)
    assert abs(fxprune.count_macs(pruned, (X,)) / fxprune.count_macs(model, (X,)) - 0.6) <= 0.02
    assert any(n.startswith(PREFIX) for n, _ in pruned.named_parameters())
    plan = fxprune.plan_of(pruned)
    assert plan.options["importance"] == "auto" and plan.options["indicators"]
    for name, rows in plan.removed.items():  # equal removal in every head of a group
        assert len({len(r) for r in rows}) == 1, name
    folded = fxprune.fold_reweights(pruned)
    assert folded > 0


def test_auto_prune_is_deterministic_under_a_seed(model):
    first = fxprune.auto_prune(model, DATA, target_macs=0.6, steps=20, progress=False, seed=3)
    second = fxprune.auto_prune(model, DATA, target_macs=0.6, steps=20, progress=False, seed=3)
    with torch.no_grad():
        assert torch.equal(first(HELD_OUT[0]), second(HELD_OUT[0]))
    assert fxprune.plan_of(first).removed == fxprune.plan_of(second).removed


def test_auto_prune_parts_switch_and_beat_magnitude_here(model):
    full = _error(model, fxprune.auto_prune(model, DATA, target_macs=0.6, steps=60, progress=False))
    no_reweight = fxprune.auto_prune(model, DATA, target_macs=0.6, steps=60, progress=False, reweight=False)
    assert not any(n.startswith(PREFIX) for n, _ in no_reweight.named_parameters())
    magnitude = _error(model, fxprune.prune(model, target_macs=0.6, example_inputs=(X,)))
    assert full < magnitude  # on this fixed model and data; benchmarks measure it properly
    unaligned = fxprune.auto_prune(model, DATA, target_macs=0.6, steps=60, progress=False, equal_heads=False)
    assert fxprune.plan_of(unaligned).options["equal_heads"] is False
    assert abs(fxprune.count_macs(unaligned, (X,)) / fxprune.count_macs(model, (X,)) - 0.6) <= 0.02


def test_auto_prune_rejects_bad_input(model):
    with pytest.raises(fxprune.InvalidArgumentError):
        fxprune.auto_prune(model, DATA, target_macs=1.5, progress=False)
    with pytest.raises(fxprune.InvalidArgumentError, match="calibration"):
        fxprune.auto_prune(model, [], target_macs=0.5, progress=False)


def test_auto_prune_on_swin_and_flatten():
    from test_flatten import small_flatten_swin
    from test_swin_property import build_swin

    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    x = data[0][:1]
    for model in (small_flatten_swin(8, 2),
                  build_swin(dict(version="swin", img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                  depths=(2, 2), num_heads=(2, 4), fused_attn=True))):
        pruned = fxprune.auto_prune(model, data, target_macs=0.6, steps=10, progress=False)
        assert abs(fxprune.count_macs(pruned, (x,)) / fxprune.count_macs(model, (x,)) - 0.6) <= 0.02
