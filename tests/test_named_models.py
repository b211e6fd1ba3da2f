"""The full-size models the issues name (random init, re-drawn at unit scale): pruning equals masking."""
import pytest
import timm
import torch
import torchvision

import fxprune
from helpers import randomize

MODELS = {  # name -> (factory, input side, [(ratio, head_ratio), ...])
    "deit_tiny_patch16_224": (lambda: timm.create_model("deit_tiny_patch16_224"), 224, [(0.3, 0), (0.5, 0)]),
    "deit_small_patch16_224": (lambda: timm.create_model("deit_small_patch16_224"), 224, [(0.3, 0), (0.5, 0)]),
    "deit3_small_patch16_224": (lambda: timm.create_model("deit3_small_patch16_224"), 224, [(0.3, 0), (0.5, 0)]),
    "vit_small_patch14_reg4_dinov2": (lambda: timm.create_model("vit_small_patch14_reg4_dinov2", img_size=224), 224,
                                      [(0.3, 0), (0.5, 0)]),
    "swin_tiny_patch4_window7_224": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), 224, [(0.5, 0.5)]),
    "swinv2_tiny_window8_256": (lambda: timm.create_model("swinv2_tiny_window8_256"), 256, [(0.5, 0.5)]),
    "torchvision_vit_b_16": (lambda: torchvision.models.vit_b_16(), 224, [(0.5, 0.5)]),
    "torchvision_swin_t": (lambda: torchvision.models.swin_t(), 224, [(0.5, 0.5)]),
}
CASES = [(name, ratio, heads) for name, (_, _, cases) in MODELS.items() for ratio, heads in cases]


@pytest.fixture(scope="module")
def analysed():
    cache = {}

    def get(name):
        if name not in cache:
            factory, side, _ = MODELS[name]
            model = randomize(factory()).eval()
            cache.clear()  # keep one large model in memory at a time
            cache[name] = (model, fxprune.analyze(model, (torch.randn(1, 3, side, side),)), side)
        return cache[name]

    return get


@pytest.mark.parametrize("name,ratio,head_ratio", CASES)
def test_named_model_prunes_equal_to_masked(analysed, name, ratio, head_ratio):
    model, analysis, side = analysed(name)
    plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    kinds = {analysis.group(g).kind for g in plan.removed}
    assert kinds == ({"qk", "v", "mlp", "heads"} if head_ratio else {"qk", "v", "mlp"})
    x = torch.randn(2, 3, side, side)
    masked = fxprune.mask(model, plan, example_inputs=analysis.captured.example_inputs)
    with torch.no_grad():
        expected = masked(x)
        assert fxprune.relative_error(pruned(x), expected) < 1e-5
        assert fxprune.relative_error(expected, model(x)) > 1e-2  # the plan really changed the model
    assert fxprune.count_params(pruned) < (1 - ratio * 0.9) * fxprune.count_params(model)
