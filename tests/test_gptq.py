"""Tests for tacq_lite.algo.gptq: parity with a plain float64 GPTQ, error vs RTN, TaCQ's mask, bad inputs."""
import pytest
import torch
from torch import nn

from tacq_lite.algo import gptq as gptq_module
from tacq_lite.algo.gptq import GPTQ, inverse_hessian, reconstruction_error
from tacq_lite.core import quant


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """x [n, cols] with strongly correlated columns and uneven scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.5 + torch.eye(cols)  # [cols, cols]
    col_scale = torch.rand(cols, generator=g) * 2 + 0.1  # [cols]
    return (torch.randn(n, cols, generator=g) @ mix) * col_scale  # [n, cols]


def make_layer(rows: int, cols: int, n: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(rows, cols, generator=g)  # [rows, cols]
    x = correlated_inputs(n, cols, seed)  # [n, cols]
    gptq = GPTQ(W)
    gptq.add_batch(x)
    return W, x, gptq


def reference_gptq(W, H, *, bits, groupsize, sym, mse, percdamp, actorder, mask=None):
    """Plain GPTQ, one column at a time, in float64 (Frantar et al. 2022, Alg. 1 without lazy blocks).

    With `mask`, TaCQ's masked GPTQ as the authors' gptq/gptq.py runs it (l. 207-297): a kept
    weight is left out of the grid fit, stored with its working value and sends no error.
    """
    W0 = W.clone()
    W = W.double().clone()  # [rows, cols]
    H = H.double().clone()  # [cols, cols]
    rows, cols = W.shape
    maxq = 2**bits - 1
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    keep = torch.zeros(W.shape, dtype=torch.bool) if mask is None else mask[:, perm]  # [rows, cols]
    damp = percdamp * torch.diag(H).mean()
    U = torch.linalg.cholesky(torch.linalg.inv(H + damp * torch.eye(cols, dtype=H.dtype)), upper=True)
    static = groupsize == -1 or actorder  # all grids fitted up front on the original W
    if static:
        scale, zero = quant.find_params(W0, bits=bits, sym=sym, groupsize=groupsize, mse=mse, mask=mask)
    Q = torch.zeros_like(W)
    loss = 0.0
    for i in range(cols):
        if static:
            g = perm[i].item() // groupsize if groupsize > 0 else 0
            s, z = scale[:, g], zero[:, g]
        elif i % groupsize == 0:  # a new group: fit on the current, error-updated columns
            m = None if mask is None else keep[:, i : i + groupsize]
            s, z = quant.find_params(W[:, i : i + groupsize].float(), bits=bits, sym=sym, mse=mse, mask=m)
            s, z = s[:, 0], z[:, 0]
        s, z = s.double(), z.double()
        q = s * (torch.clamp(torch.round(W[:, i] / s) + z, 0, maxq) - z)  # [rows]
        q = torch.where(keep[:, i], W[:, i], q)  # a kept weight: its working value, no error
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        loss += (err.square() / 2).sum().item()
        W[:, i + 1 :] -= torch.outer(err, U[i, i + 1 :])
    return Q[:, torch.argsort(perm)], loss


# ---------------------------------------------------------------- parity ----


@pytest.mark.parametrize(
    "groupsize, blocksize, actorder, sym, mse",
    [
        (-1, 8, False, False, True),  # per channel, several blocks
        (8, 8, False, False, False),  # groups aligned with blocks
        (12, 8, False, False, False),  # a group that starts mid-block and runs past it
        (16, 5, False, True, False),  # blocks not dividing cols, symmetric
        (-1, 8, True, False, True),  # act-order
        (8, 8, True, False, False),  # act-order with static groups
    ],
)
def test_matches_float64_reference(groupsize, blocksize, actorder, sym, mse):
    W, x, gptq = make_layer(16, 48)
    res = gptq.quantize(bits=3, groupsize=groupsize, blocksize=blocksize, actorder=actorder, sym=sym, mse=mse)
    Q_ref, loss_ref = reference_gptq(
        W, gptq.H, bits=3, groupsize=groupsize, sym=sym, mse=mse, percdamp=0.01, actorder=actorder
    )
    close = (res.W_hat.double() - Q_ref).abs() <= 1e-5
    assert close.float().mean() >= 0.995, f"{(~close).sum()} entries differ"
    assert res.loss == pytest.approx(loss_ref, rel=1e-3)
    # The codes dequantize to W_hat.
    torch.testing.assert_close(quant.dequantize(res.codes, res.scale, res.zero), res.W_hat)


def test_loss_is_the_layer_error():
    """GPTQ's bookkeeping is exact: loss = ½ tr(ΔW (H + damp I) ΔWᵀ) ≈ ‖x ΔWᵀ‖² / n."""
    W, x, gptq = make_layer(16, 48)
    gptq.add_batch(correlated_inputs(100, 48, seed=7))  # a second batch: running mean
    x = torch.cat([x, correlated_inputs(100, 48, seed=7)])
    torch.testing.assert_close(gptq.H, 2 / len(x) * x.T @ x, rtol=1e-4, atol=1e-4)
    res = gptq.quantize(bits=2, blocksize=16, percdamp=1e-4)
    dW = (W - res.W_hat).double()
    H = gptq.H.double() + res.damp * torch.eye(48, dtype=torch.float64)
    assert res.loss == pytest.approx(0.5 * torch.trace(dW @ H @ dW.T).item(), rel=1e-3)
    assert res.loss == pytest.approx(reconstruction_error(x, W, res.W_hat), rel=1e-2)


