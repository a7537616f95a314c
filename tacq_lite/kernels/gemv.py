"""Fused dequantize + matmul for small batches: y = x @ W_finalᵀ, W_final = where(mask, kept, W_hat).

TaCQ (arXiv 2504.07389) keeps ~0.35 % of weights in fp16 and quantizes the rest. Decoding one
token reads every weight once, so at batch 1-16 the bytes that cross the memory bus set the
speed, and the packed codes are bits / 16 of the fp16 bytes. The kernel is built so that each
of those bytes is read once:

- **One load per packed word.** A program loads a [BLOCK_N rows, BLOCK_W words] tile of int32
  words and unpacks all codes of each word with shifts into a [BLOCK_N, BLOCK_W, LANES] tile
  (LANES = per_word rounded up to a power of two; 3-bit words hold 10 codes, so 6 of 16 lanes
  are masked off).
- **One scale and zero per group and row.** The loop runs over quantization groups. Within a
  group, y_r += s_rg * (Σ_k x_k q_rk − z_rg Σ_k x_k): the inner sum needs only the codes, and
  the grid is applied once per group. A word that straddles two groups (3-bit: 128 is not a
  multiple of 10) is read by both groups' iterations, the second time from cache. A per-channel
  or per-tensor grid has one group per row; its loop runs over column segments of
  `SEGMENT_WORDS` words with the same scale (group stride 0).
- **Split-K.** When the row blocks alone give too few programs to fill the GPU, a second grid
  axis splits the groups into SPLIT_K contiguous ranges; each program adds its partial sums into
  an fp32 output with `tl.atomic_add` (the summation order then varies from run to run, within
  fp32 rounding).
- **fp32 accumulation** from fp16 / bf16 / fp32 inputs. For M > 1 the code tile goes through
  `tl.dot` (tensor cores on a GPU; the batch is padded to 16 rows).
- **Kept weights as a CSR correction, row segment by row segment.** The dense part runs over
  every position, codes under kept weights included; then for each kept (r, j) the kernel adds
  x[j] * (value − W_hat[r, j]), with W_hat[r, j] decoded again from the same codes. The sum
  equals x @ W_finalᵀ whatever code sits under a kept weight. The entries of the program's rows
  are read as a [BLOCK_N, BLOCK_NNZ] tile, row r's segment row_ptr[r]:row_ptr[r + 1] in tile row
  r, so each correction lands in its row's accumulator without any scatter.

Block sizes come from `gemv_configs`, a short list per shape; on a GPU `tuning.pick` times them
once per (rows, cols, bits, groupsize, M, dtype, device) and keeps the fastest. The torch
reference `gemv_ref` materializes W_final and calls matmul.
"""
from __future__ import annotations

import torch

from ..core.pack import CODES_PER_WORD, SparseKept, check_kept, check_packed
from . import tuning
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
DOT_M = 16  # M > 1 pads the batch to 16 rows for tl.dot (each dot dim >= 16 on a GPU)
SEGMENT_WORDS = 32  # column segment (in packed words) for a grid with one group per row


def lanes(bits: int) -> int:
    """Codes per word rounded up to a power of two: the last dim of the unpacked tile."""
    per = CODES_PER_WORD[bits]
    return 1 << (per - 1).bit_length()


