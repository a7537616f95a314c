"""Bit-packing of quantization codes and CSR storage of the kept (16-bit) weights.

TaCQ (arXiv 2504.07389) stores a layer as low-bit integer codes plus a small set of
"kept" weights (~0.35 %) held in fp16. This module turns the uint8 codes of
`quant.quantize` into int32 words and the kept weights into a CSR matrix; both are pure
tensor functions in named pairs (`pack`/`unpack`, `pack_sparse`/`unpack_sparse`).

Packed layout: each row is packed on its own along the input dimension (cols), code k of a
row lives in word k // per_word at bit offset bits * (k % per_word), with
per_word = 32 // bits (2-bit: 16, 3-bit: 10, 4-bit: 8, 8-bit: 4). A kernel that reads a
block of columns of a row block therefore does contiguous loads of whole words, and the
last word of a row is zero-padded.

3-bit choice: 10 codes per int32, 2 bits of each word unused (3.2 bits/code, 6.7 % more
than 3.0). The alternative, a 2-bit plane plus a 1-bit plane, is exactly 3 bits but needs
two loads and two shift-mask steps per code and its own code path. With 10 per word every
bit width decodes with the same single load + shift + mask, so one kernel serves 2/3/4/8.

Shapes: codes uint8 [rows, cols]; packed int32 [rows, ceil(cols / per_word)];
scale, zero [rows | 1, n_groups]; kept: row_ptr int32 [rows + 1], col_idx int16/int32 [nnz],
values fp16 [nnz].
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .quant import check_bits, check_groupsize

CODES_PER_WORD = {2: 16, 3: 10, 4: 8, 8: 4}  # per_word = 32 // bits; 3-bit wastes 2 bits
INT16_MAX_COLS = 32767  # col_idx fits in int16 up to this many columns


def codes_per_word(bits: int) -> int:
    return CODES_PER_WORD[check_bits(bits)]


def packed_cols(cols: int, *, bits: int) -> int:
    """Number of int32 words per packed row (the last one zero-padded)."""
    per = codes_per_word(bits)
    return (cols + per - 1) // per


def pack(codes: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Integer codes [rows, cols] in [0, 2**bits) -> int32 [rows, ceil(cols / per_word)]."""
    per = codes_per_word(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, cols], got shape {tuple(codes.shape)}.")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (uint8 from quant.quantize), got {codes.dtype}.")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)  # python ints: no uint8 wrap
    if lo < 0 or hi >= 2**bits:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}, got range [{lo}, {hi}].")
    rows, cols = codes.shape
    words = packed_cols(cols, bits=bits)
    q = torch.zeros(rows, words * per, dtype=torch.int64, device=codes.device)  # [rows, words * per]
    q[:, :cols] = codes.to(torch.int64)  # zero padding decodes to code 0 and is never read
    shifts = bits * torch.arange(per, device=codes.device)  # [per]
    acc = (q.reshape(rows, words, per) << shifts).sum(-1)  # [rows, words], in [0, 2**32)
    # store the unsigned 32-bit pattern in a signed int32 (two's complement wrap-around)
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def unpack(packed: torch.Tensor, *, bits: int, cols: int) -> torch.Tensor:
    """int32 [rows, ceil(cols / per_word)] -> uint8 codes [rows, cols]; inverse of `pack`."""
    per = codes_per_word(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise TypeError(f"packed must be a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}.")
    if packed.shape[1] != packed_cols(cols, bits=bits):
        raise ValueError(
            f"packed has {packed.shape[1]} words per row but cols={cols} at bits={bits} "
            f"needs {packed_cols(cols, bits=bits)}."
        )
    rows = packed.shape[0]
    shifts = bits * torch.arange(per, device=packed.device, dtype=torch.int32)  # [per]
    # arithmetic right shift sign-extends the top word bits; the mask drops them
    q = (packed[:, :, None] >> shifts) & (2**bits - 1)  # [rows, words, per]
    return q.reshape(rows, -1)[:, :cols].to(torch.uint8)


def check_packed(packed, scale, zero, *, bits: int, cols: int, groupsize: int) -> tuple[int, int]:
    """Validate a packed weight and its grid; returns (rows, groupsize) with -1 resolved to cols."""
    check_bits(bits)
    gs = check_groupsize(groupsize, cols)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise TypeError(f"packed must be a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}.")
    rows, words = packed.shape
    if words != packed_cols(cols, bits=bits):
        raise ValueError(f"packed has {words} words per row; cols={cols} at bits={bits} needs {packed_cols(cols, bits=bits)}.")
    for name, p in (("scale", scale), ("zero", zero)):
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}.")
        if p.dim() != 2 or p.shape[0] not in (1, rows) or p.shape[1] != cols // gs:
            raise ValueError(
                f"{name} shape {tuple(p.shape)} does not fit a [{rows}, {cols}] weight with "
                f"groupsize={groupsize}; expected [{rows}, {cols // gs}] (or [1, 1] per tensor)."
            )
        if p.device != packed.device:
            raise ValueError(f"{name} is on {p.device} but packed is on {packed.device}.")
    return rows, gs


