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


def _spectrum(images):
    """Translation- and contrast-invariant features: the 2-D spectrum magnitude of each standardised grey image."""
    grey = images.mean(1)
    grey = (grey - grey.mean((1, 2), keepdim=True)) / grey.std((1, 2), keepdim=True).clamp_min(1e-6)
    return torch.fft.fft2(grey).abs().flatten(1)


def test_shape_labels_carry_signal():
    # class centroids of one seed's images classify another seed's images far above chance (10 %); with the
    # labels shuffled against the images this drops to chance
    x, y = offline.shapes(1000, seed=0)
    fresh, truth = offline.shapes(500, seed=1)
    features = _spectrum(x)
    centroids = torch.stack([features[y == c].mean(0) for c in range(10)])
    predicted = torch.cdist(_spectrum(fresh), centroids).argmin(1)
    accuracy = float((predicted == truth).float().mean())
    assert accuracy > 0.5


def test_digits_are_normalised_rgb_images():
    datasets = pytest.importorskip("sklearn.datasets")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x, y = offline.digits(28)
    assert x.shape == (1797, 3, 28, 28) and y.tolist() == datasets.load_digits().target.tolist()
    grey = x * std + mean  # undoing ImageNet's per-channel normalisation gives one grey image in [0, 1]
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 0], grey[:, 2], atol=1e-5)
    assert float(grey.min()) > -1e-5 and float(grey.max()) < 1 + 1e-5
    small, _ = offline.digits(8)  # at the native size the pixels are sklearn's, scaled from 0..16 to 0..1
    expected = torch.tensor(datasets.load_digits().images, dtype=torch.float32) / 16
    assert torch.allclose((small * std + mean)[:, 0], expected, atol=1e-5)


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


def test_torch_pruning_rounds_widths_when_asked():
    """benchmarks/speed.py compares fxprune and Torch-Pruning at equal round_to: peer.py must pass it through."""
    pytest.importorskip("torch_pruning")
    import peer

    torch.manual_seed(0)
    model = offline.create_tiny("tiny-deit").eval()
    x, _ = offline.shapes(1, seed=1)

    def widths(round_to):
        pruned = peer.prune_at_ratio(model, x, 0.3, None, keep_output_width=False, round_to=round_to)
        return [m.out_features for n, m in pruned.named_modules() if n.endswith(("attn.qkv", "mlp.fc1"))]

    assert all(w % 8 == 0 for w in widths(8))
    assert any(w % 8 for w in widths(1))
