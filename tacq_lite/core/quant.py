"""Uniform (affine) quantization of weight matrices: the round-to-nearest grid.

A weight w becomes an integer code q = clamp(round(w / scale + zero), 0, maxq) with
maxq = 2**bits - 1 and comes back as scale * (q - zero). `scale` and `zero` are fitted per
tensor, per output channel (row) or per group of `groupsize` consecutive input columns.
The optional MSE grid search over shrunken ranges follows GPTQ (Frantar et al., 2022,
arXiv 2210.17323, `quant.py`): norm 2.4, grid 100, max shrink 0.8.

Shapes: W [rows, cols]; scale, zero [rows, n_groups] (n_groups = 1 per channel,
cols // groupsize per group) or [1, 1] per tensor; codes uint8 [rows, cols].
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}.")
    return bits


def check_weight(W: torch.Tensor, name: str = "W") -> None:
    if W.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [rows, cols] matrix, got shape {tuple(W.shape)}.")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(W.shape)}); pass a matrix with at least one row and column.")
    if not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {W.dtype}.")
    if not torch.isfinite(W).all():
        bad = (~torch.isfinite(W)).sum().item()
        raise ValueError(f"{name} holds {bad} NaN/Inf values; fix or reload the model before quantizing.")


def check_groupsize(groupsize: int, cols: int) -> int:
    """Return the effective group size; -1 means one group per row (per channel)."""
    if groupsize == -1:
        return cols
    if groupsize <= 0 or cols % groupsize != 0:
        divisors = [g for g in (32, 64, 128, 256) if cols % g == 0]
        raise ValueError(
            f"groupsize={groupsize} does not divide the input dimension {cols}; "
            f"use -1 (per channel) or one of {divisors or 'its divisors'}."
        )
    return groupsize


def check_mask(mask: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = keep in 16-bit), got {mask.dtype}.")
    if mask.shape != W.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(W.shape)}.")
    return mask


def fill_masked(W: torch.Tensor, mask: torch.Tensor | None, groupsize: int) -> torch.Tensor:
    """Replace kept weights by the mean of the unmasked weights of their row-group.

    Kept weights stay in 16-bit, so they must not stretch the grid (TaCQ, Sec. 3.3).
    A row-group whose weights are all kept is filled with zeros.
    """
    if mask is None or not mask.any():
        return W
    rows, cols = W.shape
    Wg = W.reshape(rows, cols // groupsize, groupsize)  # [rows, n_groups, groupsize]
    keep = mask.reshape(rows, cols // groupsize, groupsize)
    free = (~keep).to(W.dtype)
    mean = (Wg * free).sum(-1, keepdim=True) / free.sum(-1, keepdim=True).clamp_min(1)  # [rows, n_groups, 1]
    return torch.where(keep, mean, Wg).reshape(rows, cols)


def _range_to_params(xmin, xmax, *, maxq: int, sym: bool, round_zero: bool = True):
    # xmin/xmax [n]; the grid always contains 0 (GPTQ convention), so zero padding is exact.
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = -xmin / scale
        zero = torch.round(zero) if round_zero else zero
    return scale, zero


def _mse_search(x, xmin, xmax, *, maxq, sym, norm, grid, maxshrink, round_zero, budget=1 << 13, slack=1e-4):
    """Try ranges shrunk by p = 1, 0.99, ... and keep, per row, the one with least sum |err|^norm.

    x [n, g]; all shrink factors of a chunk of rows are scored at once ([rows, P, g]), which
    is about twice as fast on CPU as one pass over x per factor. Ties keep the widest range.
    `budget` (elements of x per chunk) keeps the [rows, P, g] temporary near 2.6 MB, in cache;
    the in-place chain below allocates it once.

    |err|^2.4 by `pow` is most of the search's time on CPU, so every shrink factor is first
    scored with exp(norm · log|err|), about three times cheaper and within ~2e-6 of `pow` per
    element. Only the factors within `slack` (relative) of a row's best screened score can be
    its best, and only those (usually one or two of the 80) are scored again with `pow`: the
    result is exactly what scoring all of them with `pow` gives.
    """
    p = 1 - torch.arange(int(maxshrink * grid), dtype=x.dtype, device=x.device) / grid  # [P]
    scales, zeros = [], []
    step = max(1, budget // x.shape[1])
    for r in range(0, x.shape[0], step):
        xc = x[r : r + step, None, :]  # [c, 1, g]
        s, z = _range_to_params((xmin[r : r + step, None] * p).flatten(), (xmax[r : r + step, None] * p).flatten(),
                                maxq=maxq, sym=sym, round_zero=round_zero)
        s, z = s.view(-1, len(p), 1), z.view(-1, len(p), 1)  # [c, P, 1]
        # |s·(clamp(round(x/s + z), 0, maxq) − z) − x|, in one buffer
        err = torch.div(xc, s).add_(z).round_().clamp_(0, maxq).sub_(z).mul_(s).sub_(xc).abs_()  # [c, P, g]
        screen = torch.log(err).mul_(norm).exp_().sum(-1)  # [c, P] ≈ Σ |err|^norm
        near = screen <= screen.amin(1, keepdim=True) * (1 + slack)  # [c, P] the candidates for the best
        ci, pi = near.nonzero(as_tuple=True)  # [K] each
        score = torch.full_like(screen, float("inf"))  # [c, P]
        score[ci, pi] = err[ci, pi].pow_(norm).sum(-1)  # [K, g] -> [K], exact
        best = score.argmin(1, keepdim=True)  # [c, 1]; the first minimum = the widest range
        scales.append(s[..., 0].gather(1, best)[:, 0])
        zeros.append(z[..., 0].gather(1, best)[:, 0])
    return torch.cat(scales), torch.cat(zeros)


def find_params(
    W: torch.Tensor,
    *,
    bits: int,
    sym: bool = False,
    groupsize: int = -1,
    per_tensor: bool = False,
    mse: bool = False,
    mask: torch.Tensor | None = None,
    norm: float = 2.4,  # GPTQ's error norm for the range search
    grid: int = 100,  # number of shrink steps tried
    maxshrink: float = 0.8,  # shrink the range by at most 80 %
    round_zero: bool = True,  # integer zero point (GPTQ); False = float offset, as GGUF's Q4_1 stores it
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit scale and zero for W. Returns (scale, zero), each [rows, n_groups] or [1, 1]."""
    check_bits(bits)
    check_weight(W)
    maxq = 2**bits - 1
    rows, cols = W.shape
    gs = check_groupsize(groupsize, cols)
    check_mask(mask, W)
    x = fill_masked(W.float(), mask, gs)  # [rows, cols]
    if per_tensor:
        x = x.reshape(1, -1)  # one "group" holding every weight
    else:
        x = x.reshape(rows * (cols // gs), gs)  # [rows * n_groups, groupsize]
    xmin, xmax = x.min(1).values, x.max(1).values  # [n]
    scale, zero = _range_to_params(xmin, xmax, maxq=maxq, sym=sym, round_zero=round_zero)
    if mse:
        scale, zero = _mse_search(x, xmin, xmax, maxq=maxq, sym=sym, norm=norm, grid=grid, maxshrink=maxshrink,
                                  round_zero=round_zero)
    shape = (1, 1) if per_tensor else (rows, cols // gs)
    return scale.reshape(shape), zero.reshape(shape)


def _expand(p: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows|1, n_groups] -> [rows|1, cols] by repeating each group's value."""
    return p.repeat_interleave(cols // p.shape[1], dim=1)


def _check_params(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
    if scale.shape != zero.shape or scale.dim() != 2:
        raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} must share a 2-D shape.")
    if scale.shape[0] not in (1, W.shape[0]) or scale.shape[1] == 0 or W.shape[1] % scale.shape[1] != 0:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit a {tuple(W.shape)} matrix.")


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits - 1], uint8 [rows, cols]."""
    check_bits(bits)
    check_weight(W)
    _check_params(W, scale, zero)
    # find_params always returns scale > 0 (a constant-zero group gets the range [-1, 1]); a scale
    # <= 0 or NaN/Inf would turn every code of its group into garbage. [rows|1, n_groups], cheap.
    bad = int((~((scale > 0) & torch.isfinite(scale) & torch.isfinite(zero))).sum())
    if bad:
        raise ValueError(f"{bad} of {scale.numel()} groups have a scale <= 0 or a NaN/Inf scale or zero; fit the "
                         "grid with find_params(W, bits=...).")
    cols = W.shape[1]
    q = torch.round(W.float() / _expand(scale, cols) + _expand(zero, cols))  # = round(W/s) + z for integer z
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 [rows, cols] = scale * (codes - zero)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}.")
    _check_params(codes, scale, zero)
    cols = codes.shape[1]
    return _expand(scale, cols) * (codes.float() - _expand(zero, cols))


def quantize_dequantize(
    W: torch.Tensor,
    *,
    bits: int,
    sym: bool = False,
    groupsize: int = -1,
    per_tensor: bool = False,
    mse: bool = False,
    mask: torch.Tensor | None = None,
    round_zero: bool = True,
) -> torch.Tensor:
    """Round-to-nearest fake quantization in W's dtype; kept (mask=True) weights come back exact."""
    scale, zero = find_params(W, bits=bits, sym=sym, groupsize=groupsize, per_tensor=per_tensor, mse=mse, mask=mask,
                              round_zero=round_zero)
    W_hat = dequantize(quantize(W, scale, zero, bits=bits), scale, zero).to(W.dtype)  # [rows, cols]
    return W_hat if mask is None else torch.where(mask, W, W_hat)
