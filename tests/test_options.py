"""ignored_layers, round_to, meta-device models, export and dtype: the options users reach for."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxprune
from helpers import examples, masked_error, small_vit

X = torch.randn(1, 3, 16, 16)


def test_ignored_layers_keep_their_groups_whole():
    model = small_vit(num_heads=2, embed_per_head=8, depth=2)
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,), head_ratio=0.5, ignored_layers=["blocks.0.attn"])
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 48
    assert pruned.get_submodule("blocks.0.attn.proj").in_features == 16
    assert pruned.get_submodule("blocks.1.attn.qkv").out_features < 48
    assert pruned.get_submodule("blocks.0.mlp.fc1").out_features < 32  # only the attention was protected
    with pytest.raises(fxprune.InvalidArgumentError, match="not a module"):
        fxprune.prune(model, 0.5, example_inputs=(X,), ignored_layers=["blocks.9"])


@settings(max_examples=examples(20))
@given(ratio=st.floats(0.05, 0.9), round_to=st.sampled_from([1, 2, 4, 8]), budget=st.booleans())
def test_round_to_keeps_multiples_and_never_removes_more(ratio, round_to, budget):
    model = small_vit(num_heads=2, embed_per_head=16, depth=1, mlp_ratio=2.0)
    analysis = fxprune.analyze(model, (X,))
    options = dict(target_macs=1 - ratio * 0.6) if budget else dict(ratio=ratio)
    plan = fxprune.plan(analysis, round_to=round_to, **options)
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, torch.randn(2, 3, 16, 16)) < 1e-5
    for name, rows in plan.removed.items():
        width = len(analysis.group(name).rows[0])
        kept = width - len(rows[0])
        assert kept % round_to == 0 or kept == width
        if not budget:
            assert len(rows[0]) <= min(math.floor(ratio * width + 1e-9), width - 1)


def test_meta_device_model_is_refused():
    meta_model = small_vit().to_empty(device="meta")
    with pytest.raises(fxprune.InvalidArgumentError, match="meta device"):
        fxprune.prune(meta_model, 0.5, example_inputs=(X,))


def test_pruned_model_exports_and_changes_dtype():
    pruned = fxprune.prune(small_vit(num_heads=2, embed_per_head=8), 0.5, example_inputs=(X,), head_ratio=0.5)
    x = torch.randn(2, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(pruned, (x,), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        assert fxprune.relative_error(exported.module()(x), pruned(x)) < 1e-6
        assert exported.module()(torch.randn(5, 3, 16, 16)).shape == (5, 5)  # batch stays dynamic
        double = pruned.to(torch.float64)
        assert double(x.double()).dtype == torch.float64


def test_pruned_model_compiles():
    pruned = fxprune.prune(small_vit(num_heads=2, embed_per_head=8), 0.5, example_inputs=(X,), head_ratio=0.5)
    compiled = torch.compile(pruned)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert fxprune.relative_error(compiled(x), pruned(x)) < 1e-5


def test_pruned_model_exports_to_onnx(tmp_path):
    for needed in ("onnx", "onnxscript"):  # torch.onnx.export(dynamo=True) needs both
        pytest.importorskip(needed)
    ort = pytest.importorskip("onnxruntime")
    pruned = fxprune.prune(small_vit(num_heads=2, embed_per_head=8), 0.5, example_inputs=(X,), head_ratio=0.5)
    x = torch.randn(2, 3, 16, 16)
    program = torch.onnx.export(pruned, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    program.save(str(tmp_path / "pruned.onnx"))
    session = ort.InferenceSession(str(tmp_path / "pruned.onnx"))
    name = session.get_inputs()[0].name
    with torch.no_grad():
        assert fxprune.relative_error(torch.from_numpy(session.run(None, {name: x.numpy()})[0]), pruned(x)) < 1e-5
    assert session.run(None, {name: torch.randn(5, 3, 16, 16).numpy()})[0].shape == (5, 5)
