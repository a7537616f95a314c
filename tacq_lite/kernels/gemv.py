"""Fused dequantize + matmul for small batches: y = x @ W_finalᵀ, W_final = where(mask, kept, W_hat).

TaCQ (arXiv 2504.07389) keeps ~0.35 % of weights in fp16 and quantizes the rest. Decoding one
token reads every weight once, so at batch 1-16 the bytes that cross the memory bus set the
speed, and the packed codes are bits / 16 of the fp16 bytes. The kernel is built so that each
of those bytes is read once:

- **One load per packed word.** A program loads a [BLOCK_N rows, BLOCK_W words] tile of int32
  words and unpacks all codes of each word with shifts into [BLOCK_N, BLOCK_W, lanes] tiles.
  Triton's blocks are powers of two, so a 3-bit word's 10 codes come out as two tiles, 8 lanes
  and 2 (`lane_tiles`), and no lane computes on nothing.
- **One scale and zero per group and row, one loop step per group.** The loop runs over
  quantization groups; a step loads the group's words (BLOCK_W covers them all, so the loop is
  flat and its loads can be pipelined) and each row's scale and zero once. A code becomes a
  float without an int-to-float conversion (OR it into the mantissa of 2^23, reinterpret the
  bits as a float, subtract 2^23). At M = 1 each code lane keeps its own running sum of
  x_k · s (q − z), and the lanes are summed once after the loop, so no step reduces across
  threads. A word that straddles two groups (3-bit: 128 is not a multiple of 10) is read by
  both groups' steps, the second time from cache. A per-channel or per-tensor grid has one group
  per row; its loop runs over column segments of `SEGMENT_WORDS` words with the same scale
  (group stride 0).
- **Split-K.** When the row blocks alone give too few programs to fill the GPU, a second grid
  axis splits the groups into SPLIT_K contiguous ranges; each program adds its partial sums into
  an fp32 output with `tl.atomic_add` (the summation order then varies from run to run, within
  fp32 rounding).
- **fp32 accumulation** from fp16 / bf16 / fp32 inputs. For M > 1 the group's [rows, codes]
  tile of codes (integers below 256, exact in fp16 and bf16) goes through `tl.dot` with x
  (tensor cores on a GPU; the batch is padded to 16 rows), Σ x through a second dot with ones,
  and the group adds s (Σ x q − z Σ x): no reduction across threads, and any zero point.
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


def lane_tiles(bits: int) -> tuple[int, int]:
    """(LANES_A, LANES_B): a word's codes split into power-of-two tiles (Triton's blocks are powers
    of two): 3-bit words hold 10 codes, unpacked as 8 + 2 so that no lane is spent on nothing;
    the other widths fill one tile (LANES_B = 0)."""
    per = CODES_PER_WORD[bits]
    first = 1 << (per.bit_length() - 1)  # the largest power of two <= per
    return first, per - first


def segment_words(cols: int, bits: int, groupsize: int) -> int:
    """Most packed words one loop segment touches: a group's codes plus the word it may share with
    the next group (3-bit g128: 13 or 14 words), or SEGMENT_WORDS for one group per row."""
    per = CODES_PER_WORD[bits]
    if groupsize == cols:
        return SEGMENT_WORDS
    return -(-groupsize // per) + (1 if groupsize % per else 0)


ENOUGH_PROGRAMS = 16 * 132  # split-K stops adding programs past 16 per SM of an H100 / H200 (132 SMs)


def gemv_configs(rows: int, cols: int, bits: int, groupsize: int, M: int) -> list[dict]:
    """The configurations the tuner times for one GEMV shape; the first is used untimed (CPU).

    BLOCK_N output rows and BLOCK_W packed words per tile, SPLIT_K ranges of groups, warps.
    BLOCK_W covers one segment's words in one step (16 at 3-bit g128), as the kernel requires.
    The list is short on purpose, since each entry costs a compile and a timing on first use:
    tiles of 4-32 rows, and split factors that take the number of programs from the row blocks
    alone up to ENOUGH_PROGRAMS. For M > 1, BLOCK_N >= 16 and BLOCK_W times each lane tile
    >= 16, as tl.dot needs on a GPU. groupsize: resolved (cols for one group).
    """
    L = CODES_PER_WORD[bits]
    fit = 1 << (segment_words(cols, bits, groupsize) - 1).bit_length()  # next power of two
    fit = min(64, max(fit, -(-16 // min(t for t in lane_tiles(bits) if t))))  # each dot's K >= 16
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
def _dot(x, q, DOT_FP32: tl.constexpr):
    """x [BLOCK_M, K] @ q [BLOCK_N, K]ᵀ in fp32: an exact fp32 dot, or x's 16-bit type on tensor cores."""
    if DOT_FP32:  # full fp32 products, no tf32 rounding of x
        return tl.dot(x.to(tl.float32), tl.trans(q), input_precision="ieee")
    return tl.dot(x, tl.trans(q.to(x.dtype)))


