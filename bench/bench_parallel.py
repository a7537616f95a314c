"""One thread or two: a short GPTQ pass and the backward passes, alone and side by side; the Hessian.

    python bench/bench_parallel.py threads     # a 2-layer, 64 x 512 GPTQ pass and 8 backward passes
    python bench/bench_parallel.py hessian     # GPTQ.add_batch on one [512, cols] input: full vs row blocks

`threads` starts every measurement as a fresh process and interleaves the rounds (the machine's
speed drifts within minutes):
  gptq 2 threads         one process, torch on two threads
  gptq 1 thread          one process, one thread
  gptq 1 thread x 2      two one-thread processes at once (each prints its own seconds)
  grads 2 threads        accumulate_gradients, one process, two threads (seconds per sample)
  grads 2 processes      GradientWorker(...).result(): this process and a forked one, one thread each
This is why TaCQ's first GPTQ pass runs on one thread beside a forked gradient worker
(parallel.GradientWorker): see BENCHMARKS.md. `--tiny` runs everything on a tiny random Llama
(a smoke test, numbers meaningless).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

VOCAB_EMBEDDED, VOCAB_TINY = 49152, 256


def _model(tiny: bool):
    from tacq_lite import load_model
    from tacq_lite.model.loading import tiny_llama

    return (tiny_llama(), None) if tiny else load_model()


def _child(args) -> None:
    """One measurement in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    from tacq_lite.algo import gradients
    from tacq_lite.config import QuantConfig
    from tacq_lite.run import passes
    from tacq_lite.run.parallel import GradientWorker

    model, _ = _model(args.tiny)
    vocab = VOCAB_TINY if args.tiny else VOCAB_EMBEDDED
    gen = torch.Generator().manual_seed(0)
    if args.child == "gptq":
        model.model.layers = model.model.layers[: args.layers]
        windows = torch.randint(0, vocab, (args.n, args.seq_len), generator=gen)  # [n, seq_len]
        start = time.perf_counter()
        passes.gptq_quantize(model, windows, QuantConfig(method="gptq", bits=3), progress=False)
        out = {"seconds": time.perf_counter() - start}
    else:
        ids = torch.randint(0, vocab, (args.samples + 1, args.seq_len), generator=gen)  # [samples + 1, seq_len]
        gradients.accumulate_gradients(model, ids[:1], progress=False)  # warm-up
        start = time.perf_counter()
        if args.workers == 2:
            GradientWorker(model, ids[1:]).result(progress=False)
        else:
            gradients.accumulate_gradients(model, ids[1:], progress=False)
        out = {"seconds_per_sample": (time.perf_counter() - start) / args.samples}
    print(json.dumps(out), flush=True)


def _spawn(common: list[str], extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *common, *extra], stdout=subprocess.PIPE, text=True)


def _read(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a measurement process failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def threads(args) -> dict:
    common = ["--seq-len", str(args.seq_len), "--n", str(args.n), "--layers", str(args.layers),
              "--samples", str(args.samples)] + (["--tiny"] if args.tiny else [])
    runs = {
        "gptq 2 threads": [["--child", "gptq", "--threads", "2"]],
        "gptq 1 thread": [["--child", "gptq", "--threads", "1"]],
        "gptq 1 thread x 2": [["--child", "gptq", "--threads", "1"]] * 2,
        "grads 2 threads": [["--child", "grads", "--threads", "2"]],
        "grads 2 processes": [["--child", "grads", "--threads", "2", "--workers", "2"]],
    }
    got: dict[str, list] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, jobs in runs.items():
            procs = [_spawn(common, extra) for extra in jobs]  # started together
            vals = [next(iter(_read(p).values())) for p in procs]
            got[name].append([round(v, 3) for v in vals] if len(vals) > 1 else round(vals[0], 3))
            print(f"round {r + 1} {name:>18}: {got[name][-1]}", flush=True)
    return {"runs": got, "units": {"gptq": "seconds per pass", "grads": "seconds per sample"}}


def hessian(args) -> dict:
    from tacq_lite.algo import gptq as gptq_module

    out, blocked = {}, gptq_module.HESSIAN_BLOCK
    widths = (64, 96) if args.tiny else (576, 1536)
    try:
        for cols in widths:
            x = torch.randn(args.seq_len, cols)  # [tokens, cols]
            for label, block in (("full product", 10**9), ("row blocks", blocked)):
                gptq_module.HESSIAN_BLOCK = block  # read when a GPTQ object is made
                best = float("inf")
                for _ in range(args.rounds):
                    g = gptq_module.GPTQ(torch.zeros(1, cols))
                    g.add_batch(x)  # warm-up
                    start = time.perf_counter()
                    for _ in range(20):
                        g.add_batch(x)
                    best = min(best, (time.perf_counter() - start) / 20)
                out[f"{cols} cols, {label}"] = round(best * 1e3, 3)
                print(f"[{args.seq_len}, {cols}] {label:>12}: {best * 1e3:.2f} ms (best of {args.rounds} x 20)",
                      flush=True)
    finally:
        gptq_module.HESSIAN_BLOCK = blocked
    return {"ms_per_add_batch": out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", choices=("threads", "hessian"), default="threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n", type=int, default=64, help="calibration windows of the GPTQ pass")
    p.add_argument("--layers", type=int, default=2, help="decoder layers kept for the GPTQ pass")
    p.add_argument("--samples", type=int, default=8, help="backward passes per gradient measurement")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama: a smoke test")
    p.add_argument("--child", choices=("gptq", "grads"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    rec = threads(args) if args.what == "threads" else hessian(args)
    rec.update(what=args.what, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), tiny=args.tiny)
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
