"""How the selectors' keep-masks differ: Jaccard overlap, where they land, what the kept weights look like.

    python bench/mask_overlap.py                      # the selector table's setting (3-bit per channel, 64 x 512, no MSE)
    python bench/mask_overlap.py --selectors tacq,gradient,fisher --ratio 0.01

Reads Q(W) and the gradients from the score cache that `bench_quality.py selectors` left (and
computes them when missing, which takes the GPTQ pass and 64 backward passes). Prints markdown:
pairwise Jaccard of the masks, the share of each module kind kept, and the median |W|, |Q(W) − W|
and G of the kept weights next to those of all weights.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tacq_lite.algo.select import mask_report  # noqa: E402
from tacq_lite.config import QuantConfig  # noqa: E402
from tacq_lite.data import corpus  # noqa: E402
from tacq_lite.model import loading  # noqa: E402
from tacq_lite.run.tacq import build_masks, compute_importance  # noqa: E402


def jaccard(a: dict, b: dict) -> float:
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def sampled_median(parts: list[torch.Tensor], n: int = 2_000_000, seed: int = 0) -> float:
    flat = torch.cat([p.flatten() for p in parts])
    if flat.numel() > n:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:n]]
    return flat.median().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--groupsize", type=int, default=-1)
    p.add_argument("--mse", action="store_true")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.0035)
    p.add_argument("--selectors", default="tacq,gradient,fisher,qal,msg,magnitude")
    args = p.parse_args(argv)
    sels = args.selectors.split(",")
    model, tok = loading.load_model()
    cfg = QuantConfig(method="tacq", bits=args.bits, groupsize=args.groupsize, mse=args.mse,
                      n_calib=args.n_calib, seq_len=args.seq_len)
    windows = corpus.calibration_windows(tok, "wikitext2", n=args.n_calib, seq_len=args.seq_len, seed=cfg.seed)
    # "fisher" needs Q(W), G and G²: its inputs cover every gradient selector.
    inp = compute_importance(model, windows, cfg, selector="fisher", progress=False)
    masks = {s: build_masks(inp, selector=s, ratio=args.ratio, seed=cfg.seed) for s in sels}

    print(f"Jaccard of the keep-masks ({args.bits}-bit, group {args.groupsize}, {args.ratio:.2%} kept):\n")
    print("| | " + " | ".join(sels) + " |")
    print("|---" * (len(sels) + 1) + "|")
    for a in sels:
        print(f"| {a} | " + " | ".join(f"{jaccard(masks[a], masks[b]):.3f}" for b in sels) + " |")

    kinds = list(mask_report(masks[sels[0]]).per_module)
    print("\nShare of each module kind's weights kept (%), and the two layers that get the most:\n")
    print("| selector | " + " | ".join(kinds) + " | top layers |")
    print("|---" * (len(kinds) + 2) + "|")
    for s in sels:
        r = mask_report(masks[s])
        top = sorted(r.per_layer.items(), key=lambda kv: -kv[1])[:2]
        print(f"| {s} | " + " | ".join(f"{100 * r.per_module[k] / r.module_weights[k]:.2f}" for k in kinds)
              + " | " + ", ".join(f"{layer} ({n:,})" for layer, n in top) + " |")

    err = {n: (inp.QW[n] - inp.W[n]).abs() for n in inp.W}
    print("\nMedian of the kept weights' factors (all weights: a 2M sample):\n")
    print("| kept by | median \\|W\\| | median \\|Q(W) − W\\| | median G |\n|---|---|---|---|")
    for s in sels:
        m = masks[s]
        print(f"| {s} | {sampled_median([inp.W[n].abs()[m[n]] for n in m]):.4f} | "
              f"{sampled_median([err[n][m[n]] for n in m]):.4f} | {sampled_median([inp.G[n][m[n]] for n in m]):.4g} |")
    print(f"| all weights | {sampled_median([w.abs() for w in inp.W.values()]):.4f} | "
          f"{sampled_median(list(err.values())):.4f} | {sampled_median(list(inp.G.values())):.4g} |")


if __name__ == "__main__":
    main()