@jit
def _unpack(words, offs_w, x_ptr, offs_m, m_ok, stride_xm, k_lo, k_hi,
            BITS: tl.constexpr, PER_WORD: tl.constexpr, LANE0: tl.constexpr, NL: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """Codes LANE0 .. LANE0 + NL - 1 of each word as exact floats [BLOCK_N, BLOCK_W * NL], and x at
    their columns [BLOCK_M, BLOCK_W * NL] (0 outside k_lo <= k < k_hi)."""
    lane = LANE0 + tl.arange(0, NL)  # [NL] code slots within a word
    # OR-ing a code into the mantissa of 2^23 and reinterpreting the bits gives 2^23 + q exactly,
    # without an int-to-float conversion; subtracting 2^23 leaves q.
    q = ((words[:, :, None] >> (lane * BITS)[None, None, :]) & ((1 << BITS) - 1)) | 0x4B000000
    q = tl.reshape(q, [BLOCK_N, BLOCK_W * NL]).to(tl.float32, bitcast=True) - 8388608.0
    k = offs_w[:, None] * PER_WORD + lane[None, :]  # [BLOCK_W, NL] column of each code
    k_ok = tl.reshape((k >= k_lo) & (k < k_hi), [BLOCK_W * NL])
    k = tl.reshape(k, [BLOCK_W * NL])
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
    return q, x


@jit
def _gemv_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, y_ptr,
    M, rows, cols, seg, segs_per_split,
    stride_xm, stride_pr, stride_sr, stride_sg, stride_zr, stride_zg, stride_ym,
    BITS: tl.constexpr, PER_WORD: tl.constexpr, LANES_A: tl.constexpr, LANES_B: tl.constexpr,
    HAS_KEPT: tl.constexpr,
    ATOMIC: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_NNZ: tl.constexpr,
):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # [BLOCK_M] batch rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows of W
    m_ok, n_ok = offs_m < M, offs_n < rows
    n_seg = tl.cdiv(cols, seg)
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:  # M = 1: per-code partial products, summed over the codes once after the loop
        acc_a = tl.zeros([BLOCK_N, BLOCK_W * LANES_A], dtype=tl.float32)
        if LANES_B > 0:
            acc_b = tl.zeros([BLOCK_N, BLOCK_W * LANES_B], dtype=tl.float32)
    # One iteration per segment (a group, or SEGMENT_WORDS words of a per-channel row): its words fit
    # in BLOCK_W (the wrapper checks), so the loop is flat and the compiler can pipeline its loads.
    for s in range(pid_k * segs_per_split, tl.minimum(n_seg, pid_k * segs_per_split + segs_per_split)):
        k_lo = s * seg
        k_hi = tl.minimum(k_lo + seg, cols)
        sc = tl.load(scale_ptr + offs_n * stride_sr + s * stride_sg, mask=n_ok, other=0).to(tl.float32)  # [BLOCK_N]
        zc = tl.load(zero_ptr + offs_n * stride_zr + s * stride_zg, mask=n_ok, other=0).to(tl.float32)  # [BLOCK_N]
        offs_w = k_lo // PER_WORD + tl.arange(0, BLOCK_W)  # [BLOCK_W] packed words
        w_ok = offs_w <= (k_hi - 1) // PER_WORD
        words = tl.load(packed_ptr + offs_n[:, None] * stride_pr + offs_w[None, :],
                        mask=n_ok[:, None] & w_ok[None, :], other=0)  # [BLOCK_N, BLOCK_W]
        qa, xa = _unpack(words, offs_w, x_ptr, offs_m, m_ok, stride_xm, k_lo, k_hi,
                         BITS, PER_WORD, 0, LANES_A, BLOCK_N, BLOCK_W)
        if LANES_B > 0:
            qb, xb = _unpack(words, offs_w, x_ptr, offs_m, m_ok, stride_xm, k_lo, k_hi,
                             BITS, PER_WORD, LANES_A, LANES_B, BLOCK_N, BLOCK_W)
        if USE_DOT:  # s * (Σ x q − z Σ x); codes < 256 are exact in fp16 and bf16, and Σ x is a dot with ones
            xq = _dot(xa, qa, DOT_FP32)  # [BLOCK_M, BLOCK_N]
            xs = _dot(xa, tl.full([BLOCK_N, BLOCK_W * LANES_A], 1.0, tl.float32), DOT_FP32)  # every column Σ x
            if LANES_B > 0:
                xq += _dot(xb, qb, DOT_FP32)
                xs += _dot(xb, tl.full([BLOCK_N, BLOCK_W * LANES_B], 1.0, tl.float32), DOT_FP32)
            acc += sc[None, :] * (xq - zc[None, :] * xs)
        else:  # x_k * s (q − z) per code lane, no reduction in the loop (the fma takes −s z per row)
            acc_a += xa.to(tl.float32) * (qa * sc[:, None] - (sc * zc)[:, None])
            if LANES_B > 0:
                acc_b += xb.to(tl.float32) * (qb * sc[:, None] - (sc * zc)[:, None])
    if not USE_DOT:
        acc = tl.sum(acc_a, axis=1)[None, :]  # [1, BLOCK_N]
        if LANES_B > 0:
            acc += tl.sum(acc_b, axis=1)[None, :]
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
        tl.atomic_add(y_ptrs, acc, mask=y_ok, sem="relaxed")  # fp32 output, summed over the splits
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
    if cfg["BLOCK_W"] < segment_words(cols, bits, gs):
        raise ValueError(f"BLOCK_W={cfg['BLOCK_W']} packed words cannot hold a segment of "
                         f"{segment_words(cols, bits, gs)}; take a configuration from gemv_configs.")
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
        BITS=bits, PER_WORD=per, LANES_A=lane_tiles(bits)[0], LANES_B=lane_tiles(bits)[1],
        HAS_KEPT=kept is not None,
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
        config = tuning.chosen_for(key) or tuning.pick(key, gemv_configs(rows, cols, bits, gs, M), run,
                                                        device=x.device)
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
