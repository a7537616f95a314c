"""Sweep the Triton kernels' block sizes on a GPU and print the fastest configurations.

The defaults in tacq_lite/kernels were first chosen without a GPU. This script times the GEMV
kernel (M = 1) and the dense dequant kernel alone over a grid of block sizes and warps, on
Llama-3-8B layer shapes at 3 bits with 0.35 % kept weights, each result checked against the
torch reference before it is timed (do_bench medians, L2 flushed between repetitions).

    TRITON_INTERPRET=0 python bench/tune_kernels.py
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from bench_kernels import make_layer, rel_err  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from tacq_lite.core.pack import CODES_PER_WORD  # noqa: E402
from tacq_lite.kernels import dequant_weight  # noqa: E402
from tacq_lite.kernels.dequant import _dequant_kernel  # noqa: E402
from tacq_lite.kernels.gemv import _gemv_kernel  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
BITS, GROUPSIZE = 3, 128


def gemv_call(x, packed, scale, zero, kept, rows, cols, cfg):
    y = torch.empty(1, rows, dtype=x.dtype, device="cuda")  # [1, rows]
    grid = (triton.cdiv(rows, cfg["BLOCK_N"]),)
    _gemv_kernel[grid](x, packed, scale, zero, *kept, y, 1, rows, cols, GROUPSIZE,
                       x.stride(0), packed.stride(0), scale.stride(0), scale.stride(1), zero.stride(0),
                       zero.stride(1), y.stride(0), BITS=BITS, PER_WORD=CODES_PER_WORD[BITS], HAS_KEPT=True,
                       BLOCK_M=1, BLOCK_NNZ=32, **cfg)
    return y


def dequant_call(packed, scale, zero, rows, cols, cfg):
    out = torch.empty(rows, cols, dtype=torch.float16, device="cuda")  # [rows, cols]
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, cfg["BLOCK_C"]))
    _dequant_kernel[grid](packed, scale, zero, out, rows, cols, GROUPSIZE, packed.stride(0), scale.stride(0),
                          scale.stride(1), zero.stride(0), zero.stride(1), out.stride(0),
                          BITS=BITS, PER_WORD=CODES_PER_WORD[BITS], **cfg)
    return out


def print_sweep(title: str, keys: tuple[str, ...], unit: str, fmt: str, results: list, top: int, first: dict) -> None:
    """Markdown table of the `top` best (already sorted) results, then the first guess's row."""
    print(title + "\n")
    print("| " + " | ".join(k.removeprefix("num_") for k in keys) + " | "
          + " | ".join(f"{r}x{c} {unit}" for r, c in SHAPES) + " |")
    print("|---" * len(keys) + "|" + "---|" * len(SHAPES))
    for _, cfg, vals in results[:top]:
        print("| " + " | ".join(str(cfg[k]) for k in keys) + " | " + " | ".join(format(v, fmt) for v in vals) + " |")
    vals = next(v for _, cfg, v in results if cfg == first)
    print(f"first guess {tuple(first.values())}, before this sweep: " + " | ".join(format(v, fmt) for v in vals))


def main() -> None:
    layers = {s: make_layer(*s, bits=BITS, groupsize=GROUPSIZE, device="cuda", seed=s[0]) for s in SHAPES}
    refs = {s: dequant_weight(*layers[s], cols=s[1], bits=BITS, groupsize=GROUPSIZE, backend="torch") for s in SHAPES}
    dense_refs = {s: dequant_weight(*layers[s][:3], None, cols=s[1], bits=BITS, groupsize=GROUPSIZE, backend="torch")
                  for s in SHAPES}  # [rows, cols] each, no kept weights
    xs = {s: torch.randn(1, s[1], device="cuda", dtype=torch.float16) for s in SHAPES}  # [1, cols] each

    gemv_cfgs = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w)
                 for n, k, w in itertools.product([1, 2, 4, 8, 16, 32], [128, 256, 512, 1024], [1, 2, 4, 8])
                 if n * k <= 16384]
    rows_out = []
    for cfg in gemv_cfgs:
        times = []
        for (rows, cols) in SHAPES:
            packed, scale, zero, kept = layers[(rows, cols)]
            x = xs[(rows, cols)]
            y = gemv_call(x, packed, scale, zero, kept, rows, cols, cfg)  # [1, rows]
            ref = x.double() @ refs[(rows, cols)].double().T  # [1, rows]
            err = rel_err(y, ref)
            if not err < 1e-3:
                raise SystemExit(f"GEMV {cfg} {rows}x{cols}: relative error {err:.2e}")
            times.append(do_bench(lambda: gemv_call(x, packed, scale, zero, kept, rows, cols, cfg),
                                  return_mode="median") * 1e3)
        rows_out.append((sum(times), cfg, times))
    rows_out.sort(key=lambda r: r[0])
    print_sweep(f"## GEMV M=1, 3-bit g128, 0.35 % kept: the 12 fastest of {len(gemv_cfgs)} configurations",
                ("BLOCK_N", "BLOCK_K", "num_warps"), "us", ".1f", rows_out, 12,
                dict(BLOCK_N=16, BLOCK_K=256, num_warps=4))

    deq_cfgs = [dict(BLOCK_R=r, BLOCK_C=c, num_warps=w)
                for r, c, w in itertools.product([4, 8, 16, 32, 64], [64, 128, 256, 512, 1024], [2, 4, 8])
                if 512 <= r * c <= 16384]
    rows_out = []
    for cfg in deq_cfgs:
        times = []
        for (rows, cols) in SHAPES:
            packed, scale, zero, _ = layers[(rows, cols)]
            out = dequant_call(packed, scale, zero, rows, cols, cfg)  # [rows, cols]
            if not torch.equal(out, dense_refs[(rows, cols)]):
                raise SystemExit(f"dequant {cfg} {rows}x{cols} differs from the reference")
            t = do_bench(lambda: dequant_call(packed, scale, zero, rows, cols, cfg), return_mode="median")
            times.append((rows * cols * 2 + packed.numel() * 4) / t / 1e6)  # GB/s: fp16 written + codes read
        rows_out.append((sum(times), cfg, times))
    rows_out.sort(key=lambda r: -r[0])
    print_sweep(f"\n## dense dequant kernel alone (no kept weights), 3-bit g128: GB/s, the 8 fastest of {len(deq_cfgs)}",
                ("BLOCK_R", "BLOCK_C", "num_warps"), "GB/s", ".0f", rows_out, 8,
                dict(BLOCK_R=32, BLOCK_C=64, num_warps=4))
    packed, scale, zero, kept = layers[SHAPES[0]]
    t_all = do_bench(lambda: dequant_weight(packed, scale, zero, kept, cols=SHAPES[0][1], bits=BITS, groupsize=GROUPSIZE,
                                            backend="triton"), return_mode="median")
    t_dense = do_bench(lambda: dequant_weight(packed, scale, zero, None, cols=SHAPES[0][1], bits=BITS,
                                              groupsize=GROUPSIZE, backend="triton"), return_mode="median")
    print(f"\n4096x4096 dequant_weight with kept weights {t_all * 1e3:.1f} us, without {t_dense * 1e3:.1f} us")


if __name__ == "__main__":
    main()
