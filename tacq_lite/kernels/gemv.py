"""Fused dequantize + matmul for small batches: y = x @ W_finalᵀ, W_final = where(mask, kept, W_hat).

TaCQ (arXiv 2504.07389) keeps ~0.35 % of weights in fp16 and quantizes the rest.
Decoding runs inside the matmul, so only the packed codes (bits / 16 of the fp16 bytes)
cross the memory bus; at batch 1-16 that traffic is what sets the speed.

Kept weights: the CSR `values` are the kept weights as stored, and the codes at kept positions are
whatever the quantizer wrote there. The kernel first adds the dense part over every
position, x @ W_hatᵀ, then for each kept (r, j) adds x[:, j] * (value - W_hat[r, j]), with
W_hat[r, j] decoded again from the same codes. The sum equals x @ W_finalᵀ whatever code
sits under a kept weight, and the CSR stays a plain copy of the kept weights.

The Triton kernel uses broadcast multiply + tl.sum (no tl.dot), so every block dim is a
power of two and M = 1 is legal. The torch reference materializes W_final and calls matmul.
"""
from __future__ import annotations

import torch

from ..core.pack import CODES_PER_WORD, SparseKept, check_kept, check_packed
from .dequant import dequantize_packed_ref

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: only gemv_ref is usable
    triton = tl = None

    def jit(fn):
        return fn


MAX_M = 16  # the GEMV kernel's batch limit; larger batches should dequantize once then matmul
X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _gemv_blocks(M: int) -> dict:
    """Block sizes and warps for a batch of M rows of x.

    M = 1 (decoding one token) uses the fastest of a sweep on an H100 (bench/tune_kernels.py,
    figures in BENCHMARKS.md): small row blocks on one warp. M > 1 keeps the sizes chosen
    before any GPU measurement, BLOCK_M * BLOCK_N * BLOCK_K <= 8192 on 4 warps; they passed
    the GPU tests but were not swept.
    """
    BLOCK_M = triton.next_power_of_2(M)
    if BLOCK_M == 1:
        return dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=256, BLOCK_NNZ=32, num_warps=1)
    BLOCK_N = 16
    BLOCK_K = min(256, 8192 // (BLOCK_M * BLOCK_N))
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_NNZ=32, num_warps=4)


