"""timm's transformer families at small sizes: pruned at 0.25, and half of every attention's heads removed where
the family allows whole-head removal, the pruned model equals the masked original on fresh inputs at batch
sizes the trace never saw, cuts MACs, and (for every family this test calls supported) shrinks attention itself.

The family list is the one behind the README's coverage table (``python benchmarks/zoo.py --markdown``).
"""
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

import fxprune
from helpers import randomize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo import ALL_FAMILIES, FAMILIES  # noqa: E402

BATCHES = (2, 3)  # the trace uses the model's default input, batch 1
TOLERANCE = 1e-5  # relative; the worst family is below 1e-6
SMALLER = {family: {"depth": 2} for family in ("ViT", "DeiT", "DeiT3")}  # 12 identical blocks: two say as much
SMALLER["SAM-ViT"] = {"depth": 1, "img_size": 64}
# families of the zoo's MORE_FAMILIES whose attention prunes, each for the rule that made it possible
MORE_SUPPORTED = {
    "SAM-ViT": "einsum (decomposed relative positions: q against a table every head shares) and get_rel_pos",
    "CAFormer": "the zoo built it with arguments caformer_s18 fixes itself",
    "ViTamin": "the zoo built it with a tuple depth",
    "FastViT": "fastvit_sa12 (the t/s variants have no attention)",
    "NesT": "heads merged inside the channel dim ((d, heads) -> d * heads) keep the same offsets",
    "EfficientViT-MSRA": "export graph: aten.batch_norm, in-place activations, depthwise aten.conv2d groups",
    "HaloNet": "Tensor.unfold (overlapping key/value windows)",
    "LowFormer": "ConvTranspose2d (the upsampling that reads v)",
    "LambdaNet": "Conv3d whose kernel leaves the channel dim alone (position lambdas)",
    "CoaT": "heads split between depthwise convolutions of several kernel sizes: each group has its heads' rows",
    "EfficientViT-MIT": "grouped 1x1 convolution (each group's own weight columns) and a constant pad beside v",
    "CaiT": "heads too: the talking heads' proj_l / proj_w lose the removed heads' rows and columns",
    "XCiT": "heads too: the per-head temperature on the channel x channel map follows its head",
    "EdgeNeXt": "heads too: its transposed attention's per-head temperature follows its head",
    "MobileViT-v2": "no q·kᵀ: key and value channels pooled by a one-channel context score are v (query stays)",
    "SwiftFormer": "no q·kᵀ: additive attention; the query/key channels pooled by its weights over tokens are v",
    "Visformer": "heads too: heads merged into a 1x1 convolution's input channels end at its weight columns",
    "CoAtNet": "heads too: heads merged into a 1x1 convolution's input channels end at its weight columns",
    "MaxViT": "heads too: the relative position bias (timm's tf-style einsum lookup) follows the heads",
}
IN_FLOAT64 = {  # masked-equal exactly, but float32 rounding through the deep reparameterised conv stem reaches ~4e-5
    "FastViT": "float64 error 4e-14",
    # with half its heads and a quarter of its channels gone, float32 rounding reaches 2e-3 on some inputs
    "Visformer": "float64 error 3e-15",
}
MLP_ONLY = {  # attention stays whole in these; only MLPs shrink, so neither this test nor the zoo calls them supported
    "MViT-v2": "q/k/v normalised per head (LayerNorm over head_dim); heads share the pooling convs' and norms' offsets",
}


def _build(family: str) -> torch.nn.Module:
    name, kwargs = ALL_FAMILIES[family]
    torch.manual_seed(0)
    return randomize(timm.create_model(name, **{**kwargs, **SMALLER.get(family, {})})).eval()


def _removable_heads(analysis) -> bool:
    return any(g.kind == "heads" and g.prunable for g in analysis.groups)


def _tensor(gm: torch.nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(path) if path else gm, attr)


def _shrunk_kinds(analysis, plan, pruned) -> set:
    """Kinds of the channel groups whose parameters are physically narrower in ``pruned``."""
    kinds = set()
    for name, rows in plan.removed.items():
        group = analysis.group(name)
        if any(rows) and any(_tensor(pruned, s.param).shape[s.dim] < analysis.tensor(s.param).shape[s.dim]
                             for s in group.members):
            kinds.add(group.kind)
    return kinds


