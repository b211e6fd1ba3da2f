"""Property: pruned timm Swin / Swin-v2 (channels and whole heads) equal their masked originals."""
import timm
import torch
from hypothesis import given, settings, strategies as st

import fxprune
from helpers import examples, masked_error, randomize


@st.composite
def swin_configs(draw):
    window = draw(st.sampled_from([2, 4]))
    stages = draw(st.integers(1, 2))
    per_head = draw(st.sampled_from([4, 8]))
    first_heads = draw(st.integers(1, 3))
    heads = tuple(first_heads * 2 ** i for i in range(stages))
    side = window * 2 ** (stages - 1) * draw(st.integers(1, 2))  # tokens per side at stage 1
    return dict(
        version=draw(st.sampled_from(["swin", "swinv2"])),
        img_size=2 * side,
        patch_size=2,
        window_size=window,
        embed_dim=per_head * first_heads,
        depths=tuple(draw(st.integers(1, 2)) for _ in range(stages)),
        num_heads=heads,
        fused_attn=draw(st.booleans()),
    )


def build_swin(cfg: dict) -> torch.nn.Module:
    cfg = dict(cfg)
    version, fused = cfg.pop("version"), cfg.pop("fused_attn")
    name = "swin_tiny_patch4_window7_224" if version == "swin" else "swinv2_tiny_window8_256"
    model = timm.create_model(name, num_classes=3, **cfg)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return randomize(model).eval()


@settings(max_examples=examples(20))
@given(cfg=swin_configs(), ratio=st.floats(0.0, 0.9), head_ratio=st.floats(0.0, 0.9), batch=st.integers(1, 2))
def test_pruned_swin_equals_masked_original(cfg, ratio, head_ratio, batch):
    model = build_swin(cfg)
    size = cfg["img_size"]
    analysis = fxprune.analyze(model, (torch.randn(1, 3, size, size),))
    heads = [g for g in analysis.groups if g.kind == "heads"]
    multi_head_blocks = sum(d for d, h in zip(cfg["depths"], cfg["num_heads"]) if h > 1)  # one head: nothing to remove
    assert len(heads) == multi_head_blocks and all(g.prunable for g in heads)
    assert all(g.prunable for g in analysis.groups if g.kind in ("qk", "v"))
    plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    x = torch.randn(batch, 3, size, size)
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    for group in heads:  # per-head tables / scales lose the removed heads
        kept = group.width - len(plan.removed.get(group.name, [[]])[0])
        for space in group.members:
            assert pruned.get_parameter(space.param).shape[space.dim] == kept, space.label


def test_swin_relative_position_table_is_a_head_member():
    model = build_swin(dict(version="swin", img_size=16, patch_size=2, window_size=4, embed_dim=16,
                            depths=(2,), num_heads=(2,), fused_attn=True))
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    heads = analysis.group("layers.0.blocks.1.attn.qkv:heads")
    assert {s.label for s in heads.members} == {"layers.0.blocks.1.attn.relative_position_bias_table[1]"}
    plan = fxprune.plan(analysis, 0.0, head_ratio=0.5)
    pruned = fxprune.apply(analysis, plan)
    assert "expand(" in pruned.code and ", 1, -1, -1)" in pruned.code  # the shifted-window mask repeats 1 head now
