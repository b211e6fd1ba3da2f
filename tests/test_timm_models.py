"""The models the core issue names, at 224x224 (random init): pruning equals masking."""
import pytest
import timm
import torch

import fxprune
from helpers import randomize

MODELS = {
    "deit_tiny_patch16_224": {},
    "deit_small_patch16_224": {},
    "deit3_small_patch16_224": {},
    "vit_small_patch14_reg4_dinov2": {"img_size": 224},
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_analysis(request):
    model = randomize(timm.create_model(request.param, **MODELS[request.param])).eval()
    return model, fxprune.analyze(model)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_named_model_prunes_equal_to_masked(model_and_analysis, ratio):
    model, analysis = model_and_analysis
    plan = fxprune.plan(analysis, ratio)
    pruned = fxprune.apply(analysis, plan)
    kinds = {analysis.group(name).kind for name in plan.removed}
    assert kinds == {"qk", "v", "mlp"}
    x = torch.randn(2, 3, 224, 224)
    masked = fxprune.mask(model, plan)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), masked(x)) < 1e-5
    assert fxprune.count_params(pruned) < (1 - ratio * 0.9) * fxprune.count_params(model)
