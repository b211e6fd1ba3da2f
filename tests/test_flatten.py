"""FLatten Transformer: sizes match the paper, the models trace, and both attention kinds prune equal to masked."""
import timm
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import fxprune
from helpers import examples, randomize


def test_paper_sizes_at_224():
    # FLatten paper, Tables: FLatten-DeiT-T 6.1M / 1.1 GFLOPs, FLatten-Swin-T 29M / 4.5 GFLOPs (MACs)
    x = torch.randn(1, 3, 224, 224)
    for name, params, macs in [("flatten_deit_tiny_patch16_224", 6.1e6, 1.1e9),
                               ("flatten_swin_tiny_patch4_window7_224", 29e6, 4.5e9)]:
        model = timm.create_model(name).eval()
        assert abs(fxprune.count_params(model) / params - 1) < 0.03, name
        assert abs(fxprune.count_macs(model, (x,)) / macs - 1) < 0.05, name


def test_small_variant_and_registry():
    model = timm.create_model("flatten_deit_small_patch16_224", img_size=32)
    assert isinstance(model.blocks[0].attn, fxprune.models.FocusedLinearAttention)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def small_flatten_swin(per_head: int, heads: int) -> nn.Module:
    model = timm.create_model("flatten_swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=2,
                              embed_dim=per_head * heads, depths=(1, 1, 1, 1),
                              num_heads=(heads, 2 * heads, 2 * heads, 2 * heads), num_classes=3)
    return randomize(model).eval()


def small_flatten_deit(per_head: int, heads: int) -> nn.Module:
    model = timm.create_model("flatten_deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=per_head * heads,
                              num_heads=heads, num_classes=3)
    return randomize(model).eval()


def test_shared_dwc_forces_shared_offsets_and_untie_frees_heads():
    model = small_flatten_swin(4, 2)
    x = torch.randn(1, 3, 32, 32)
    tied = fxprune.analyze(model, (x,))
    v = tied.group("layers.0.blocks.0.attn.kv:v")
    assert v.shared_across_heads and len(v.rows) == 1
    assert any(s.param == "layers.0.blocks.0.attn.dwc.weight" for s in v.members)
    assert not tied.group("layers.0.blocks.0.attn.kv:heads").prunable
    untied = fxprune.analyze(model, (x,), untie_shared_convs=True)
    with torch.no_grad():
        x2 = torch.randn(2, 3, 32, 32)
        assert fxprune.relative_error(untied.gm(x2), model(x2)) < 1e-6  # untying changes nothing numerically
    v = untied.group("layers.0.blocks.0.attn.kv:v")
    assert not v.shared_across_heads and len(v.rows) == 2
    assert untied.group("layers.0.blocks.0.attn.kv:heads").prunable
    assert untied.gm.get_submodule("layers.0.blocks.0.attn.dwc").groups == 8
    softmax_heads = untied.group("layers.2.blocks.0.attn.qkv:heads")  # stage 3 keeps softmax window attention
    assert softmax_heads.prunable


# FLatten's φ(x) = ReLU(x) + ε turns a zeroed channel into ε, which then enters norms over all channels: zeroed
# *weights* differ from removal wherever a token's channels are all non-positive. Zeroed *activations* are what
# removal computes, so that is the reference here (see fxprune.mask(..., activations=True)).


@settings(max_examples=examples(15))
@given(per_head=st.sampled_from([4, 8]), heads=st.integers(1, 3), ratio=st.floats(0, 0.9),
       head_ratio=st.floats(0, 0.9), untie=st.booleans(), swin=st.booleans())
def test_flatten_prunes_equal_to_masked(per_head, heads, ratio, head_ratio, untie, swin):
    model = small_flatten_swin(per_head, heads) if swin else small_flatten_deit(per_head, heads)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 32, 32),), untie_shared_convs=untie)
    assert all(g.prunable for g in analysis.groups if g.kind in ("qk", "v"))
    plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    reference = fxprune.mask(analysis, plan, activations=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), reference(x)) < 1e-5
        assert fxprune.relative_error(reference(x), model(x)) > 0 or not plan.removed
        assert pruned(torch.randn(3, 3, 32, 32)).shape == (3, 3)  # any batch size
    for name in plan.removed:  # linear attention's scale and positional encoding lose their channels
        group = analysis.group(name)
        for space in group.members:
            if space.param.endswith(("attn.scale", "positional_encoding")):
                assert pruned.get_parameter(space.param).shape[space.dim] < analysis.tensor(space.param).shape[space.dim]


def test_plan_with_untie_replays_and_masks_the_model():
    model = small_flatten_deit(4, 2)
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), head_ratio=0.5, untie_shared_convs=True)
    plan = fxprune.plan_of(pruned)
    assert plan.options["untie_shared_convs"]
    again = fxprune.apply(model, fxprune.Plan.from_json(plan.to_json()), example_inputs=(x,))
    reference = fxprune.mask(model, plan, example_inputs=(x,), activations=True)
    with torch.no_grad():
        x2 = torch.randn(2, 3, 32, 32)
        assert torch.equal(again(x2), pruned(x2))
        assert fxprune.relative_error(pruned(x), reference(x)) < 1e-5


class BuildsModulesInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(nn.ReLU()(self.fc1(x)))  # as the FLatten reference code does


def test_modules_built_in_forward_are_traced_through():
    model = BuildsModulesInForward().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 4),))
    assert analysis.group("fc1:mlp").prunable