def segment_words(cols: int, bits: int, groupsize: int) -> int:
    """Most packed words one loop segment touches: a group's codes plus the word it may share with
    the next group (3-bit g128: 13 or 14 words), or SEGMENT_WORDS for one group per row."""
    per = CODES_PER_WORD[bits]
    if groupsize == cols:
        return SEGMENT_WORDS
    return -(-groupsize // per) + (1 if groupsize % per else 0)


ENOUGH_PROGRAMS = 4 * 132  # split-K stops adding programs past four per SM of an H100 / H200 (132 SMs)


def gemv_configs(rows: int, cols: int, bits: int, groupsize: int, M: int) -> list[dict]:
    """The configurations the tuner times for one GEMV shape; the first is used untimed (CPU).

    BLOCK_N output rows and BLOCK_W packed words per tile, SPLIT_K ranges of groups, warps.
    BLOCK_W covers one segment's words in one step (16 at 3-bit g128), so no lanes of the tile
    are spent outside the group; the list is short on purpose (each entry costs a compile and a
    timing on first use): tiles of 4-32 rows, and split factors that take the number of
    programs from the row blocks alone up to ENOUGH_PROGRAMS. For M > 1, BLOCK_N >= 16 and
    BLOCK_W * LANES >= 16, as tl.dot needs on a GPU. groupsize: resolved (cols for one group).
    """
    L = lanes(bits)
    fit = 1 << (segment_words(cols, bits, groupsize) - 1).bit_length()  # next power of two
    fit = min(64, max(fit, -(-16 // L)))  # BLOCK_W * LANES >= 16
    block_ns = (16, 8, 4, 32) if M == 1 else (16, 32)
    out = []
    for block_n in block_ns:
        row_programs = -(-rows // block_n)
        for split_k in (1, 2, 4, 8):
            if split_k > 1 and row_programs * split_k > ENOUGH_PROGRAMS:  # enough programs without it
                continue
            warps = 4 if block_n * fit * L >= 4096 else 2
            out.append(dict(BLOCK_N=block_n, BLOCK_W=fit, SPLIT_K=split_k, BLOCK_NNZ=16, num_warps=warps))
    return out


@jit
def _decode(packed_ptr, scale_ptr, zero_ptr, r, j, ok, seg,
            stride_pr, stride_sr, stride_sg, stride_zr, stride_zg,
            BITS: tl.constexpr, PER_WORD: tl.constexpr):
    """W_hat[r, j] for broadcastable index tensors r, j (pack.py layout); masked-off entries are 0."""
    word = tl.load(packed_ptr + r * stride_pr + j // PER_WORD, mask=ok, other=0)
    q = (word >> ((j % PER_WORD) * BITS)) & ((1 << BITS) - 1)
    g = j // seg  # the group (stride_sg = 0 for one group per row)
    s = tl.load(scale_ptr + r * stride_sr + g * stride_sg, mask=ok, other=0).to(tl.float32)
    z = tl.load(zero_ptr + r * stride_zr + g * stride_zg, mask=ok, other=0).to(tl.float32)
    return s * (q.to(tl.float32) - z)


@jit
def _gemv_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, y_ptr,
    M, rows, cols, seg, segs_per_split,
    stride_xm, stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, stride_ym,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, LANES: tl.constexpr, HAS_KEPT: tl.constexpr,
    ATOMIC: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] batch rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows of W
    m_ok, n_ok = offs_m < M, offs_n < rows
    lane = tl.arange(0, LANES)  # [LANES] code slot within a word
    shift = tl.where(lane < PER_WORD, lane * BITS, 0)  # [LANES]; unused lanes shift by 0, masked below
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_seg = tl.cdiv(cols, seg)
    for s in range(pid_k * segs_per_split, tl.minimum(n_seg, pid_k * segs_per_split + segs_per_split)):
        k_lo = s * seg
        k_hi = tl.minimum(k_lo + seg, cols)
        sc = tl.load(scale_ptr + offs_n * stride_sr + s * stride_sg, mask=n_ok, other=0).to(tl.float32)  # [BLOCK_N]
        zc = tl.load(zero_ptr + offs_n * stride_zr + s * stride_zg, mask=n_ok, other=0).to(tl.float32)  # [BLOCK_N]
        xq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # Σ_k x_k q_rk over the segment
        xs = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_k x_k over the segment
        for w0 in range(k_lo // PER_WORD, (k_hi - 1) // PER_WORD + 1, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)  # [BLOCK_W] packed words
            w_ok = offs_w <= (k_hi - 1) // PER_WORD
            words = tl.load(packed_ptr + offs_n[:, None] * stride_pr + offs_w[None, :],
                            mask=n_ok[:, None] & w_ok[None, :], other=0)  # [BLOCK_N, BLOCK_W]
            q = (words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, BLOCK_W, LANES]
            q = tl.reshape(q, [BLOCK_N, BLOCK_W * LANES])
            k = offs_w[:, None] * PER_WORD + lane[None, :]  # [BLOCK_W, LANES] column of each code
            k_ok = (lane[None, :] < PER_WORD) & (k >= k_lo) & (k < k_hi)
            k, k_ok = tl.reshape(k, [BLOCK_W * LANES]), tl.reshape(k_ok, [BLOCK_W * LANES])
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_M, BLOCK_W * LANES], 0 off the segment
            if USE_DOT:
                if DOT_FP32:  # full fp32 products, no tf32 rounding of x
                    xq = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), acc=xq, input_precision="ieee")
                else:  # fp16 / bf16 tensor cores; codes < 256 are exact in both
                    xq = tl.dot(x, tl.trans(q.to(x.dtype)), acc=xq)
            else:
                xq += tl.sum(x.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
            xs += tl.sum(x.to(tl.float32), axis=1)
        acc += sc[None, :] * (xq - zc[None, :] * xs[:, None])
    if HAS_KEPT:
        if pid_k == 0:  # the first split adds the kept-weight correction for its rows
            lo = tl.load(row_ptr_ptr + offs_n, mask=n_ok, other=0)  # [BLOCK_N] first entry of each row
            hi = tl.load(row_ptr_ptr + offs_n + 1, mask=n_ok, other=0)  # [BLOCK_N] one past its last
            for t0 in range(0, tl.max(hi - lo, axis=0), BLOCK_NNZ):
                p = lo[:, None] + t0 + tl.arange(0, BLOCK_NNZ)[None, :]  # [BLOCK_N, BLOCK_NNZ] entry ids, row by row
                p_ok = p < hi[:, None]
                j = tl.load(col_idx_ptr + p, mask=p_ok, other=0).to(tl.int32)  # [BLOCK_N, BLOCK_NNZ]
                v = tl.load(values_ptr + p, mask=p_ok, other=0).to(tl.float32)
                W_hat = _decode(packed_ptr, scale_ptr, zero_ptr, offs_n[:, None], j, p_ok, seg,
                                stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, BITS, PER_WORD)
                xj = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + j[None, :, :],  # [BLOCK_M, BLOCK_N, BLOCK_NNZ]
                             mask=m_ok[:, None, None] & p_ok[None, :, :], other=0).to(tl.float32)
                acc += tl.sum(xj * (v - W_hat)[None, :, :], axis=2)  # [BLOCK_M, BLOCK_N]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=y_ok)  # fp32 output, summed over the splits
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def _check(x, packed, scale, zero, kept, *, bits, groupsize):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, cols], got shape {tuple(x.shape)}; flatten leading dims first.")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be one of {X_DTYPES}, got {x.dtype}.")
    cols = x.shape[1]
    rows, gs = check_packed(packed, scale, zero, bits=bits, cols=cols, groupsize=groupsize)
    if kept is not None:
        check_kept(kept, rows, cols)
    others = [("packed", packed), ("scale", scale), ("zero", zero)] + ([] if kept is None else [("kept", kept.values)])
    for name, t in others:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}.")
    return rows, cols, gs


