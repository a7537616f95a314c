"""Bits accounting: the average storage cost of one quantized weight.

For a linear with `cols` inputs quantized to `bits` with groups of `groupsize` columns
(per channel: groupsize = cols), each weight costs

    bits + (scale_bits + zero_bits) / groupsize + kept_fraction * (value_bits + index_bits)

where the last term is TaCQ's kept weights stored as a 16-bit value plus a 16-bit column index
(Xiao et al., 2025, Sec. 4: 3 bits + 0.35 % -> ~3.1 bits). Only the decoder's attention and MLP
linears count; embeddings, the LM head and norms stay in 16-bit and are reported separately.
CSR row offsets (32 bits per row) are a storage detail left out of the average, as in the paper.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple


class BitsReport(NamedTuple):
    avg_bits: float  # average bits per targeted weight
    n_weights: int  # targeted weights (decoder linears)
    n_kept: int  # of which kept in 16-bit
    total_bits: float  # n_weights * avg_bits
    other_params: int  # parameters outside the targeted linears (kept at 16 bits, not averaged)


def average_bits(
    shapes: Mapping[str, tuple[int, int]],
    *,
    bits: int,
    groupsize: int = -1,
    n_kept: Mapping[str, int] | None = None,
    scale_bits: int = 16,  # fp16 scales
    zero_bits: int = 16,  # fp16 zeros (an integer value stored in fp16)
    value_bits: int = 16,  # kept weight value, fp16
    index_bits: int = 16,  # kept weight column index, int16
    other_params: int = 0,
) -> BitsReport:
    """Average bits per weight over linears {name: (rows, cols)} with {name: kept count}."""
    if bits <= 0 or bits > 16:
        raise ValueError(f"bits must be in 1..16, got {bits}.")
    n_kept = n_kept or {}
    unknown = set(n_kept) - set(shapes)
    if unknown:
        raise KeyError(f"kept counts for unknown linears: {sorted(unknown)[:3]}")
    total, n_weights, total_kept = 0.0, 0, 0
    for name, (rows, cols) in shapes.items():
        gs = cols if groupsize == -1 else groupsize
        if cols % gs:
            raise ValueError(f"{name}: groupsize {groupsize} does not divide {cols} columns.")
        n = rows * cols
        k = int(n_kept.get(name, 0))
        if not 0 <= k <= n:
            raise ValueError(f"{name}: kept count {k} outside [0, {n}].")
        total += n * (bits + (scale_bits + zero_bits) / gs) + k * (value_bits + index_bits)
        n_weights += n
        total_kept += k
    if n_weights == 0:
        raise ValueError("no linears to account for.")
    return BitsReport(total / n_weights, n_weights, total_kept, total, other_params)
