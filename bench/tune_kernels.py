"""Sweep the Triton kernels' block sizes on a GPU and print the fastest configurations.

The GEMV's tuner (`kernels.tuning`) times only the short list `gemv.gemv_configs` returns.
This script times a wider grid (tile rows, split-K, warps; the words per tile are one group's) at
M = 1 and M = 16, and with --dequant the dense dequant kernel alone, on Llama-3-8B layer shapes at 3 bits with 0.35 %
kept weights, each result checked against the torch reference before it is timed (do_bench
medians, L2 flushed between repetitions). It prints where the short list's best stands against
the wider grid's best, so the list can be corrected, and writes the sweep as JSON.

    TRITON_INTERPRET=0 python bench/tune_kernels.py [--batch 1 16] [--dequant] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
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
from tacq_lite.kernels.gemv import gemv, gemv_configs  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
BITS, GROUPSIZE = 3, 128


def dequant_call(packed, scale, zero, rows, cols, cfg):
    out = torch.empty(rows, cols, dtype=torch.float16, device="cuda")  # [rows, cols]
    grid = (triton.cdiv(rows, cfg["BLOCK_R"]), triton.cdiv(cols, cfg["BLOCK_C"]))
    _dequant_kernel[grid](packed, scale, zero, out, rows, cols, GROUPSIZE, packed.stride(0), scale.stride(0),
                          scale.stride(1), zero.stride(0), zero.stride(1), out.stride(0),
                          BITS=BITS, PER_WORD=CODES_PER_WORD[BITS], **cfg)
    return out


def print_sweep(title: str, keys: tuple[str, ...], unit: str, fmt: str, results: list, top: int, first: dict) -> None:
    """Markdown table of the `top` best (already sorted) results, then the row of `first`."""
    print(title + "\n")
    print("| " + " | ".join(k.removeprefix("num_") for k in keys) + " | "
          + " | ".join(f"{r}x{c} {unit}" for r, c in SHAPES) + " |")
    print("|---" * len(keys) + "|" + "---|" * len(SHAPES))
    for _, cfg, vals in results[:top]:
        print("| " + " | ".join(str(cfg[k]) for k in keys) + " | " + " | ".join(format(v, fmt) for v in vals) + " |")
    vals = next(v for _, cfg, v in results if cfg == first)
    print(f"{tuple(first.values())}: " + " | ".join(format(v, fmt) for v in vals))


def sweep_gemv(layers, refs, M: int, path: Path) -> dict:
    """Time the wide grid and the tuner's short list at batch M; the JSON record, rewritten to `path`
    after each configuration (a session cut short keeps what it timed)."""
    xs = {s: torch.randn(M, s[1], device="cuda", dtype=torch.float16) for s in SHAPES}  # [M, cols] each
    fit = gemv_configs(*SHAPES[0], BITS, GROUPSIZE, M)[0]["BLOCK_W"]  # the words of one group: the kernel's step
    grid = [dict(BLOCK_N=n, BLOCK_W=fit, SPLIT_K=k, BLOCK_NNZ=16, num_warps=nw)
            for n, k, nw in (itertools.product([2, 4, 8, 16, 32], [1, 2, 4, 8], [1, 2, 4, 8]) if M == 1
                             else itertools.product([16, 32, 64], [1, 2, 4], [4, 8]))
            if nw * 32 <= n * fit * CODES_PER_WORD[BITS]]
    results = []
    for cfg in grid:
        times = []
        for (rows, cols) in SHAPES:
            packed, scale, zero, kept = layers[(rows, cols)]
            x = xs[(rows, cols)]
            kw = dict(bits=BITS, groupsize=GROUPSIZE, config=cfg)
            err = rel_err(gemv(x, packed, scale, zero, kept, **kw), x.double() @ refs[(rows, cols)].double().T)
            if not err < 1e-3:
                raise SystemExit(f"GEMV {cfg} {rows}x{cols} M={M}: relative error {err:.2e}")
            times.append(do_bench(lambda: gemv(x, packed, scale, zero, kept, **kw), warmup=5, rep=20,
                                  return_mode="median") * 1e3)
        results.append((sum(times), cfg, times))
        path.write_text(json.dumps(record(M, results), indent=1) + "\n")
    results.sort(key=lambda r: r[0])
    keys = ("BLOCK_N", "BLOCK_W", "SPLIT_K", "num_warps")
    short = [r for r in results if any(all(r[1][k] == c[k] for k in keys)
                                       for c in gemv_configs(SHAPES[0][0], SHAPES[0][1], BITS, GROUPSIZE, M))]
    print_sweep(f"## GEMV M={M}, 3-bit g128, 0.35 % kept: the 12 fastest of {len(grid)} configurations",
                keys, "us", ".1f", results, 12, (short or results)[0][1])
    if short:
        print(f"best of the tuner's short list (for {SHAPES[0]}): {short[0][1]}, "
              + " | ".join(f"{t:.1f}" for t in short[0][2]) + " us")
    path.write_text(json.dumps(record(M, results), indent=1) + "\n")


def record(M: int, results: list) -> dict:
    return {"M": M, "shapes": SHAPES, "bits": BITS, "groupsize": GROUPSIZE, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "timing": "do_bench median, warmup 5, rep 20",
            "results": [{"config": cfg, "us": times} for _, cfg, times in sorted(results, key=lambda r: r[0])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "kernels" if os.environ.get("OUT")
                    else Path(__file__).resolve().parent / "results" / "kernels")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dequant", action="store_true", help="also sweep the dense dequant kernel's tiles")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    layers = {s: make_layer(*s, bits=BITS, groupsize=GROUPSIZE, device="cuda", seed=s[0]) for s in SHAPES}
    refs = {s: dequant_weight(*layers[s], cols=s[1], bits=BITS, groupsize=GROUPSIZE, backend="torch") for s in SHAPES}
    dense_refs = {s: dequant_weight(*layers[s][:3], None, cols=s[1], bits=BITS, groupsize=GROUPSIZE, backend="torch")
                  for s in SHAPES}  # [rows, cols] each, no kept weights
    for M in args.batch:
        sweep_gemv(layers, refs, M, args.out / f"tune_gemv_m{M}.json")
    if not args.dequant:
        return

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
