"""Memory and speed of TaCQ's gradient pass (G = Σ|dL/dW|) on a Llama-3-8B-shaped model.

The authors needed three GPUs for this pass on Llama-3-8B. tacq_lite keeps no per-sample
gradient (a post-accumulate hook folds |g| into the accumulator and frees it), and offers three
knobs: accumulators on the host (--accum-device cpu), in bf16 (--accum-dtype bfloat16), and
gradient checkpointing (--checkpointing). The model is randomly initialised from a config, so
nothing is downloaded; random weights cost the same memory and time as trained ones.

    python bench/bench_importance_memory.py --device cuda                          # fp32 accumulators on the GPU
    python bench/bench_importance_memory.py --device cuda --accum-device cpu --checkpointing
    python bench/bench_importance_memory.py --device cpu --layers 1 --seq-len 128 --samples 2   # a CPU smoke run
    python bench/bench_importance_memory.py --device meta                         # predicted bytes only

Prints and writes (bench/results/importance_memory/<name>.json) seconds per sample, peak memory
(CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the process) and the byte budget
predicted from the shapes: fp32 weights + accumulators + nothing else, so the gap is activations
and allocator overhead.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tacq_lite.algo.gradients import accumulate_gradients  # noqa: E402
from tacq_lite.model import walk  # noqa: E402

# Public architecture numbers (config.json of each model); weights are random.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                      max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=2048),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GIB = 2**30


def build(shape: str, layers: int | None, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise SystemExit(f"--layers must be >= 1, got {layers}.")
        kw["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**kw)).float().eval()
    return model


def predicted_bytes(model, accum_dtype: torch.dtype, accum_on_device: bool) -> dict[str, int]:
    """Bytes the pass must hold whatever the activations: weights, and the accumulators."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    targeted = sum(lin.weight.numel() for lin in walk.named_linears(model).values())
    accum = targeted * torch.tensor([], dtype=accum_dtype).element_size()
    return {"weights": weights, "accumulators": accum, "on_device": weights + (accum if accum_on_device else 0),
            "targeted_weights": targeted}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args) -> dict:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu (with --layers 1).")
    if args.samples < 1 or args.seq_len < 2:
        raise SystemExit("--samples must be >= 1 and --seq-len >= 2.")
    t0 = time.perf_counter()
    model = build(args.shape, args.layers, args.device)
    build_s = time.perf_counter() - t0
    accum_dtype = DTYPES[args.accum_dtype]
    accum_device = None if args.accum_device == "same" else args.accum_device
    pred = predicted_bytes(model, accum_dtype, accum_device in (None, args.device))
    if args.device == "meta":  # shapes only: the byte budget, nothing run
        return {"date": str(date.today()), "shape": args.shape, "layers": model.config.num_hidden_layers,
                "device": "meta (prediction only)", "accum_dtype": args.accum_dtype,
                "accum_device": args.accum_device, "targeted_weights": pred["targeted_weights"],
                "predicted_gib": {k: round(v / GIB, 2) for k, v in pred.items() if k != "targeted_weights"}}
    vocab = model.config.vocab_size
    samples = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    kw = dict(accum_dtype=accum_dtype, accum_device=accum_device, checkpointing=args.checkpointing, progress=False)
    if args.device == "cuda":
        accumulate_gradients(model, samples[:1], **kw)  # warm-up: cuBLAS handles, kernel selection
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = accumulate_gradients(model, samples, **kw)
    if args.device == "cuda":
        torch.cuda.synchronize()  # the last sample's kernels are queued, not done, when the loop returns
    seconds_per_sample = (time.perf_counter() - t0) / args.samples
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        peak_kind = "torch.cuda.max_memory_allocated"
        extra = {"peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
                 "float32_matmul_precision": torch.get_float32_matmul_precision(), "torch": torch.__version__}
        device_name = torch.cuda.get_device_name()
    else:
        peak, peak_kind, device_name = peak_rss_bytes(), "peak RSS of the process", "cpu"
        extra = {}
    finite = all(bool(torch.isfinite(g).all()) and bool((g > 0).any()) for g in res.G.values())
    return {
        "date": str(date.today()), "command": "python bench/bench_importance_memory.py " + " ".join(sys.argv[1:]),
        "shape": args.shape, "layers": model.config.num_hidden_layers, "device": device_name,
        "threads": torch.get_num_threads(), "samples": args.samples, "seq_len": args.seq_len,
        "accum_dtype": args.accum_dtype, "accum_device": args.accum_device, "checkpointing": args.checkpointing,
        "build_seconds": round(build_s, 1), "seconds_per_sample": round(seconds_per_sample, 3),
        "timing": "wall clock over all samples after a one-sample warm-up (CUDA: synchronized)" if args.device == "cuda" else "wall clock over all samples",
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 2), "peak_kind": peak_kind,
        "predicted_gib": {k: round(v / GIB, 2) for k, v in pred.items() if k != "targeted_weights"},
        "targeted_weights": pred["targeted_weights"], "accumulators_finite_and_nonzero": finite,
        **extra,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="cut the decoder to this many layers (CPU smoke runs)")
    p.add_argument("--device", choices=["cuda", "cpu", "meta"], default="cuda",
                   help="meta: print the predicted bytes from the shapes only (no run)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--accum-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--accum-device", choices=["same", "cpu"], default="same")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "importance_memory"))
    args = p.parse_args(argv)
    try:
        rec = run(args)
    except torch.OutOfMemoryError as err:  # a result too: this setting does not fit the device
        rec = {"date": str(date.today()), "command": "python bench/bench_importance_memory.py " + " ".join(sys.argv[1:]),
               "shape": args.shape, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
               "device": torch.cuda.get_device_name(), "seq_len": args.seq_len, "accum_dtype": args.accum_dtype,
               "accum_device": args.accum_device, "checkpointing": args.checkpointing,
               "out_of_memory": str(err).splitlines()[0]}
    name = (f"{args.shape}_L{rec['layers']}_{args.device}_T{args.seq_len}_acc-{args.accum_dtype}-{args.accum_device}"
            f"{'_ckpt' if args.checkpointing else ''}.json")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=2))
    tmp.replace(out / name)
    print(json.dumps(rec, indent=2))
    return rec


if __name__ == "__main__":
    main()
