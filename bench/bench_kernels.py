"""Benchmark the packed-weight kernels of tacq_lite.kernels.

On CUDA: medians from triton.testing.do_bench for
  * dequantization bandwidth (bytes read + written per second) next to a device-to-device copy,
  * the fused GEMV (batch M = 1, 2, 4, 8, 16; fp16 and bf16 inputs at M = 1) vs
    torch.nn.functional.linear on the fp16 weight, with the speedup next to its memory-bound
    ceiling 16 / avg_bits, each checked against a float64 reference before it is timed,
for (out, in) = 4096x4096, 14336x4096, 4096x14336 at 2/3/4 bits with 0.35 % kept weights. Each
GEMV measurement is also written as JSON (device, versions, shape, bits, group size, kept
fraction, M, us for the kernel and for fp16 F.linear, speedup, GB/s, error, the tuned config).

Without CUDA it times the pure-torch reference path (the one the library uses on CPU) on a
smaller shape and says that GPU figures were not measured.

    python bench/bench_kernels.py            # picks CUDA when present
    python bench/bench_kernels.py --cpu      # force the CPU reference measurement
    python bench/bench_kernels.py --model    # the embedded model: float vs packed QuantLinear on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from tacq_lite.core import pack as P
from tacq_lite.kernels import dequant_matmul, dequant_weight

KEPT_FRAC = 0.0035  # TaCQ's kept fraction
GPU_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (out, in) = (rows, cols)
BITS = (2, 3, 4)
# relative error allowed against the float64 reference: 1e-3 (issue 22), except that a bf16 output
# alone rounds by up to 2^-9 relative, so bf16 gets the same 8e-3 as tests/test_kernels_gpu.py
ERR_LIMIT = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


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


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu (Triton interpreter)"


def measurement(*, rows, cols, bits, groupsize, M, dtype, t_kernel_ms, t_fp16_ms, nbytes, err, max_abs, config,
                device) -> dict:
    """One GEMV measurement as a JSON record (bench/results/kernels/*.json)."""
    import triton

    return {
        "kernel": "gemv" if M <= 16 else "dequant+linear",
        "device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
        "date": date.today().isoformat(),
        "rows": rows, "cols": cols, "bits": bits, "groupsize": groupsize, "kept_frac": KEPT_FRAC, "M": M,
        "dtype": str(dtype).removeprefix("torch."),
        "us_kernel": round(t_kernel_ms * 1e3, 2), "us_fp16_linear": round(t_fp16_ms * 1e3, 2),
        "speedup": round(t_fp16_ms / t_kernel_ms, 3),
        "bytes_moved": nbytes, "gb_per_s": round(nbytes / t_kernel_ms / 1e6, 1),
        "fp16_gb_per_s": round((rows * cols + M * (rows + cols)) * 2 / t_fp16_ms / 1e6, 1),
        "rel_err_vs_float64": err, "max_abs_err_vs_float64": max_abs, "config": config,
        "timing": "triton.testing.do_bench median, L2 flushed before each repetition",
    }


def bench_gpu(groupsize: int, out: Path, batch: tuple[int, ...], bits_list: tuple[int, ...], *,
              shapes=GPU_SHAPES, device: str = "cuda") -> list[dict]:
    """Correctness first (float64 reference; stops if wrong), then do_bench medians; one JSON per measurement.

    do_bench flushes the L2 cache before every repetition, so each call reads its weights from
    device memory, as a decoder layer does when the whole model does not fit in L2. The GEMV's
    configuration is the one `kernels.tuning` picked for the shape (timed on first use).
    device="cpu" runs the same code under TRITON_INTERPRET=1 (the test does, on a small shape).
    """
    from triton.testing import do_bench

    from tacq_lite.kernels import tuning

    def ms(fn):
        return do_bench(fn, return_mode="median")

    out.mkdir(parents=True, exist_ok=True)
    records = []
    print(f"## GPU: {device_name(device)}, torch {torch.__version__}, triton {__import__('triton').__version__}"
          f" (group {groupsize}, {KEPT_FRAC:.2%} kept, medians of do_bench, L2 flushed)\n")
    print("| out x in | bits | M | dtype | avg bits | rel err | kernel us | F.linear fp16 us | speedup "
          "| kernel GB/s | ceiling 16/avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        W16 = torch.randn(rows, cols, device=device, dtype=torch.float16)  # [rows, cols]
        for bits in bits_list:
            packed, scale, zero, kept = make_layer(rows, cols, bits=bits, groupsize=groupsize, device=device,
                                                   seed=rows + bits)
            kw = dict(bits=bits, groupsize=groupsize, backend="triton")
            W_ref = dequant_weight(packed, scale, zero, kept, cols=cols, bits=bits, groupsize=groupsize,
                                   dtype=torch.float32, backend="torch").double()  # [rows, cols]
            deq = dequant_weight(packed, scale, zero, kept, cols=cols, dtype=torch.float32, **kw)
            if not torch.equal(deq.double(), W_ref):
                raise SystemExit(f"{rows}x{cols} {bits}-bit: the Triton dequant differs from the reference")
            ab = avg_bits(rows, cols, packed, scale, zero, kept)
            t_deq = ms(lambda: dequant_weight(packed, scale, zero, kept, cols=cols, dtype=torch.float16, **kw))
            t_copy = ms(lambda: W16.clone())
            deq_bytes = P.packed_nbytes(packed, scale, zero, kept) + rows * cols * 2  # read packed, write fp16
            (out / f"dequant_{rows}x{cols}_b{bits}_g{groupsize}.json").write_text(json.dumps({
                "kernel": "dequant (+ kept scatter)", "device": device_name(device), "rows": rows,
                "cols": cols, "bits": bits, "groupsize": groupsize, "kept_frac": KEPT_FRAC,
                "us_kernel": round(t_deq * 1e3, 2), "gb_per_s": round(deq_bytes / t_deq / 1e6, 1),
                "copy_gb_per_s": round(2 * rows * cols * 2 / t_copy / 1e6, 1), "date": date.today().isoformat(),
            }, indent=1) + "\n")
            for M in batch:
                for dtype in (torch.float16, torch.bfloat16) if M == 1 else (torch.float16,):
                    x = torch.randn(M, cols, device=device).to(dtype)  # [M, cols]
                    ref = x.double() @ W_ref.T  # [M, rows]
                    y = dequant_matmul(x, packed, scale, zero, kept, **kw)  # tunes on first use
                    err, max_abs = rel_err(y, ref), (y.double() - ref).abs().max().item()
                    if not err < ERR_LIMIT[dtype]:  # no timing of a wrong kernel
                        raise SystemExit(f"{rows}x{cols} {bits}-bit M={M} {dtype}: relative error {err:.2e}")
                    x16 = x.half()
                    t_kernel = ms(lambda: dequant_matmul(x, packed, scale, zero, kept, **kw))
                    t_lin = ms(lambda: F.linear(x16, W16))
                    cfg = [c for k, c in tuning.chosen().items() if k[1:6] == (rows, cols, bits, groupsize, M)
                           and k[6] == dtype]
                    nbytes = P.packed_nbytes(packed, scale, zero, kept) + M * (rows + cols) * x.element_size()
                    rec = measurement(rows=rows, cols=cols, bits=bits, groupsize=groupsize, M=M, dtype=dtype,
                                      t_kernel_ms=t_kernel, t_fp16_ms=t_lin, nbytes=nbytes, err=err, max_abs=max_abs,
                                      config=cfg[0] if cfg else None, device=device)
                    rec["avg_bits"], rec["ceiling_speedup"] = round(ab, 3), round(16 / ab, 2)
                    rec["err_limit"] = ERR_LIMIT[dtype]
                    rec["rel_err_vs_rounded_float64"] = rel_err(y, ref.to(dtype).double())  # the output's own rounding removed
                    records.append(rec)
                    name = f"{rows}x{cols}_b{bits}_g{groupsize}_m{M}_{rec['dtype']}.json"
                    (out / name).write_text(json.dumps(rec, indent=1) + "\n")
                    print(f"| {rows}x{cols} | {bits} | {M} | {rec['dtype']} | {ab:.2f} | {err:.1e} "
                          f"| {t_kernel * 1e3:.1f} | {t_lin * 1e3:.1f} | {t_lin / t_kernel:.2f}x "
                          f"| {rec['gb_per_s']:.0f} | {16 / ab:.2f}x |")
    return records


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
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="GPU: rows of x (M)")
    ap.add_argument("--gpu-bits", type=int, nargs="+", default=list(BITS), help="GPU: bit widths")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "kernels" if os.environ.get("OUT")
                    else Path(__file__).resolve().parent / "results" / "kernels",
                    help="GPU: folder for one JSON per measurement (default bench/results/kernels, or $OUT/kernels)")
    args = ap.parse_args()
    if args.model:
        bench_model(args.bits, args.model_groupsize, args.reps)
    elif torch.cuda.is_available() and not args.cpu:
        bench_gpu(args.groupsize, args.out, tuple(args.batch), tuple(args.gpu_bits))
    else:
        bench_cpu(args.cpu_rows, args.cpu_cols, args.groupsize, args.reps)


if __name__ == "__main__":
    main()
