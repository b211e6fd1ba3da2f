"""Property: a pruned timm ViT equals the original with the same channels zeroed, for drawn architectures."""
import math

import torch
from hypothesis import given, strategies as st

import fxprune
from helpers import assert_unchanged, masked_error, small_vit, state_snapshot


@st.composite
def vit_configs(draw):
    class_token = draw(st.booleans())
    return dict(
        embed_per_head=draw(st.sampled_from([4, 6, 8])),
        num_heads=draw(st.integers(1, 4)),
        depth=draw(st.integers(1, 3)),
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 2.5])),
        qkv_bias=draw(st.booleans()),
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        reg_tokens=draw(st.integers(0, 2)),
        init_values=draw(st.sampled_from([None, 0.1])),
        fused_attn=draw(st.booleans()),
    )


def expected_params(cfg: dict, original: int, ratio: float, qk_frozen: bool = False) -> int:
    """Parameter count after pruning, from the architecture alone (independent of fxprune's bookkeeping)."""
    heads, d = cfg["num_heads"], cfg["embed_per_head"]
    c = heads * d
    hidden = int(c * cfg["mlp_ratio"])
    bias = 1 if cfg["qkv_bias"] else 0
    k_head = min(math.floor(ratio * d + 1e-9), d - 1)
    k_qk = 0 if qk_frozen else k_head
    k_mlp = min(math.floor(ratio * hidden + 1e-9), hidden - 1)
    per_block = (2 * heads * k_qk) * (c + bias)          # q and k rows of qkv
    per_block += heads * k_head * (c + bias)              # v rows of qkv
    per_block += heads * k_head * c                       # proj columns
    per_block += k_mlp * (c + 1) + k_mlp * c              # fc1 rows + bias, fc2 columns
    return original - cfg["depth"] * per_block


@given(cfg=vit_configs(), ratio=st.floats(0.0, 0.9), batch=st.integers(1, 3),
       importance=st.sampled_from(["l2", "l1", "random"]), seed=st.integers(0, 2**16))
def test_pruned_vit_equals_masked_original(cfg, ratio, batch, importance, seed):
    torch.manual_seed(seed)
    model = small_vit(**cfg)
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    plan = fxprune.plan(analysis, ratio, importance=importance, seed=seed)
    pruned = fxprune.apply(analysis, plan)
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    assert fxprune.count_params(pruned) == expected_params(cfg, fxprune.count_params(model), ratio)
    assert_unchanged(model, snapshot)
    for group_name, rows in plan.removed.items():
        assert len({len(r) for r in rows}) == 1, group_name  # every head removes the same count
        assert all(len(r) < len(row) for r, row in zip(rows, analysis.group(group_name).rows))


@given(cfg=vit_configs())
def test_ratio_zero_is_identical(cfg):
    model = small_vit(**cfg)
    x = torch.randn(2, 3, 16, 16)
    pruned = fxprune.prune(model, 0.0, example_inputs=(x[:1],))
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
    assert fxprune.count_params(pruned) == fxprune.count_params(model)


@given(cfg=vit_configs(), ratio=st.floats(0.05, 0.9))
def test_qk_norm_freezes_qk_and_still_prunes_v(cfg, ratio):
    model = small_vit(qk_norm=True, **cfg)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    qk = [g for g in analysis.groups if g.kind == "qk"]
    assert qk and all(not g.prunable and any("normalised" in r for r in g.frozen) for g in qk)
    plan = fxprune.plan(analysis, ratio)
    pruned = fxprune.apply(analysis, plan)
    x = torch.randn(2, 3, 16, 16)
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    original = fxprune.count_params(model)
    assert fxprune.count_params(pruned) == expected_params(cfg, original, ratio, qk_frozen=True)


def expected_params_with_heads(cfg: dict, original: int, ratio: float, head_ratio: float) -> int:
    heads, d = cfg["num_heads"], cfg["embed_per_head"]
    c = heads * d
    hidden = int(c * cfg["mlp_ratio"])
    bias = 1 if cfg["qkv_bias"] else 0
    gone_heads = min(math.floor(head_ratio * heads + 1e-9), heads - 1)
    left = heads - gone_heads
    k_head = min(math.floor(ratio * d + 1e-9), d - 1)
    k_mlp = min(math.floor(ratio * hidden + 1e-9), hidden - 1)
    per_channel_kind = gone_heads * d + left * k_head       # removed q (= k = v) channels per block
    per_block = 3 * per_channel_kind * (c + bias) + per_channel_kind * c
    per_block += k_mlp * (c + 1) + k_mlp * c
    return original - cfg["depth"] * per_block


@given(cfg=vit_configs(), ratio=st.floats(0.0, 0.9), head_ratio=st.floats(0.0, 0.9), batch=st.integers(1, 3))
def test_head_removal_equals_masked_original(cfg, ratio, head_ratio, batch):
    model = small_vit(**cfg)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    assert all(g.prunable for g in analysis.groups if g.kind == "heads")
    plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    x = torch.randn(batch, 3, 16, 16)
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    assert fxprune.count_params(pruned) == expected_params_with_heads(cfg, fxprune.count_params(model), ratio, head_ratio)
