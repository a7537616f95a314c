"""Benchmark the packed-weight kernels of tacq_lite.kernels.

On CUDA: medians from triton.testing.do_bench for
  * dequantization bandwidth (bytes read + written per second) next to a device-to-device copy,
  * the fused GEMV at batch 1 vs torch.nn.functional.linear on the fp16 weight, with the
    speedup printed next to its memory-bound ceiling 16 / avg_bits,
for (out, in) = 4096x4096, 14336x4096, 4096x14336 at 2/3/4 bits with 0.35 % kept weights.

Without CUDA it times the pure-torch reference path (the one the library uses on CPU) on a
smaller shape and says that GPU figures were not measured.

    python bench/bench_kernels.py            # picks CUDA when present
    python bench/bench_kernels.py --cpu      # force the CPU reference measurement
    python bench/bench_kernels.py --model    # the embedded model: float vs packed QuantLinear on CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tacq_lite.core import pack as P
from tacq_lite.kernels import dequant_matmul, dequant_weight

KEPT_FRAC = 0.0035  # TaCQ's kept fraction
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in) = (rows, cols)
BITS = (2, 3, 4)


def make_layer(rows, cols, *, bits, groupsize, device, seed=0):
    """Random codes and grid in the packed format plus 0.35 % kept weights (timing only)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)  # [rows, cols]
    n_groups = cols // groupsize
    scale = (torch.rand(rows, n_groups, generator=g) * 0.02 + 0.01).half()  # [rows, n_groups]
    zero = torch.full((rows, n_groups), 2 ** (bits - 1), dtype=torch.float16)
    W = torch.randn(rows, cols, generator=g) * 0.02  # [rows, cols]
    mask = torch.rand(rows, cols, generator=g) < KEPT_FRAC
    packed, kept = P.pack(codes, bits=bits), P.pack_sparse(W, mask)
    return packed.to(device), scale.to(device), zero.to(device), P.SparseKept(*(t.to(device) for t in kept))