# ---------------------------------------------------------------- kept weights (CSR)


class SparseKept(NamedTuple):
    """Kept weights of a [rows, cols] matrix in compressed sparse row form."""

    row_ptr: torch.Tensor  # int32 [rows + 1]; row r owns entries row_ptr[r]:row_ptr[r + 1]
    col_idx: torch.Tensor  # int16 [nnz] when cols <= 32767, else int32 [nnz]
    values: torch.Tensor  # fp16 [nnz], the kept (not quantized) weights


def index_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= INT16_MAX_COLS else torch.int32


def pack_sparse(W: torch.Tensor, mask: torch.Tensor) -> SparseKept:
    """Store W[mask] (row-major order) as CSR with fp16 values."""
    if W.dim() != 2 or not W.is_floating_point():
        raise TypeError(f"W must be a 2-D float tensor, got {W.dtype} of shape {tuple(W.shape)}.")
    if mask.dtype != torch.bool or mask.shape != W.shape:
        raise ValueError(f"mask must be bool with W's shape {tuple(W.shape)}, got {mask.dtype} {tuple(mask.shape)}.")
    rows, cols = W.shape
    counts = mask.sum(1)  # [rows]
    row_ptr = torch.zeros(rows + 1, dtype=torch.int32, device=W.device)
    row_ptr[1:] = counts.cumsum(0)
    col_idx = mask.nonzero()[:, 1].to(index_dtype(cols))  # [nnz], nonzero() is row-major
    values = W[mask].to(torch.float16)  # [nnz], same row-major order as nonzero()
    if not torch.isfinite(values).all():
        raise ValueError("some kept weights overflow fp16 (|w| > 65504); they cannot be stored exactly.")
    return SparseKept(row_ptr, col_idx, values)


def check_kept(kept: SparseKept, rows: int, cols: int) -> None:
    row_ptr, col_idx, values = kept
    if row_ptr.dtype != torch.int32 or row_ptr.dim() != 1 or row_ptr.numel() != rows + 1:
        raise ValueError(f"row_ptr must be int32 [{rows + 1}], got {row_ptr.dtype} {tuple(row_ptr.shape)}.")
    if col_idx.dtype not in (torch.int16, torch.int32) or col_idx.dim() != 1:
        raise TypeError(f"col_idx must be a 1-D int16/int32 tensor, got {col_idx.dtype} {tuple(col_idx.shape)}.")
    if values.dtype != torch.float16 or values.shape != col_idx.shape:
        raise ValueError(f"values must be fp16 with col_idx's shape {tuple(col_idx.shape)}, got {values.dtype} {tuple(values.shape)}.")
    if cols > INT16_MAX_COLS and col_idx.dtype == torch.int16:
        raise TypeError(f"cols={cols} needs int32 col_idx.")
    if row_ptr.device != col_idx.device or row_ptr.device != values.device:
        raise ValueError("row_ptr, col_idx and values must share a device.")


def kept_rows(kept: SparseKept) -> torch.Tensor:
    """Row index of each kept entry, int64 [nnz]."""
    counts = (kept.row_ptr[1:] - kept.row_ptr[:-1]).long()  # [rows]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)


def unpack_sparse(kept: SparseKept, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR -> (dense fp16 [rows, cols] with zeros off the mask, bool mask [rows, cols])."""
    rows, cols = shape
    check_kept(kept, rows, cols)
    row_ptr, col_idx, values = kept
    diffs = row_ptr[1:] - row_ptr[:-1]  # [rows]
    if row_ptr[0] != 0 or (diffs < 0).any() or row_ptr[-1] != values.numel():
        raise ValueError("row_ptr must start at 0, never decrease and end at nnz.")
    if values.numel() and (col_idx.min() < 0 or col_idx.max() >= cols):
        raise ValueError(f"col_idx out of range [0, {cols}).")
    r, c = kept_rows(kept), col_idx.long()  # [nnz] each
    dense = torch.zeros(rows, cols, dtype=torch.float16, device=values.device)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=values.device)
    dense[r, c] = values
    mask[r, c] = True
    return dense, mask


def packed_nbytes(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, kept: SparseKept | None = None) -> int:
    """Bytes really stored for one layer: codes + grid + CSR kept weights."""
    tensors = [packed, scale, zero] + ([] if kept is None else list(kept))
    return sum(t.numel() * t.element_size() for t in tensors)
