"""The offline data and the peer wrapper the benchmarks rely on (benchmarks/ is not a package)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import offline  # noqa: E402


def test_shapes_are_balanced_deterministic_and_fresh_per_seed():
    x, y = offline.shapes(200, seed=3)
    assert x.shape == (200, 3, 32, 32) and torch.isfinite(x).all()
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    x2, y2 = offline.shapes(200, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(offline.shapes(200, seed=4)[0], x)


def test_shape_classes_differ_from_each_other():
    # the mean image of each class must differ, otherwise the labels carry no signal
    x, y = offline.shapes(2000, seed=0)
    centroids = torch.stack([x[y == c].std(0).flatten() for c in range(10)])
    distances = torch.cdist(centroids, centroids) + torch.eye(10) * 1e9
    assert float(distances.min()) > 0.5


def test_digits_are_normalised_rgb_images():
    pytest.importorskip("sklearn")
    x, y = offline.digits(28)
    assert x.shape == (1797, 3, 28, 28) and y.max() == 9
    assert abs(float(x.mean())) < 2.5


def test_tiny_models_build_and_run():
    x, _ = offline.shapes(2, seed=0)
    for name in offline.TINY_MODELS:
        assert offline.create_tiny(name)(x).shape == (2, 10)


def test_torch_pruning_reaches_the_macs_target():
    pytest.importorskip("torch_pruning")
    import fxprune
    import peer

    torch.manual_seed(0)
    model = offline.create_tiny("tiny-deit").eval()
    x, y = offline.shapes(64, seed=1)
    pruned, _, note = peer.prune_to_macs(model, x[:1], 0.6, [(x, y)], log=lambda m: None)
    assert pruned is not None, note
    fraction = fxprune.count_macs(pruned, (x[:1],)) / fxprune.count_macs(model, (x[:1],))
    assert abs(fraction - 0.6) < 0.02
    assert pruned(x[:2]).shape == (2, 10)