def test_hinv_diag_in_original_order():
    W, x, gptq = make_layer(8, 24)
    res = gptq.quantize(bits=4, actorder=True)
    H = gptq.H.double() + res.damp * torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(res.Hinv_diag.double(), torch.diag(torch.linalg.inv(H)), rtol=1e-3, atol=0)
    assert res.damp == pytest.approx(0.01 * torch.diag(gptq.H).mean().item())


# ---------------------------------------------------------- vs RTN ----


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("groupsize", [-1, 16])
def test_beats_round_to_nearest(bits, groupsize):
    W, x, gptq = make_layer(32, 64, n=512, seed=3)
    res = gptq.quantize(bits=bits, groupsize=groupsize, blocksize=16)
    rtn = quant.quantize_dequantize(W, bits=bits, groupsize=groupsize, mse=True)
    assert reconstruction_error(x, W, res.W_hat) < 0.8 * reconstruction_error(x, W, rtn)


def test_layer_is_not_modified():
    layer = nn.Linear(24, 8)
    before = layer.weight.detach().clone()
    gptq = GPTQ(layer)
    gptq.add_batch(torch.randn(4, 10, 24))  # [batch, seq, cols]
    assert gptq.nsamples == 40
    res = gptq.quantize(bits=2)
    assert torch.equal(layer.weight.detach(), before)
    assert not torch.equal(res.W_hat, before)


# ------------------------------------------------------------ mask ----


@pytest.mark.parametrize("groupsize", [-1, 8])
def test_mask_keeps_weights_and_ignores_them_in_the_grid(groupsize):
    W, x, gptq = make_layer(16, 32, seed=5)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(16, 32, generator=g) < 0.05  # [rows, cols]
    W_out = torch.where(mask, 1000.0 * torch.sign(W), W)  # huge outliers on the kept positions
    gptq_out = GPTQ(W_out)
    gptq_out.H, gptq_out.nsamples = gptq.H.clone(), gptq.nsamples
    same = GPTQ(W)
    same.H, same.nsamples = gptq.H.clone(), gptq.nsamples
    for keep_value in ("original", "compensated"):
        res = gptq_out.quantize(bits=3, groupsize=groupsize, blocksize=8, mask=mask, keep_value=keep_value)
        # The grid ignores the outliers: same scales as the same run on W without them.
        res_plain = same.quantize(bits=3, groupsize=groupsize, blocksize=8, mask=mask, keep_value=keep_value)
        torch.testing.assert_close(res.scale, res_plain.scale)
        torch.testing.assert_close(res.W_hat[~mask], res_plain.W_hat[~mask])
        assert res.scale.max() < 10  # an outlier in the fit would give scale ≈ 2000 / 7
        if keep_value == "original":
            assert torch.equal(res.W_hat[mask], W_out[mask])  # bit-exact
        else:  # the updates pushed onto a kept weight do not depend on its own value
            torch.testing.assert_close(res.W_hat[mask] - W_out[mask], res_plain.W_hat[mask] - W[mask],
                                       atol=1e-4, rtol=0)
    # Without a mask the outliers would dominate the grid.
    assert gptq_out.quantize(bits=3, groupsize=groupsize).scale.max() > 100
    if groupsize == -1:  # per channel the scale is fitted once, exactly as quant does
        scale, zero = quant.find_params(W_out, bits=3, mse=True, mask=mask)
        assert torch.equal(res.scale, scale) and torch.equal(res.zero, zero)


