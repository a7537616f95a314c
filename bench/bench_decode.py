"""Greedy decoding at batch 1: fp16 nn.Linear against packed 3-bit + 0.35 % kept QuantLinear.

Decoding one token reads every weight once, so this is where packed weights should pay off.
Both models decode the same prompt with a static key/value cache. On a GPU each decode step is
also captured once as a CUDA graph and replayed, so that kernel-launch overhead, the same for
both models, does not hide the difference in bytes read; the eager figures are recorded too.
Greedy tokens from the graph are checked against the eager run of the same model.

    python bench/bench_decode.py --shape llama-3.2-1b            # GPU: the 1B shape, random weights
    python bench/bench_decode.py --model embedded                # the embedded SmolLM2 (group 64)
    python bench/bench_decode.py --shape tiny --device cpu       # a CPU smoke run (tests use it)

Weights are random (bench_gpu.random_model: public config numbers, nothing downloaded), which
costs the same time as trained weights. The packed model is the fp16 model round-to-nearest
quantized in float32 (group 128), with 0.35 % of weights, chosen at random, kept at their fp16
values. Writes <out>/decode_<shape>_<bits>bit.json (default out: bench/results/kernels, or
$OUT/kernels when set).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gpu import checked_placement, random_model  # noqa: E402

from tacq_lite.config import QuantConfig  # noqa: E402
from tacq_lite.eval.continuation import cache_keyword  # noqa: E402
from tacq_lite.kernels import tuning  # noqa: E402
from tacq_lite.model import placement, walk  # noqa: E402
from tacq_lite.model.qlinear import convert_model, quant_linears  # noqa: E402
from tacq_lite.run import budget  # noqa: E402
from tacq_lite.run.passes import rtn_quantize  # noqa: E402

KEPT_FRAC = 0.0035


@torch.no_grad()
def packed_copy(model, *, bits: int, groupsize: int, kept_frac: float, seed: int = 0):
    """RTN-quantize a copy of `model` in float32, keep a random `kept_frac` of weights, pack it."""
    q = copy.deepcopy(model).float()
    rtn = rtn_quantize(q, QuantConfig(method="rtn", bits=bits, groupsize=groupsize, mse=False))
    gen = torch.Generator().manual_seed(seed)
    originals = walk.named_linears(model)
    masks = {}
    for name, linear in walk.named_linears(q).items():
        masks[name] = (torch.rand(linear.weight.shape, generator=gen) < kept_frac).to(linear.weight.device)
        W = linear.weight
        W[masks[name]] = originals[name].weight.float()[masks[name]]  # kept weights hold their fp16 values
    convert_model(q, rtn.grids, bits=bits, groupsize=groupsize, masks=masks, codes=rtn.codes)
    return q.to(next(model.parameters()).dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, n_new: int, *, graph: bool, warmup: int = 3) -> dict:
    """Greedy decoding of n_new tokens after `prompt` [1, P]: the tokens and seconds per decode step.

    The step reads its token and position from two buffers and writes the next ones back, so
    the same step can be replayed as a CUDA graph. `warmup` eager steps come first (they run the
    kernel tuner and fill caches) and belong to the generated sequence."""
    from transformers import StaticCache

    device, P = prompt.device, prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=P + warmup + n_new + 1)
    kw = {cache_keyword(model): cache, "use_cache": True}
    logits = model(input_ids=prompt, position_ids=torch.arange(P, device=device)[None], **kw).logits
    tok = logits[:, -1:].argmax(-1)  # [1, 1]
    pos = torch.full((1, 1), P, dtype=torch.long, device=device)
    tokens = [tok.clone()]

    def step():
        out = model(input_ids=tok, position_ids=pos, **kw).logits
        tok.copy_(out[:, -1:].argmax(-1))
        pos.add_(1)

    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(warmup):
            step()
            tokens.append(tok.clone())
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    run = step
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()  # recorded, not run
        run = g.replay
    sync(device)
    t = time.perf_counter()
    for _ in range(n_new):
        run()
        tokens.append(tok.clone())  # a device copy: no host sync inside the loop
    sync(device)
    seconds = time.perf_counter() - t
    return {"tokens": torch.cat(tokens, 1)[0].tolist(), "s_per_token": seconds / n_new, "tokens_per_s": n_new / seconds}


def linear_bytes(model) -> int:
    """Bytes of the decoder linears as stored: fp16 weights, or packed codes + grid + kept."""
    packed = quant_linears(model)
    if packed:
        return sum(q.nbytes() for q in packed.values())
    return sum(m.weight.numel() * m.weight.element_size() for m in walk.named_linears(model).values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3.2-1b", choices=["tiny", *budget.SHAPES])
    ap.add_argument("--model", default=None, help="'embedded' for the embedded SmolLM2 (overrides --shape)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--groupsize", type=int, default=None, help="default 128 (64 for the embedded model)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-graph", action="store_true", help="eager decoding only, also on a GPU")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "kernels" if os.environ.get("OUT")
                    else ROOT / "bench" / "results" / "kernels")
    args = ap.parse_args(argv)
    if (placed := checked_placement(args.device, args.dtype, "bench_decode")) is None:
        return 2
    device, dtype = placed
    name = args.model or args.shape
    groupsize = args.groupsize or (64 if args.model == "embedded" else 128 if args.shape != "tiny" else 32)
    if args.model == "embedded":
        from tacq_lite.model.loading import load_model

        model = load_model("embedded", dtype=dtype)[0]
    else:
        model = random_model(args.shape, dtype, None)
    model = model.to(device).eval()
    packed = packed_copy(model, bits=args.bits, groupsize=groupsize, kept_frac=KEPT_FRAC)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    graph = device.type == "cuda" and not args.no_graph
    record = {"date": date.today().isoformat(), "model": name, "device": placement.device_info(device),
              "torch": torch.__version__, "dtype": args.dtype, "bits": args.bits, "groupsize": groupsize,
              "kept_frac": KEPT_FRAC, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "linear_bytes": {}, "eager": {}, "cuda_graph": {}, "graph_error": None}
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    for label, m in (("fp16_linear" if dtype == torch.float16 else f"{args.dtype}_linear", model),
                     ("packed", packed)):
        record["linear_bytes"][label] = linear_bytes(m)
        eager = decode(m, prompt, args.new_tokens, graph=False)
        record["eager"][label] = {"tokens_per_s": eager["tokens_per_s"], "tokens": eager["tokens"]}
        if graph:
            try:
                g = decode(m, prompt, args.new_tokens, graph=True)
                record["cuda_graph"][label] = {"tokens_per_s": g["tokens_per_s"],
                                               "tokens_match_eager": g["tokens"] == eager["tokens"]}
            except Exception as err:  # recorded: the eager figures still stand
                record["graph_error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    dense, quant = record["linear_bytes"]
    for mode in ("eager", "cuda_graph"):
        if quant in record[mode] and dense in record[mode]:
            record[mode]["speedup"] = record[mode][quant]["tokens_per_s"] / record[mode][dense]["tokens_per_s"]
    record["kernel_configs"] = len(tuning.chosen())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode_{name}_{args.bits}bit.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    for mode in ("eager", "cuda_graph"):
        if record[mode]:
            print(f"{name} {mode}: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in record[mode].items()
                                                 if isinstance(v, dict))
                  + (f", speedup {record[mode]['speedup']:.2f}x" if "speedup" in record[mode] else ""))
    if record["graph_error"]:
        print(f"CUDA graph capture failed: {record['graph_error']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
