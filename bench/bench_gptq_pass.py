"""Time one true-sequential GPTQ pass over the embedded model, and fingerprint its result.

    OMP_NUM_THREADS=2 python bench/bench_gptq_pass.py --n-calib 16          # MSE range search on
    OMP_NUM_THREADS=2 python bench/bench_gptq_pass.py --n-calib 16 --no-mse

Prints the pass's seconds and a sha256 of every parameter after quantization: a change that only
makes the pass faster must leave the fingerprint as it was (run it at both commits). A change that
also moves float rounding (another BLAS call, another factorization) changes the fingerprint; then
`--save` both results and compare them with `--compare`:

    PYTHONPATH=. python bench/bench_gptq_pass.py --n-calib 16 --save /tmp/new.safetensors
    python bench/bench_gptq_pass.py --compare /tmp/old.safetensors /tmp/new.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
import time

import torch

from tacq_lite import load_model
from tacq_lite.config import QuantConfig
from tacq_lite.data import corpus
from tacq_lite.run import passes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--groupsize", type=int, default=-1)
    p.add_argument("--no-mse", dest="mse", action="store_false")
    p.add_argument("--save", default=None, help="write the quantized linears' weights to this .safetensors file")
    p.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"),
                   help="compare two --save files (share of weights that differ, largest difference) and exit")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return

    model, tok = load_model()
    windows = corpus.calibration_windows(tok, n=args.n_calib, seq_len=args.seq_len)
    config = QuantConfig(method="gptq", bits=args.bits, groupsize=args.groupsize, mse=args.mse,
                         n_calib=args.n_calib, seq_len=args.seq_len)
    start = time.perf_counter()
    passes.gptq_quantize(model, windows, config, progress=False)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for _, param in model.named_parameters():
        digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
    print(f"GPTQ pass: {args.n_calib} x {args.seq_len} tokens, {args.bits}-bit, group {args.groupsize}, "
          f"mse={args.mse}, {torch.get_num_threads()} threads: {seconds:.1f} s; weights sha256 {digest.hexdigest()[:16]}")
    if args.save:
        from safetensors.torch import save_file

        from tacq_lite.model import walk

        save_file({n: lin.weight.detach().contiguous() for n, lin in walk.named_linears(model).items()}, args.save)


def compare(a: str, b: str) -> None:
    from safetensors.torch import load_file

    A, B = load_file(a), load_file(b)
    if A.keys() != B.keys():
        raise SystemExit(f"{a} and {b} hold different linears; were they saved from the same model?")
    total = sum(w.numel() for w in A.values())
    differ = sum(int((A[n] != B[n]).sum()) for n in A)
    worst = max((A[n] - B[n]).abs().max().item() for n in A)
    print(f"{differ} of {total} weights differ ({differ / total:.2e}); largest difference {worst:.3g}")


if __name__ == "__main__":
    main()
