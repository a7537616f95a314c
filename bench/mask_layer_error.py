"""Does a random keep-mask help GPTQ on one layer? Layer error with no mask and with random masks.

    python bench/mask_layer_error.py                         # decoder layer 0, 8 x 512 tokens, 3-bit, min/max
    python bench/mask_layer_error.py --layer 15 --ratios 0,0.0035,0.01,0.03

Every linear of one decoder layer of the embedded model is quantized with GPTQ from the
full-precision inputs of that layer, with no mask and with random masks of each ratio (the same
Hessian for all), once per `keep_value`. A kept weight sends no error forward (TaCQ's masked
GPTQ) and stores either its compensated working value (the default, as the authors' code) or its
original value, which drops the compensation that earlier columns pushed onto it. The printed
table has both the true layer error ‖x Wᵀ − x Ŵᵀ‖² / n measured on the calibration inputs and
GPTQ's own estimate (`loss`), which counts only the rounding errors of the quantized weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tacq_lite.algo.gptq import GPTQ, KEEP_VALUES, reconstruction_error  # noqa: E402
from tacq_lite.data import corpus  # noqa: E402
from tacq_lite.model import loading, walk  # noqa: E402


def layer_inputs(model, windows: torch.Tensor, layer_index: int) -> dict[str, torch.Tensor]:
    """{linear name: its inputs [n·seq_len, cols]} in one decoder layer, full precision.

    walk._inputs_of stops each forward at the layer's last linear, so later layers never run.
    """
    linears = walk.layer_linears(walk.decoder_layers(model)[layer_index])
    with torch.no_grad():
        seen = [walk._inputs_of(lambda w=w: model(w[None], use_cache=False), linears) for w in windows]
    return {n: torch.cat([s[n] for s in seen]).reshape(-1, lin.in_features) for n, lin in linears.items()}


def run(model, windows, *, layer_index: int, ratios: list[float], bits: int, mse: bool, seed: int) -> list[dict]:
    rows = []
    inputs = layer_inputs(model, windows, layer_index)
    for name, lin in walk.layer_linears(walk.decoder_layers(model)[layer_index]).items():
        gptq = GPTQ(lin)
        gptq.add_batch(inputs[name])
        W = lin.weight.detach()
        for ratio in ratios:
            gen = torch.Generator().manual_seed(seed)
            mask = torch.rand(W.shape, generator=gen) < ratio if ratio > 0 else None  # [rows, cols]
            for keep_value in KEEP_VALUES if mask is not None else ("-",):
                res = gptq.quantize(bits=bits, mse=mse, mask=mask,
                                    **({} if mask is None else {"keep_value": keep_value}))
                rows.append(dict(linear=name, ratio=ratio, keep_value=keep_value,
                                 kept=0 if mask is None else int(mask.sum()),
                                 layer_error=reconstruction_error(inputs[name], W, res.W_hat), gptq_loss=res.loss))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| linear | random ratio | kept | keep value | layer error | change vs no mask | GPTQ's loss |",
             "|---|---|---|---|---|---|---|"]
    base = {r["linear"]: r["layer_error"] for r in rows if r["ratio"] == 0}
    for r in rows:
        change = f"{r['layer_error'] / base[r['linear']] - 1:+.2%}" if r["linear"] in base else "-"
        lines.append(f"| {r['linear']} | {r['ratio']:.2%} | {r['kept']} | {r['keep_value']} | {r['layer_error']:.4f} | {change} | "
                     f"{r['gptq_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--mse", action="store_true", help="GPTQ's MSE range search (default: min/max grids)")
    p.add_argument("--ratios", default="0,0.0035,0.01")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama and random tokens (for the tests)")
    p.add_argument("--json", default=None, help="also write the rows and the settings to this JSON file")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    if any(not 0 <= r < 1 for r in ratios):
        raise SystemExit(f"--ratios {args.ratios}: each ratio must be in [0, 1).")
    if args.tiny:
        model = loading.tiny_llama()
        windows = torch.randint(0, 256, (args.n_calib, args.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        model, tok = loading.load_model()
        windows = corpus.calibration_windows(tok, n=args.n_calib, seq_len=args.seq_len)
    if not 0 <= args.layer < len(walk.decoder_layers(model)):
        raise SystemExit(f"--layer {args.layer}: the model has {len(walk.decoder_layers(model))} decoder layers.")
    rows = run(model, windows, layer_index=args.layer, ratios=ratios, bits=args.bits, mse=args.mse, seed=args.seed)
    print(table(rows))
    if args.json:
        from tacq_lite.io import write_json_atomic

        write_json_atomic(args.json, {"settings": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
