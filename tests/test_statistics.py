"""Calibration moments (statistics.Moments): the sums compensation and the reconstruction criterion solve with."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxprune.statistics import Moments
from helpers import examples


def _explicit(xs, ys, columns, ones):
    x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    x = x if columns is None else x[:, columns]
    if ones:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    y = torch.cat([y.reshape(-1, y.shape[-1]) for y in ys]).double()
    return x.T @ x, x.T @ y, float(y.square().sum()), len(x)


@settings(max_examples=examples(25))
@given(width=st.integers(1, 700), outs=st.integers(1, 9), batches=st.integers(1, 2 * Moments.FLUSH + 1),
       ones=st.booleans(), select=st.booleans(), mean=st.sampled_from([0.0, 30.0]), double=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_moments_are_the_explicit_sums(width, outs, batches, ones, select, mean, double, seed):
    """Every batch count around the float64 flush, Gram blocks (widths past BLOCK), a column selection, inputs
    with large means (the shift), float32 and float64 inputs: the explicit float64 sums, to float32 precision."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    xs = [(torch.randn(2, 5, width + 3, generator=generator) + mean).to(dtype) for _ in range(batches)]
    ys = [(torch.randn(2, 5, outs, generator=generator) - mean).to(dtype) for _ in range(batches)]
    columns = torch.randperm(width + 3, generator=generator)[:width].sort().values if select else None
    moments = Moments(ones=ones)
    for x, y in zip(xs, ys):
        moments.add(x, y, columns=columns)
    gram, cross, yy, rows = _explicit(xs, ys, columns if select else None, ones)
    tolerance = 1e-12 if double else 1e-6
    assert moments.rows == rows
    assert torch.allclose(moments.gram, gram, rtol=tolerance, atol=tolerance * float(gram.abs().max()))
    assert torch.allclose(moments.gram, moments.gram.T)
    assert torch.allclose(moments.cross, cross, rtol=tolerance, atol=tolerance * float(cross.abs().max()))
    assert moments.yy == pytest.approx(yy, rel=tolerance)


def test_the_shift_keeps_float32_sums_of_large_means_precise():
    """Inputs whose mean is 1000 times their spread: the centred part of the Gram (what a fit with a bias
    depends on) comes out far closer than float32 products of the raw rows give it."""
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 16, generator=generator) * 1e-3 + 1.0 for _ in range(4)]
    moments = Moments(ones=True)
    for x in xs:
        moments.add(x, x[:, :2])
    rows = torch.cat(xs).double()
    centred = lambda g, s, n: g - torch.outer(s, s) / n  # noqa: E731
    exact = centred(rows.T @ rows, rows.sum(0), len(rows))
    raw = torch.cat(xs)
    naive = centred((raw.T @ raw).double(), raw.sum(0).double(), len(rows))
    ours = centred(moments.gram[:16, :16], moments.gram[16, :16], len(rows))
    assert (ours - exact).abs().max() < 1e-3 * (naive - exact).abs().max()


def test_moments_without_rows_say_so():
    with pytest.raises(ValueError, match="no calibration rows"):
        Moments().gram