def avg_bits(rows, cols, packed, scale, zero, kept) -> float:
    return 8 * P.packed_nbytes(packed, scale, zero, kept) / (rows * cols)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def bench_gpu(groupsize: int) -> None:
    """Correctness first (against the torch reference on the same data; stops if wrong), then do_bench medians.

    do_bench flushes the L2 cache before every repetition, so each call reads its weights from
    device memory, as a decoder layer does when the whole model does not fit in L2.
    """
    from triton.testing import do_bench

    def ms(fn):
        return do_bench(fn, return_mode="median")

    print(f"## GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}"
          f" (group {groupsize}, {KEPT_FRAC:.2%} kept, medians of do_bench, L2 flushed)\n")
    print("| out x in | bits | avg bits | dequant max abs diff | GEMV rel err | dequant GB/s | copy GB/s "
          "| GEMV us | F.linear fp16 us | speedup | ceiling 16/avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, cols in GPU_SHAPES:
        W16 = torch.randn(rows, cols, device="cuda", dtype=torch.float16)  # [rows, cols]
        dst = torch.empty_like(W16)
        copy_gbs = 2 * W16.numel() * 2 / ms(lambda: dst.copy_(W16)) / 1e6  # read + write
        x = torch.randn(1, cols, device="cuda", dtype=torch.float16)  # [1, cols]
        t_lin = ms(lambda: F.linear(x, W16))
        for bits in BITS:
            packed, scale, zero, kept = make_layer(rows, cols, bits=bits, groupsize=groupsize, device="cuda",
                                                   seed=rows + bits)
            kw = dict(bits=bits, groupsize=groupsize, backend="triton")
            deq = dequant_weight(packed, scale, zero, kept, cols=cols, **kw)  # [rows, cols] fp16
            deq_ref = dequant_weight(packed, scale, zero, kept, cols=cols, bits=bits, groupsize=groupsize,
                                     backend="torch")
            diff = (deq.float() - deq_ref.float()).abs().max().item()
            err = rel_err(dequant_matmul(x, packed, scale, zero, kept, **kw), x.double() @ deq_ref.double().T)
            if diff != 0 or not err < 1e-3:  # no timing of a wrong kernel
                raise SystemExit(f"{rows}x{cols} {bits}-bit: dequant differs by {diff}, GEMV relative error {err:.2e}")
            t_deq = ms(lambda: dequant_weight(packed, scale, zero, kept, cols=cols, **kw))
            moved = P.packed_nbytes(packed, scale, zero, kept) + rows * cols * 2  # read packed, write fp16
            t_gemv = ms(lambda: dequant_matmul(x, packed, scale, zero, kept, **kw))
            ab = avg_bits(rows, cols, packed, scale, zero, kept)
            print(f"| {rows}x{cols} | {bits} | {ab:.2f} | {diff:.0e} | {err:.1e} | {moved / t_deq / 1e6:.0f} "
                  f"| {copy_gbs:.0f} | {t_gemv * 1e3:.1f} | {t_lin * 1e3:.1f} | {t_lin / t_gemv:.2f}x | {16 / ab:.2f}x |")

    print(f"\n## GPU: batch rows M, 3 bits (group {groupsize}, {KEPT_FRAC:.2%} kept)\n")
    print("| out x in | M | GEMV us | F.linear fp16 us | speedup | GEMV rel err |")
    print("|---|---|---|---|---|---|")
    for rows, cols in GPU_SHAPES[:2]:
        W16 = torch.randn(rows, cols, device="cuda", dtype=torch.float16)  # [rows, cols]
        packed, scale, zero, kept = make_layer(rows, cols, bits=3, groupsize=groupsize, device="cuda", seed=7)
        kw = dict(bits=3, groupsize=groupsize)
        W_ref = dequant_weight(packed, scale, zero, kept, cols=cols, backend="torch", **kw).double()
        for M in (1, 2, 4, 8, 16):
            x = torch.randn(M, cols, device="cuda", dtype=torch.float16)  # [M, cols]
            err = rel_err(dequant_matmul(x, packed, scale, zero, kept, backend="triton", **kw), x.double() @ W_ref.T)
            if not err < 1e-3:
                raise SystemExit(f"{rows}x{cols} M={M}: GEMV relative error {err:.2e}")
            t_gemv = ms(lambda: dequant_matmul(x, packed, scale, zero, kept, backend="triton", **kw))
            t_lin = ms(lambda: F.linear(x, W16))
            print(f"| {rows}x{cols} | {M} | {t_gemv * 1e3:.1f} | {t_lin * 1e3:.1f} | {t_lin / t_gemv:.2f}x | {err:.1e} |")


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_cpu(rows: int, cols: int, groupsize: int, reps: int) -> None:
    print(f"## CPU: torch reference path, {rows}x{cols} (out x in), group {groupsize}, "
          f"{KEPT_FRAC:.2%} kept, {torch.get_num_threads()} threads, median of {reps}\n")
    print("| bits | avg bits | stored KiB | fp16 dense KiB | fp32 temp KiB | dequant ms | GEMV M=1 ms | F.linear fp32 ms |")
    print("|---|---|---|---|---|---|---|---|")
    x = torch.randn(1, cols)  # [1, cols]
    W32 = torch.randn(rows, cols)  # the dense baseline the CPU would otherwise use
    t_lin = median_ms(lambda: F.linear(x, W32), reps)
    for bits in BITS:
        packed, scale, zero, kept = make_layer(rows, cols, bits=bits, groupsize=groupsize, device="cpu")
        kw = dict(bits=bits, groupsize=groupsize, backend="torch")
        t_deq = median_ms(lambda: dequant_weight(packed, scale, zero, kept, cols=cols, dtype=torch.float32, **kw), reps)
        t_gemv = median_ms(lambda: dequant_matmul(x, packed, scale, zero, kept, **kw), reps)
        stored = P.packed_nbytes(packed, scale, zero, kept)
        # the reference materializes W_final in fp32 on every call: rows * cols * 4 bytes
        print(f"| {bits} | {avg_bits(rows, cols, packed, scale, zero, kept):.2f} | {stored / 1024:.0f} "
              f"| {rows * cols * 2 / 1024:.0f} | {rows * cols * 4 / 1024:.0f} | {t_deq:.2f} | {t_gemv:.2f} | {t_lin:.3f} |")
    print("\nGPU figures (Triton dequant bandwidth, fused GEMV speedup) were not measured: no CUDA device.")
    print("The CPU reference decodes the whole matrix per call, so it is slower than a dense fp32 linear;")
    print("it exists for correctness and storage accounting, not speed.")


def bench_model(bits: int, groupsize: int, reps: int) -> None:
    """The embedded model, float vs packed (QuantLinear, torch reference on CPU): speed and bytes."""
    import copy
    import resource

    from tacq_lite import load_model
    from tacq_lite.config import QuantConfig
    from tacq_lite.model import walk
    from tacq_lite.model.qlinear import convert_model, quant_linears
    from tacq_lite.run.passes import rtn_quantize

    model, tok = load_model()
    packed = copy.deepcopy(model)
    grids = rtn_quantize(packed, QuantConfig(method="rtn", bits=bits, groupsize=groupsize, mse=False)).grids
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(m.weight.shape, generator=gen) < KEPT_FRAC for n, m in walk.named_linears(packed).items()}
    convert_model(packed, grids, bits=bits, groupsize=groupsize, masks=masks)
    lin_float = sum(m.weight.numel() * 4 for m in walk.named_linears(model).values())
    lin_packed = sum(q.nbytes() for q in quant_linears(packed).values())
    ids = torch.randint(0, tok.vocab_size, (1, 256), generator=gen)
    one = ids[:, :1]
    print(f"## CPU: the embedded model, {bits}-bit g{groupsize} + {KEPT_FRAC:.2%} kept, "
          f"{torch.get_num_threads()} threads, median of {reps}\n")
    print("| model | decoder linears MiB | forward 256 tokens ms | tokens/s | one-token forward ms |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name, m, nbytes in (("float32 (nn.Linear)", model, lin_float), ("packed (QuantLinear)", packed, lin_packed)):
            t_seq = median_ms(lambda: m(ids), reps)
            t_one = median_ms(lambda: m(one), reps)
            print(f"| {name} | {nbytes / 2**20:.1f} | {t_seq:.0f} | {256 / t_seq * 1e3:.0f} | {t_one:.1f} |")
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          "(both models resident; the packed one decodes each linear to fp32 on every call)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="measure the CPU reference even if CUDA is present")
    ap.add_argument("--groupsize", type=int, default=128)
    ap.add_argument("--cpu-rows", type=int, default=2048)
    ap.add_argument("--cpu-cols", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model", action="store_true", help="time the embedded model, float vs packed QuantLinear")
    ap.add_argument("--bits", type=int, default=3, help="--model: bits")
    ap.add_argument("--model-groupsize", type=int, default=64, help="--model: group size (128 does not divide 576)")
    args = ap.parse_args()
    if args.model:
        bench_model(args.bits, args.model_groupsize, args.reps)
    elif torch.cuda.is_available() and not args.cpu:
        bench_gpu(args.groupsize)
    else:
        bench_cpu(args.cpu_rows, args.cpu_cols, args.groupsize, args.reps)


if __name__ == "__main__":
    main()
