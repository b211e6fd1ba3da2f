"""torchvision's opaque attention made visible (equivalence first), then pruned like any other model."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

import fxprune
from helpers import examples, masked_error, randomize


def tv_vit(heads: int, per_head: int, layers: int) -> nn.Module:
    return randomize(VisionTransformer(image_size=16, patch_size=8, num_layers=layers, num_heads=heads,
                                       hidden_dim=heads * per_head, mlp_dim=2 * heads * per_head, num_classes=3)).eval()


def tv_swin(v2: bool, window: int, heads: int, depths: tuple) -> nn.Module:
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    model = SwinTransformer(patch_size=[2, 2], embed_dim=8 * heads, depths=list(depths),
                            num_heads=[heads * 2 ** i for i in range(len(depths))], window_size=[window, window],
                            num_classes=3, **extra)
    return randomize(model).eval()


@settings(max_examples=examples(15))
@given(heads=st.integers(1, 4), per_head=st.sampled_from([4, 8]), layers=st.integers(1, 2), batch=st.integers(1, 3))
def test_multihead_attention_decomposition_is_equivalent(heads, per_head, layers, batch):
    model = tv_vit(heads, per_head, layers)
    gm = fxprune.make_attention_visible(model, (torch.randn(1, 3, 16, 16),))
    assert not any(isinstance(m, nn.MultiheadAttention) for n in gm.graph.nodes if n.op == "call_module"
                   for m in [gm.get_submodule(str(n.target))])
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        assert fxprune.relative_error(gm(x), model(x)) < 1e-5


@settings(max_examples=examples(15))
@given(v2=st.booleans(), window=st.sampled_from([2, 4]), heads=st.integers(1, 2), depths=st.sampled_from([(2,), (1, 2)]),
       side=st.sampled_from([16, 20, 24]), batch=st.integers(1, 2))
def test_shifted_window_attention_decomposition_is_equivalent(v2, window, heads, depths, side, batch):
    model = tv_swin(v2, window, heads, depths)  # side 20 pads windows of 4 at stage 1 (10 tokens)
    gm = fxprune.make_attention_visible(model, (torch.randn(1, 3, side, side),))
    assert "shifted_window_attention" not in gm.code
    x = torch.randn(batch, 3, side, side)
    with torch.no_grad():
        assert fxprune.relative_error(gm(x), model(x)) < 1e-5


@settings(max_examples=examples(15))
@given(heads=st.integers(2, 4), ratio=st.floats(0, 0.9), head_ratio=st.floats(0, 0.9), batch=st.integers(1, 2))
def test_torchvision_vit_prunes_equal_to_masked(heads, ratio, head_ratio, batch):
    model = tv_vit(heads, 8, 2)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    assert {g.kind for g in analysis.groups if g.prunable} >= {"qk", "v", "mlp", "heads"}
    plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, torch.randn(batch, 3, 16, 16)) < 1e-5


@settings(max_examples=examples(15))
@given(v2=st.booleans(), window=st.sampled_from([2, 4]), ratio=st.floats(0, 0.9), head_ratio=st.floats(0, 0.9),
       side=st.sampled_from([16, 20]))
def test_torchvision_swin_prunes_equal_to_masked(v2, window, ratio, head_ratio, side):
    model = tv_swin(v2, window, 2, (2, 2))
    analysis = fxprune.analyze(model, (torch.randn(1, 3, side, side),))
    assert all(g.prunable for g in analysis.groups if g.kind in ("qk", "v", "heads"))
    plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, torch.randn(2, 3, side, side)) < 1e-5


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, weights = self.attn(x, self.proj(x), x)  # cross-attention and used weights: not decomposed
        return self.head(out) + weights.sum()


def test_multihead_attention_that_cannot_be_decomposed_stays_frozen():
    model = CrossAttention().eval()
    analysis = fxprune.analyze(model, (torch.randn(1, 5, 8),))
    assert any("MultiheadAttention" in op.target for op in analysis.unknown_ops)
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 5, 8),))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.allclose(pruned(x), model(x), atol=1e-6)


@pytest.mark.parametrize("v2,layers", [(False, 1), (True, 2)])
def test_values_of_nodes_capture_adds_equal_a_real_forward(v2, layers):
    """Capture infers the values of the nodes its passes add (decomposed attention, split q/k/v) on meta tensors
    instead of running the model again: every node's recorded value must be what a real forward records."""
    import timm

    from fxprune import meta
    from fxprune.capture import capture, record_values, values

    def no_second_forward(*_args):
        raise AssertionError("the added nodes' values were not inferred: the graph was run again")

    models = [(tv_vit(2, 4, layers), torch.randn(1, 3, 16, 16)), (tv_swin(v2, 2, 1, (1, layers)), torch.randn(1, 3, 16, 16)),
              (timm.create_model("vit_tiny_patch16_224", img_size=32, depth=layers).eval(), torch.randn(1, 3, 32, 32))]
    for model, x in models:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(values, "record_values", no_second_forward)
            gm = capture(model, (x,)).gm
        inferred = {n.name: n.meta[meta.VALUE] for n in gm.graph.nodes if n.op != "output"}
        record_values(gm, (x,), "model")
        assert inferred == {n.name: n.meta[meta.VALUE] for n in gm.graph.nodes if n.op != "output"}