@pytest.mark.parametrize(
    "groupsize, blocksize, actorder, mse",
    [
        (-1, 8, False, True),  # per channel, several blocks
        (12, 8, False, False),  # a group that starts mid-block and runs past it
        (-1, 8, True, False),  # act-order
    ],
)
def test_masked_matches_float64_reference(groupsize, blocksize, actorder, mse):
    """Kept entries hold the compensated working value, as a plain column-by-column float64 run says."""
    W, x, gptq = make_layer(16, 48, seed=13)
    mask = torch.rand(16, 48, generator=torch.Generator().manual_seed(3)) < 0.08  # [rows, cols]
    res = gptq.quantize(bits=3, groupsize=groupsize, blocksize=blocksize, actorder=actorder, mse=mse, mask=mask)
    Q_ref, loss_ref = reference_gptq(W, gptq.H, bits=3, groupsize=groupsize, sym=False, mse=mse, percdamp=0.01,
                                     actorder=actorder, mask=mask)
    close = (res.W_hat.double() - Q_ref).abs() <= 1e-5
    assert close.float().mean() >= 0.995, f"{(~close).sum()} entries differ"
    torch.testing.assert_close(res.W_hat[mask].double(), Q_ref[mask], atol=1e-4, rtol=0)
    assert res.loss == pytest.approx(loss_ref, rel=1e-3)
    # The kept values really moved: compensation reached them (the reference says by how much).
    moved = (Q_ref[mask] - W[mask].double()).abs()
    assert moved.max() > 1e-2 and (res.W_hat[mask] != W[mask]).float().mean() > 0.5


@pytest.mark.parametrize("groupsize, actorder", [(-1, False), (8, False), (8, True)])
def test_original_is_compensated_with_the_original_values_put_back(groupsize, actorder):
    """keep_value="original" is the pre-2026-11-29 behaviour: the same pass, the original value written
    back at the end. The quantized entries, grids and loss do not depend on what a kept weight stores,
    because a kept weight sends no error either way."""
    W, x, gptq = make_layer(24, 48, seed=17)
    mask = torch.rand(24, 48, generator=torch.Generator().manual_seed(5)) < 0.05  # [rows, cols]
    comp = gptq.quantize(bits=2, groupsize=groupsize, actorder=actorder, blocksize=16, mask=mask)
    orig = gptq.quantize(bits=2, groupsize=groupsize, actorder=actorder, blocksize=16, mask=mask,
                         keep_value="original")
    assert torch.equal(orig.W_hat, torch.where(mask, W, comp.W_hat))
    for a, b in zip(comp[1:4], orig[1:4]):  # codes, scale, zero
        assert torch.equal(a, b)
    assert comp.loss == orig.loss
    assert not torch.equal(comp.W_hat[mask], W[mask])  # the two options do differ


def test_a_kept_weight_in_a_dead_column_keeps_its_original_value():
    """A dead input column receives no updates (its row and column of H are 0), so its working value
    is the original one: both keep_values store it unchanged (the authors' code zeroes it, l. 135)."""
    W, x, _ = make_layer(8, 24, seed=6)
    x[:, 5] = 0  # input 5 is never switched on
    gptq = GPTQ(W)
    gptq.add_batch(x)
    mask = torch.zeros(8, 24, dtype=torch.bool)
    mask[[1, 4], 5] = True
    mask[2, 10] = True
    for keep_value in ("compensated", "original"):
        res = gptq.quantize(bits=2, blocksize=8, mask=mask, keep_value=keep_value)
        assert torch.equal(res.W_hat[[1, 4], 5], W[[1, 4], 5])
    assert res.W_hat[2, 10] == W[2, 10]  # "original"; the compensated one moved
    comp = gptq.quantize(bits=2, blocksize=8, mask=mask)
    assert comp.W_hat[2, 10] != W[2, 10]


