"""Reweight nodes: least-squares fit, compensation, exact folding, and re-pruning a reweighted model."""
import torch

import fxprune
from fxprune.rewrite.reweight import PREFIX, fit_reweight
from helpers import small_vit

X = torch.randn(1, 3, 16, 16)
DATA = [torch.randn(8, 3, 16, 16) for _ in range(3)]


def test_fit_solves_the_least_squares_problem():
    torch.manual_seed(0)
    weight, inputs = torch.randn(5, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64) + 0.3
    kept = torch.tensor([0, 2, 3, 5])
    scale, bias = fit_reweight(weight, inputs, kept, ridge=0.0)
    # explicit design: prediction[n, o] = sum_k W[o, k] (x[n, k] s_k + b_k)
    w_k, x_k = weight[:, kept], inputs[:, kept]
    design = torch.cat([(x_k[:, None, :] * w_k[None]).reshape(-1, 4), w_k.repeat(40, 1)], 1)
    target = (inputs @ weight.T).reshape(-1)
    expected = torch.linalg.lstsq(design, target[:, None]).solution.flatten()
    assert torch.allclose(torch.cat([scale, bias]), expected, atol=1e-8)


def _output_error(model, pruned, data):
    with torch.no_grad():
        return sum(float((pruned(x) - model(x)).square().sum()) for x in data) / sum(float(model(x).square().sum()) for x in data)


def test_reweights_compensate_and_fold_exactly():
    model = small_vit(num_heads=2, embed_per_head=8, depth=2)
    analysis = fxprune.analyze(model, (X,))
    plan = fxprune.plan(analysis, 0.5)
    plain = fxprune.apply(analysis, plan)
    reweighted = fxprune.apply(analysis, plan, reweight_data=DATA, compensation="reweight")
    names = [n for n, _ in reweighted.named_parameters() if n.startswith(PREFIX)]
    assert len(names) == 2 * 2 * 2  # proj and fc2 of both blocks: a scale and a bias each
    assert _output_error(model, reweighted, DATA) < _output_error(model, plain, DATA)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = reweighted(x)
        assert fxprune.fold_reweights(reweighted) == 4
        assert fxprune.relative_error(reweighted(x), before) < 1e-5
    assert not any(n.startswith(PREFIX) for n, _ in reweighted.named_parameters())
    assert fxprune.count_params(reweighted) == fxprune.count_params(plain)


def test_reweighted_model_trains_and_prunes_again():
    model = small_vit(num_heads=2, embed_per_head=8, depth=1)
    reweighted = fxprune.prune(model, 0.25, example_inputs=(X,), reweight_data=DATA, compensation="reweight")
    loss = reweighted(torch.randn(2, 3, 16, 16)).square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in reweighted.named_parameters() if n.startswith(PREFIX))
    reweighted.eval()
    analysis = fxprune.analyze(reweighted, (X,))
    plan = fxprune.plan(analysis, 0.5)
    again = fxprune.apply(analysis, plan)
    reference = fxprune.mask(analysis, plan)
    with torch.no_grad():
        assert fxprune.relative_error(again(X), reference(X)) < 1e-5
