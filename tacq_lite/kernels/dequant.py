"""Dequantize packed low-bit codes to a dense matrix: W = scale * (q - zero).

Triton kernel, its wrapper and a pure-torch reference with the same signature. The layout is
the one of `tacq_lite.core.pack` (per_word = 32 // bits codes per int32 along cols), so a single
load + shift + mask decodes every bit width. Kept weights (TaCQ, arXiv 2504.07389)
overwrite the dequantized values at their positions when `kept` is given: on Triton a second
kernel walks each row's CSR segment and stores its values, so nothing waits on the host.
"""
from __future__ import annotations

import torch

from ..core.pack import CODES_PER_WORD, SparseKept, check_kept, check_packed, kept_rows, unpack
from ..core.quant import dequantize as dequantize_codes

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: only dequantize_packed_ref is usable
    triton = tl = None

    def jit(fn):
        return fn


OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@jit
def _dequant_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr,
    rows, cols, groupsize,
    stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, stride_or,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    ok = (offs_r < rows)[:, None] & (offs_c < cols)[None, :]  # [BLOCK_R, BLOCK_C]
    word = tl.load(packed_ptr + offs_r[:, None] * stride_pr + (offs_c // PER_WORD)[None, :], mask=ok, other=0)
    q = (word >> ((offs_c % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)  # [BLOCK_R, BLOCK_C]
    g = (offs_c // groupsize)[None, :]  # group of each column
    s = tl.load(scale_ptr + offs_r[:, None] * stride_sr + g * stride_sg, mask=ok, other=0).to(tl.float32)
    z = tl.load(zero_ptr + offs_r[:, None] * stride_zr + g * stride_zg, mask=ok, other=0).to(tl.float32)
    W = s * (q.to(tl.float32) - z)  # same op order as quant.dequantize -> bitwise equal in fp32
    tl.store(out_ptr + offs_r[:, None] * stride_or + offs_c[None, :], W.to(out_ptr.dtype.element_ty), mask=ok)


@jit
def _scatter_kept_kernel(
    row_ptr_ptr, col_idx_ptr, values_ptr, out_ptr, rows, stride_or,
    BLOCK_R: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    """out[r, col_idx[p]] = values[p] for the CSR entries p of BLOCK_R rows, a [BLOCK_R, BLOCK_NNZ] tile at a time."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    r_ok = offs_r < rows
    lo = tl.load(row_ptr_ptr + offs_r, mask=r_ok, other=0)  # [BLOCK_R] first entry of each row
    hi = tl.load(row_ptr_ptr + offs_r + 1, mask=r_ok, other=0)  # [BLOCK_R] one past its last
    for t0 in range(0, tl.max(hi - lo, axis=0), BLOCK_NNZ):
        p = lo[:, None] + t0 + tl.arange(0, BLOCK_NNZ)[None, :]  # [BLOCK_R, BLOCK_NNZ] entry ids, row by row
        ok = p < hi[:, None]
        j = tl.load(col_idx_ptr + p, mask=ok, other=0).to(tl.int32)
        v = tl.load(values_ptr + p, mask=ok, other=0)
        tl.store(out_ptr + offs_r[:, None] * stride_or + j, v.to(out_ptr.dtype.element_ty), mask=ok)


SCATTER_BLOCKS = dict(BLOCK_R=32, BLOCK_NNZ=16, num_warps=2)  # ~14 kept per 4096-wide row at 0.35 %


def _dequant_blocks() -> dict:
    """Tile and warps: the fastest of a sweep on an H100 (bench/tune_kernels.py, BENCHMARKS.md)."""
    return dict(BLOCK_R=8, BLOCK_C=64, num_warps=2)


def _check(packed, scale, zero, kept, *, bits, cols, groupsize, dtype):
    rows, gs = check_packed(packed, scale, zero, bits=bits, cols=cols, groupsize=groupsize)
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {OUT_DTYPES}, got {dtype}.")
    if kept is not None:
        check_kept(kept, rows, cols)
    return rows, gs


def _write_kept(W: torch.Tensor, kept: SparseKept | None) -> torch.Tensor:
    if kept is not None and kept.values.numel():
        W[kept_rows(kept), kept.col_idx.long()] = kept.values.to(W.dtype)  # kept weights replace W_hat
    return W


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    cols: int,
    groupsize: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Triton: packed int32 [rows, words] -> dense `dtype` [rows, cols] (kept weights written in)."""
    rows, gs = _check(packed, scale, zero, kept, bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)
    if triton is None:
        raise RuntimeError("triton is not installed; use dequantize_packed_ref or backend='torch'.")
    packed = packed.contiguous()
    scale = scale.expand(rows, -1)  # per-tensor [1, 1] -> stride 0 over rows
    zero = zero.expand(rows, -1)
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)  # [rows, cols]
    cfg = _dequant_blocks()
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, cfg["BLOCK_C"]))
    _dequant_kernel[grid](
        packed, scale, zero, out,
        rows, cols, gs,
        packed.stride(0), scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1), out.stride(0),
        BITS=bits, PER_WORD=CODES_PER_WORD[bits], **cfg,
    )
    if kept is not None and kept.values.numel():  # after the dense decode, on the same stream
        _scatter_kept_kernel[(triton.cdiv(rows, SCATTER_BLOCKS["BLOCK_R"]),)](
            kept.row_ptr, kept.col_idx, kept.values, out, rows, out.stride(0), **SCATTER_BLOCKS)
    return out


def dequantize_packed_ref(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    cols: int,
    groupsize: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Pure torch: unpack the codes, then quant.dequantize; same contract as dequantize_packed."""
    rows, _ = _check(packed, scale, zero, kept, bits=bits, cols=cols, groupsize=groupsize, dtype=dtype)
    codes = unpack(packed, bits=bits, cols=cols)  # uint8 [rows, cols]
    W = dequantize_codes(codes, scale.expand(rows, -1), zero.expand(rows, -1))  # fp32 [rows, cols]
    return _write_kept(W.to(dtype), kept)