def _launch(x, packed, scale, zero, kept, *, bits, rows, cols, gs, cfg) -> torch.Tensor:
    """Run the kernel once with one configuration; returns y [M, rows] in x's dtype."""
    M = x.shape[0]
    per = CODES_PER_WORD[bits]
    if gs == cols:  # one group per row: segments of SEGMENT_WORDS words share it
        seg, stride_sg, stride_zg = per * SEGMENT_WORDS, 0, 0
    else:
        seg, stride_sg, stride_zg = gs, scale.stride(1), zero.stride(1)
    n_seg = -(-cols // seg)
    segs_per_split = -(-n_seg // min(cfg["SPLIT_K"], n_seg))
    split_k = -(-n_seg // segs_per_split)  # no empty splits
    atomic = split_k > 1
    y = (torch.zeros if atomic else torch.empty)(M, rows, dtype=torch.float32 if atomic else x.dtype, device=x.device)
    row_ptr, col_idx, values = kept if kept is not None else (packed, packed, packed)  # unused when HAS_KEPT=0
    use_dot = M > 1
    # fp32 x uses an fp32 dot. So does bf16 under the interpreter, whose bf16 tl.dot returns garbage
    # (triton 3.9: |error| ~1e10 on a 16x16 product); compiled kernels use the bf16 dot.
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not x.is_cuda)
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]), split_k)
    _gemv_kernel[grid](
        x, packed, scale, zero, row_ptr, col_idx, values, y,
        M, rows, cols, seg, segs_per_split,
        x.stride(0), packed.stride(0), scale.stride(0), stride_sg, zero.stride(0), stride_zg, y.stride(0),
        BITS=bits, PER_WORD=per, LANES=lanes(bits), HAS_KEPT=kept is not None,
        ATOMIC=atomic, USE_DOT=use_dot, DOT_FP32=dot_fp32,
        BLOCK_M=DOT_M if use_dot else 1, BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], BLOCK_NNZ=cfg["BLOCK_NNZ"],
        num_warps=cfg["num_warps"],
    )
    return y.to(x.dtype)


def gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    kept: SparseKept | None = None,
    *,
    bits: int,
    groupsize: int,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton: x [M <= 16, cols] -> y [M, rows] in x's dtype, y = x @ W_finalᵀ.

    config: one entry of `gemv_configs` to run as given; None picks one (timed on a GPU)."""
    rows, cols, gs = _check(x, packed, scale, zero, kept, bits=bits, groupsize=groupsize)
    M = x.shape[0]
    if not 1 <= M <= MAX_M:
        raise ValueError(f"gemv handles 1 <= M <= {MAX_M} rows of x, got {M}; dequantize once and matmul instead.")
    if triton is None:
        raise RuntimeError("triton is not installed; use gemv_ref or backend='torch'.")
    x, packed = x.contiguous(), packed.contiguous()
    scale, zero = scale.expand(rows, -1), zero.expand(rows, -1)  # per-tensor [1, 1] -> stride 0

    def run(cfg):
        return _launch(x, packed, scale, zero, kept, bits=bits, rows=rows, cols=cols, gs=gs, cfg=cfg)

    if config is None:
        key = ("gemv", rows, cols, bits, gs, M, x.dtype, kept is not None, str(x.device))
        config = tuning.pick(key, gemv_configs(rows, cols, bits, gs, M), run, device=x.device)
    return run(config)


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
