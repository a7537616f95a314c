"""Time one true-sequential GPTQ pass over the embedded model, and fingerprint its result.

    OMP_NUM_THREADS=2 python bench/bench_gptq_pass.py --n-calib 16          # MSE range search on
    OMP_NUM_THREADS=2 python bench/bench_gptq_pass.py --n-calib 16 --no-mse

Prints the pass's seconds and a sha256 of every parameter after quantization: a change that only
makes the pass faster must leave the fingerprint as it was (run it at both commits).
"""
from __future__ import annotations

import argparse
import hashlib
import time

import torch

from tacq_lite import data, load_model, pipeline
from tacq_lite.config import QuantConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-calib", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--groupsize", type=int, default=-1)
    p.add_argument("--no-mse", dest="mse", action="store_false")
    args = p.parse_args()

    model, tok = load_model()
    windows = data.calibration_windows(tok, n=args.n_calib, seq_len=args.seq_len)
    config = QuantConfig(method="gptq", bits=args.bits, groupsize=args.groupsize, mse=args.mse,
                         n_calib=args.n_calib, seq_len=args.seq_len)
    start = time.perf_counter()
    pipeline.gptq_quantize(model, windows, config, progress=False)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for _, param in model.named_parameters():
        digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
    print(f"GPTQ pass: {args.n_calib} x {args.seq_len} tokens, {args.bits}-bit, group {args.groupsize}, "
          f"mse={args.mse}, {torch.get_num_threads()} threads: {seconds:.1f} s; weights sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