def test_keep_value_needs_a_mask_to_matter():
    W, x, gptq = make_layer(8, 24, seed=4)
    a = gptq.quantize(bits=3, keep_value="original")
    b = gptq.quantize(bits=3)
    assert torch.equal(a.W_hat, b.W_hat) and a.loss == b.loss
    with pytest.raises(ValueError, match="keep_value='exact' is unknown"):
        gptq.quantize(bits=3, mask=torch.zeros(8, 24, dtype=torch.bool), keep_value="exact")


def test_kept_column_pushes_no_error():
    """A fully kept first column emits no error and, being first, receives none: the other
    columns must come out exactly as GPTQ on W[:, 1:] with H[1:, 1:] (same damping)."""
    W, x, gptq = make_layer(16, 32, seed=11)
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[:, 0] = True
    res = gptq.quantize(bits=3, blocksize=8, mse=False, mask=mask)
    sub = GPTQ(W[:, 1:].contiguous())
    sub.H, sub.nsamples = gptq.H[1:, 1:].clone(), gptq.nsamples
    percdamp = 0.01 * torch.diag(gptq.H).mean().item() / torch.diag(sub.H).mean().item()  # same damp
    res_sub = sub.quantize(bits=3, blocksize=8, mse=False, percdamp=percdamp)
    assert torch.equal(res.W_hat[:, 0], W[:, 0])
    torch.testing.assert_close(res.W_hat[:, 1:], res_sub.W_hat, atol=1e-5, rtol=0)
    assert res.loss == pytest.approx(res_sub.loss, rel=1e-4)
    # Guard: had column 0 been quantized, its error would have moved the others.
    res_nomask = gptq.quantize(bits=3, blocksize=8, mse=False)
    assert not torch.allclose(res_nomask.W_hat[:, 1:], res_sub.W_hat, atol=1e-3)


def test_fully_kept_row():
    W, x, gptq = make_layer(8, 24, seed=2)
    mask = torch.zeros(8, 24, dtype=torch.bool)
    mask[3] = True
    res = gptq.quantize(bits=2, blocksize=8, mask=mask)
    res_nomask = gptq.quantize(bits=2, blocksize=8)
    assert torch.equal(res.W_hat[3], W[3])
    others = torch.arange(8) != 3
    torch.testing.assert_close(res.W_hat[others], res_nomask.W_hat[others], atol=1e-6, rtol=0)
    assert res.loss < res_nomask.loss


# ------------------------------------------------- dead inputs, Cholesky ----


@pytest.mark.parametrize("groupsize", [-1, 8])
def test_all_zero_inputs_give_round_to_nearest(groupsize):
    W = torch.randn(8, 24, generator=torch.Generator().manual_seed(4))
    gptq = GPTQ(W)
    gptq.add_batch(torch.zeros(32, 24))
    res = gptq.quantize(bits=3, groupsize=groupsize, blocksize=8)
    assert torch.equal(res.W_hat, quant.quantize_dequantize(W, bits=3, groupsize=groupsize, mse=True))
    assert res.loss == 0.0


def test_dead_column_is_rounded_and_decoupled():
    W, x, _ = make_layer(8, 24, seed=6)
    x[:, 5] = 0
    gptq = GPTQ(W)
    gptq.add_batch(x)
    res = gptq.quantize(bits=3, blocksize=8)
    rtn = quant.dequantize(quant.quantize(W, res.scale, res.zero, bits=3), res.scale, res.zero)
    assert torch.equal(res.W_hat[:, 5], rtn[:, 5])
    assert torch.isfinite(res.W_hat).all()


def test_inverse_hessian_is_the_upper_cholesky_factor_of_the_damped_inverse():
    x = torch.randn(200, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    H = 2 / 200 * x.T @ x  # [24, 24]
    U, diag, damp = inverse_hessian(H, percdamp=0.01)
    want = torch.linalg.cholesky(torch.linalg.inv(H + damp * torch.eye(24, dtype=H.dtype)), upper=True)
    assert damp == pytest.approx(0.01 * torch.diag(H).mean().item())
    assert torch.equal(U, U.triu()) and (torch.diag(U) > 0).all()
    torch.testing.assert_close(U, want)  # the Cholesky factor is unique: the same matrix
    torch.testing.assert_close(diag, torch.diag(torch.linalg.inv(H + damp * torch.eye(24, dtype=H.dtype))))


def test_cholesky_retries_with_more_damping():
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))  # indefinite: damp 0.00625 and 0.0625 fail
    Hinv_chol, Hinv_diag, damp = inverse_hessian(H, percdamp=0.01)
    assert damp == pytest.approx(100 * 0.01 * 0.625)
    Hinv = torch.linalg.inv(H + damp * torch.eye(4))
    torch.testing.assert_close(Hinv_chol.T @ Hinv_chol, Hinv)
    torch.testing.assert_close(Hinv_diag, torch.diag(Hinv))
    with pytest.raises(RuntimeError, match="percdamp"):
        inverse_hessian(torch.diag(torch.tensor([1.0, 1.0, 1.0, -1e6])), percdamp=0.01)