@jit
def _decode(packed_ptr, scale_ptr, zero_ptr, r, j, ok, groupsize,
            stride_pr, stride_sr, stride_sg, stride_zr, stride_zg,
            BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """W_hat[r, j] for broadcastable index tensors r, j: one load + shift + mask (pack.py layout)."""
    word = tl.load(packed_ptr + r * stride_pr + j // PER_WORD, mask=ok, other=0)
    q = (word >> ((j % PER_WORD) * BITS)) & ((1 << BITS) - 1)
    g = j // groupsize  # per-element gather of the grid: works for any groupsize, hits L1 on a GPU
    s = tl.load(scale_ptr + r * stride_sr + g * stride_sg, mask=ok, other=0).to(tl.float32)
    z = tl.load(zero_ptr + r * stride_zr + g * stride_zg, mask=ok, other=0).to(tl.float32)
    return s * (q.to(tl.float32) - z)  # masked-off entries decode to 0


@jit
def _gemv_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, y_ptr,
    M, rows, cols, groupsize,
    stride_xm, stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, stride_ym,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, HAS_KEPT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] batch rows
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows of W
    m_ok = offs_m < M
    n_ok = offs_n < rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # dense part: x @ W_hatᵀ over all positions
    for k0 in range(0, cols, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = offs_k < cols
        W = _decode(packed_ptr, scale_ptr, zero_ptr, offs_n[:, None], offs_k[None, :],
                    n_ok[:, None] & k_ok[None, :], groupsize,
                    stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, BITS, PER_WORD)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        acc += tl.sum(x[:, None, :] * W[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_KEPT:
        # kept part: x[:, j] * (value - W_hat[r, j]) for the CSR entries of this row block
        lo = tl.load(row_ptr_ptr + offs_n, mask=n_ok, other=0)  # [BLOCK_N] first entry of each row
        hi = tl.load(row_ptr_ptr + offs_n + 1, mask=n_ok, other=0)  # [BLOCK_N] one past its last
        start = tl.load(row_ptr_ptr + tl.program_id(0) * BLOCK_N)
        end = tl.load(row_ptr_ptr + tl.minimum(tl.program_id(0) * BLOCK_N + BLOCK_N, rows))
        for p0 in range(start, end, BLOCK_NNZ):
            offs_p = p0 + tl.arange(0, BLOCK_NNZ)  # [BLOCK_NNZ] entry ids
            p_ok = offs_p < end
            owner = (offs_p[None, :] >= lo[:, None]) & (offs_p[None, :] < hi[:, None])  # [BLOCK_N, BLOCK_NNZ] one-hot row
            r = tl.sum(tl.where(owner, offs_n[:, None], 0), axis=0)  # [BLOCK_NNZ] row of each entry
            j = tl.load(col_idx_ptr + offs_p, mask=p_ok, other=0).to(tl.int32)  # [BLOCK_NNZ]
            v = tl.load(values_ptr + offs_p, mask=p_ok, other=0).to(tl.float32)  # [BLOCK_NNZ]
            W_hat = _decode(packed_ptr, scale_ptr, zero_ptr, r, j, p_ok, groupsize,
                            stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, BITS, PER_WORD)
            xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + j[None, :],
                         mask=m_ok[:, None] & p_ok[None, :], other=0).to(tl.float32)  # [BLOCK_M, BLOCK_NNZ]
            xd = xj * (v - W_hat)[None, :]  # [BLOCK_M, BLOCK_NNZ]
            acc += tl.sum(xd[:, None, :] * owner[None, :, :].to(tl.float32), axis=2)  # scatter to rows
    y_ok = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def _check(x, packed, scale, zero, kept, *, bits, groupsize):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, cols], got shape {tuple(x.shape)}; flatten leading dims first.")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be one of {X_DTYPES}, got {x.dtype}.")
    cols = x.shape[1]
    rows, gs = check_packed(packed, scale, zero, bits=bits, cols=cols, groupsize=groupsize)
    if kept is not None:
        check_kept(kept, rows, cols)
    for name, t in [("packed", packed), ("scale", scale), ("zero", zero)] + ([] if kept is None else [("kept", kept.values)]):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}.")
    return rows, cols, gs


def gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    groupsize: int,
) -> torch.Tensor:
    """Triton: x [M <= 16, cols] -> y [M, rows] in x's dtype, y = x @ W_finalᵀ."""
    rows, cols, gs = _check(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize)
    M = x.shape[0]
    if not 1 <= M <= MAX_M:
        raise ValueError(f"gemv handles 1 <= M <= {MAX_M} rows of x, got {M}; dequantize once and matmul instead.")
    if triton is None:
        raise RuntimeError("triton is not installed; use gemv_ref or backend='torch'.")
    x, packed = x.contiguous(), packed.contiguous()
    scale, zero = scale.expand(rows, -1), zero.expand(rows, -1)  # per-tensor [1, 1] -> stride 0
    row_ptr, col_idx, values = kept if kept is not None else (packed, packed, packed)  # unused when HAS_KEPT=0
    y = torch.empty(M, rows, dtype=x.dtype, device=x.device)  # [M, rows]
    cfg = _gemv_blocks(M)
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]),)
    _gemv_kernel[grid](
        x, packed, scale, zero, row_ptr, col_idx, values, y,
        M, rows, cols, gs,
        x.stride(0), packed.stride(0), scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1), y.stride(0),
        BITS=bits, PER_WORD=CODES_PER_WORD[bits], HAS_KEPT=kept is not None, **cfg,
    )
    return y


def gemv_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    groupsize: int,
) -> torch.Tensor:
    """Pure torch: x [M, cols] -> y [M, rows]; materializes W_final in fp32 (any M)."""
    _, cols, _ = _check(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize)
    W = dequantize_packed_ref(packed, scale, zero, kept, bits=bits, cols=cols, groupsize=groupsize,
                              dtype=torch.float32)  # [rows, cols]
    return (x.float() @ W.T).to(x.dtype)  # [M, rows]