@pytest.mark.parametrize("family", list(FAMILIES) + list(MORE_SUPPORTED) + sorted(MLP_ONLY))
def test_family_prunes_equal_to_masked_on_fresh_batches(family):
    model = _build(family)
    dtype = torch.float64 if family in IN_FLOAT64 else torch.float32
    if family in IN_FLOAT64:
        model = model.to(dtype)
        analysis = fxprune.analyze(model, (torch.randn(1, *model.pretrained_cfg["input_size"], dtype=dtype),))
    else:
        analysis = fxprune.analyze(model)
    inputs = analysis.captured.example_inputs
    assert inputs[0].shape[0] == 1
    heads = _removable_heads(analysis)
    with warnings.catch_warnings():  # MLP-only families remove less than asked, and say so
        warnings.simplefilter("ignore", fxprune.PruningShortfallWarning)
        plan = fxprune.plan(analysis, 0.25, head_ratio=0.5 if heads else 0.0)
    pruned = fxprune.apply(analysis, plan)
    # export graphs lift tensor constants the model does not hold by that name: mask the captured graph
    exported = analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD) == "torch.export"
    reference = fxprune.mask(analysis if exported else model, plan, example_inputs=inputs)
    generator = torch.Generator().manual_seed(1)
    for batch in BATCHES:
        x = torch.randn(batch, *inputs[0].shape[1:], generator=generator, dtype=dtype)
        with torch.no_grad():
            actual = pruned(x)
            assert actual.shape[0] == batch
            assert fxprune.relative_error(actual, reference(x)) < TOLERANCE, batch
            if batch == BATCHES[0]:  # what was removed mattered, so the equality says something
                assert fxprune.relative_error(actual, model(x)) > 10 * TOLERANCE
    assert fxprune.count_macs(pruned, inputs) < fxprune.count_macs(model, inputs)
    shrunk = _shrunk_kinds(analysis, plan, pruned)
    if family in MLP_ONLY:  # when attention becomes prunable here, move the family out of MLP_ONLY
        assert shrunk == {"mlp"}, MLP_ONLY[family]
    else:
        assert shrunk & {"qk", "v"}, "supported, yet attention did not shrink"
        heads_removed = any(analysis.group(g).kind == "heads" and any(rows) for g, rows in plan.removed.items())
        assert heads_removed or not heads, "whole heads are removable here, yet none were removed"


@pytest.mark.parametrize("family, mixers", [("CaiT", ("attn.proj_l.weight", "attn.proj_w.weight")),
                                             ("XCiT", ("attn.temperature",))])
def test_per_head_parameters_lose_the_removed_heads(family, mixers):
    """CaiT's talking heads mix the heads' maps (Linear over the head dim, before and after the softmax) and XCiT
    scales each head's channel x channel map by its own temperature: removing half the heads halves them."""
    model = _build(family)
    analysis = fxprune.analyze(model)
    pruned = fxprune.prune(analysis, 0.0, head_ratio=0.5)
    for name in mixers:
        before = analysis.tensor(f"blocks.0.{name}").shape
        after = pruned.get_parameter(f"blocks.0.{name}").shape
        assert after == tuple(n // 2 if n == before[0] else n for n in before), (name, before, after)
    x = torch.randn(2, *analysis.captured.example_inputs[0].shape[1:])
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=analysis.captured.example_inputs)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), reference(x)) < TOLERANCE


def test_gemma4_heads_go_whole_where_the_channels_are_normalised_per_head():
    """Gemma4-ViT normalises q, k and v over each head (RMSNorm: whole heads only), so no channel can go alone.
    Its 2D rotary embedding rotates each half of a head on its own (two sliced regions whose pairs lie wholly
    inside one of them): heads keep their own rows, so whole heads go, exactly."""
    name, kwargs = ALL_FAMILIES["Gemma4-ViT"]
    model = randomize(timm.create_model(name, **{**kwargs, "depth": 1})).eval()
    analysis = fxprune.analyze(model)
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert heads and all(g.prunable for g in heads), [g.frozen for g in heads]
    attention = [g for g in analysis.groups if g.kind in ("qk", "v")]
    assert attention and all(any("normalised over these channels" in r for r in g.frozen) for g in attention)
    with warnings.catch_warnings():  # the channels stay: less is removed than asked
        warnings.simplefilter("ignore", fxprune.PruningShortfallWarning)
        pruned = fxprune.prune(analysis, 0.25, head_ratio=0.5)
    assert pruned.get_parameter("encoder.blocks.0.attn.q_proj.linear.weight").shape[0] == 6 * 64
    x = torch.randn(2, *analysis.captured.example_inputs[0].shape[1:])
    reference = fxprune.mask(analysis, fxprune.plan_of(pruned))
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), reference(x)) < TOLERANCE


def test_mvit_v2_says_why_its_attention_stays():
    """MViT-v2's pooling attention is seen through timm's notrace functions (reshape_pre_pool / reshape_post_pool,
    cal_rel_pos_type): q, k and v are normalised over each head's channels (a real constraint: only whole heads
    could go), and the depthwise pooling convs, the norms and the relative position tables are shared by every
    head, so every head keeps the same offsets and whole heads cannot go either."""
    model = _build("MViT-v2")
    analysis = fxprune.analyze(model)
    assert not [op for op in analysis.unknown_ops if op.touched_channels]
    attention = [g for g in analysis.groups if g.kind in ("qk", "v")]
    assert attention and all(any("normalised over these channels" in r for r in g.frozen) for g in attention)
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert heads and all(any("shared across heads" in r for r in g.frozen) for g in heads)