# ------------------------------------------------------ bad inputs ----


def test_quantize_before_add_batch():
    with pytest.raises(RuntimeError, match="add_batch"):
        GPTQ(torch.randn(4, 8)).quantize(bits=4)


def test_add_batch_wrong_width():
    with pytest.raises(ValueError, match="input columns"):
        GPTQ(torch.randn(4, 8)).add_batch(torch.randn(3, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_add_batch_rejects_non_finite_inputs_and_keeps_the_hessian(bad):
    gptq = GPTQ(torch.randn(4, 8))
    gptq.add_batch(torch.randn(5, 8))
    H, n = gptq.H.clone(), gptq.nsamples
    x = torch.randn(3, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        gptq.add_batch(x)
    assert torch.equal(gptq.H, H) and gptq.nsamples == n


def test_not_a_layer():
    with pytest.raises(TypeError, match="weight"):
        GPTQ("W")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mask=torch.zeros(4, 7, dtype=torch.bool)), ValueError, "mask shape"),
        (dict(mask=torch.zeros(4, 8)), TypeError, "bool"),
        (dict(blocksize=0), ValueError, "blocksize"),
        (dict(percdamp=0.0), ValueError, "percdamp"),
        (dict(bits=5), ValueError, "bits"),
        (dict(groupsize=3), ValueError, "groupsize"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    gptq = GPTQ(torch.randn(4, 8))
    gptq.add_batch(torch.randn(16, 8))
    kwargs = {"bits": 4, **kwargs}
    with pytest.raises(error, match=match):
        gptq.quantize(**kwargs)


def test_copy_stats_from_gives_the_hessian_of_the_same_inputs():
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(3))
    fed, copied = GPTQ(torch.randn(4, 16)), GPTQ(torch.randn(6, 16))
    fed.add_batch(x[:1])
    fed.add_batch(x[1:])
    copied.copy_stats_from(fed)
    direct = GPTQ(torch.randn(6, 16))
    for window in x:
        direct.add_batch(window[None])
    assert torch.allclose(copied.H, direct.H) and copied.nsamples == direct.nsamples == 16
    fed.H += 1  # a copy, not a view
    assert torch.allclose(copied.H, direct.H)
    with pytest.raises(ValueError, match="input columns"):
        GPTQ(torch.randn(4, 12)).copy_stats_from(fed)


def test_blocked_hessian_is_symmetric_and_matches_the_full_product(monkeypatch):
    """add_batch computes only H's upper row blocks; reading H mirrors them, exactly symmetric."""
    monkeypatch.setattr(gptq_module, "HESSIAN_BLOCK", 16)
    cols = 56  # 4 row blocks of 14
    gptq = GPTQ(torch.zeros(4, cols))
    xs = [correlated_inputs(30, cols, seed=s) for s in (1, 2, 3)]
    for x in xs:
        gptq.add_batch(x)
        assert gptq._stale_lower  # the lower blocks are not written by add_batch
    x = torch.cat(xs)
    assert gptq._bounds == [0, 14, 28, 42, 56]
    torch.testing.assert_close(gptq.H, 2 / len(x) * x.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.equal(gptq.H, gptq.H.T)
    # One more batch after a read keeps accumulating correctly.
    extra = correlated_inputs(30, cols, seed=4)
    gptq.add_batch(extra)
    x = torch.cat([x, extra])
    torch.testing.assert_close(gptq.H, 2 / len(x) * x.T @ x, rtol=1e-5, atol=1e-5)
    assert torch.equal(gptq.H, gptq.H.T)
    # Without mirroring, the lower blocks would be wrong: the check above could fail.
    raw = gptq._H.clone()
    raw[14:, :14] = 0
    assert not torch.allclose(raw, 2 / len(x) * x.T @ x, rtol=1e-5, atol=1e-5)
