import pytest
import torch

from tacq_lite.core import quant


def _w(rows=16, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("groupsize", [-1, 16])
def test_levels_and_error_bound(bits, sym, groupsize):
    W = _w()
    scale, zero = quant.find_params(W, bits=bits, sym=sym, groupsize=groupsize)
    codes = quant.quantize(W, scale, zero, bits=bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    for row in codes:  # at most 2**bits distinct levels per row
        assert row.unique().numel() <= 2**bits
    W_hat = quant.dequantize(codes, scale, zero)
    # min/max range: every weight lies inside the grid, so the error is at most half a step
    step = scale.repeat_interleave(W.shape[1] // scale.shape[1], dim=1)
    assert ((W_hat - W).abs() <= step / 2 + 1e-6).all()


def test_idempotent():
    W = _w()
    once = quant.quantize_dequantize(W, bits=3, groupsize=16)
    twice = quant.quantize_dequantize(once, bits=3, groupsize=16)
    assert torch.allclose(once, twice, atol=1e-6)


def test_symmetric_grid_is_centred_and_asymmetric_fits_shifted_data():
    W = _w().abs() + 1.0  # all positive: an asymmetric grid wastes nothing, a symmetric one half
    s_sym, z_sym = quant.find_params(W, bits=4, sym=True)
    s_asym, z_asym = quant.find_params(W, bits=4, sym=False)
    assert torch.all(z_sym == 8)  # (maxq + 1) / 2
    err_sym = (quant.quantize_dequantize(W, bits=4, sym=True) - W).pow(2).mean()
    err_asym = (quant.quantize_dequantize(W, bits=4, sym=False) - W).pow(2).mean()
    assert err_asym < err_sym


def test_grouping_shapes_and_per_tensor():
    W = _w(8, 64)
    s, z = quant.find_params(W, bits=4, groupsize=16)
    assert s.shape == z.shape == (8, 4)
    s, z = quant.find_params(W, bits=4, per_tensor=True)
    assert s.shape == (1, 1)
    W_hat = quant.quantize_dequantize(W, bits=4, per_tensor=True)
    assert W_hat.unique().numel() <= 16
    # finer granularity never hurts on the same data
    errs = [(quant.quantize_dequantize(W, bits=3, **kw) - W).pow(2).sum()
            for kw in ({"per_tensor": True}, {"groupsize": -1}, {"groupsize": 16})]
    assert errs[0] >= errs[1] >= errs[2]


def test_mse_search_reduces_error_with_outliers():
    W = _w(32, 128)
    W[:, 0] = 12.0  # one outlier column stretches min/max
    plain = (quant.quantize_dequantize(W, bits=3) - W).abs().pow(2.4).sum()
    searched = (quant.quantize_dequantize(W, bits=3, mse=True) - W).abs().pow(2.4).sum()
    assert searched < plain


def _mse_search_with_pow(x, *, bits, sym):
    """Score every shrink factor with pow, the plain way the screened search must reproduce."""
    p = 1 - torch.arange(80, dtype=x.dtype) / 100  # [P]
    xmin, xmax = x.min(1).values, x.max(1).values  # [n]
    s, z = quant._range_to_params((xmin[:, None] * p).flatten(), (xmax[:, None] * p).flatten(), maxq=2**bits - 1,
                                  sym=sym)
    s, z = s.view(len(x), len(p), 1), z.view(len(x), len(p), 1)  # [n, P, 1]
    err = (torch.clamp(torch.round(x[:, None] / s + z), 0, 2**bits - 1) - z) * s - x[:, None]  # [n, P, g]
    best = err.abs().pow(2.4).sum(-1).argmin(1, keepdim=True)  # [n, 1]
    return s[..., 0].gather(1, best)[:, 0], z[..., 0].gather(1, best)[:, 0]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("g", [8, 64, 576])
def test_mse_search_picks_what_scoring_every_range_with_pow_picks(bits, sym, g):
    """The log/exp screen only shortlists; the grid chosen must be exactly pow's choice, ties included."""
    gen = torch.Generator().manual_seed(bits * 1000 + g)
    x = torch.randn(max(64, 16384 // g), g, generator=gen)  # [n, g]
    x[::3] = x[::3] ** 3  # heavy tails: the best range then shrinks
    x[1::5] = torch.round(x[1::5] * 2) / 2  # values on a coarse grid: exact ties between ranges
    want_s, want_z = _mse_search_with_pow(x, bits=bits, sym=sym)
    s, z = quant.find_params(x, bits=bits, sym=sym, mse=True)  # [n, 1]
    assert torch.equal(s[:, 0], want_s) and torch.equal(z[:, 0], want_z)


def test_mask_ignored_in_fit_and_exact():
    W = _w(8, 32)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[2, 5] = mask[6, 0] = True
    W_out = W.clone()
    W_out[mask] = 1000.0  # huge outliers at the kept positions
    s_free, _ = quant.find_params(W, bits=3, mask=mask)
    s_masked, _ = quant.find_params(W_out, bits=3, mask=mask)
    assert torch.allclose(s_free, s_masked)  # the outliers did not stretch the grid
    W_hat = quant.quantize_dequantize(W_out, bits=3, mask=mask)
    assert torch.equal(W_hat[mask], W_out[mask])
    full = torch.ones_like(mask)
    assert torch.equal(quant.quantize_dequantize(W, bits=3, mask=full), W)  # every weight kept


@pytest.mark.parametrize("bits", [0, 1, 5, 16])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quant.find_params(_w(), bits=bits)


def test_bad_groupsize_names_divisors():
    with pytest.raises(ValueError, match="does not divide.*576"):
        quant.find_params(torch.randn(4, 576), bits=4, groupsize=128)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(bad):
    W = _w()
    W[3, 3] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        quant.quantize_dequantize(W, bits=4)


@pytest.mark.parametrize("bad_scale, bad_zero", [(0.0, 1.0), (-0.1, 1.0), (float("nan"), 1.0), (float("inf"), 1.0),
                                                 (0.1, float("nan")), (0.1, float("inf"))])
def test_bad_grid_is_refused(bad_scale, bad_zero):
    W = _w()
    scale, zero = quant.find_params(W, bits=4, groupsize=16)  # [16, 4]
    scale[2, 1], zero[2, 1] = bad_scale, bad_zero
    with pytest.raises(ValueError, match="1 of 64 groups have a scale <= 0 or a NaN/Inf scale or zero; fit"):
        quant.quantize(W, scale, zero, bits=4)


def test_grids_find_params_returns_are_accepted():
    W = _w()
    W[0] = 0  # an all-zero row gets the range [-1, 1], never a zero scale
    W[1] = 1e-30
    for sym in (False, True):
        for mse in (False, True):
            scale, zero = quant.find_params(W, bits=3, sym=sym, mse=mse)
            assert (scale > 0).all()
            quant.quantize(W, scale, zero, bits=3)


@pytest.mark.parametrize("shape", [(0, 64), (16, 0), (0, 0)])
def test_empty_weight_is_refused(shape):
    with pytest.raises(ValueError, match="W is empty"):
        quant.find_params(torch.empty(shape), bits=4)
    with pytest.raises(ValueError, match="W is empty"):
        quant.quantize(torch.empty(shape), torch.ones(1, 1), torch.zeros(1, 1), bits=4)


def test_bad_mask():
    W = _w()
    with pytest.raises(TypeError, match="bool"):
        quant.find_params(W, bits=3, mask=torch.zeros_like(W))
    with pytest.raises(ValueError, match="shape"):
        quant.find_params(W, bits=3, mask=torch.zeros(3, 3, dtype=torch.bool))
