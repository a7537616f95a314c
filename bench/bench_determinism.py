"""What changes a TaCQ result besides the seed: the thread count and the forked gradient worker.

    python bench/bench_determinism.py                  # 8 x 256 calibration, 3-bit min/max, 16 x 256 eval tokens
    python bench/bench_determinism.py --n-calib 64 --seq-len 512 --eval-tokens 32768

Runs `tacq-lite quantize --method tacq` four times with the same seed, each from an empty score
cache: on 1 thread, twice on 2 threads with the forked gradient worker (the default on 2 cores),
and on 2 threads with `--no-parallel`. Each saved model is compared with the first 2-thread
worker run: whether `model.safetensors` is bit-identical, the fraction of quantization codes and
of keep-mask entries that differ, and the WikiText-2 perplexity with its bootstrap interval.
Writes bench/results/determinism/<settings>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tacq_lite.core.pack import SparseKept, unpack_sparse  # noqa: E402
from tacq_lite.io import write_json_atomic  # noqa: E402
from tacq_lite.model.checkpoint import TENSOR_FILE, read_meta  # noqa: E402

SETTINGS = {  # name: (OMP_NUM_THREADS, extra flags)
    "1 thread": ("1", []),
    "2 threads, worker": ("2", []),
    "2 threads, worker (again)": ("2", []),
    "2 threads, --no-parallel": ("2", ["--no-parallel"]),
}
REFERENCE = "2 threads, worker"


def codes_and_masks(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / TENSOR_FILE))
    out = {}
    for name, spec in read_meta(folder)["layers"].items():
        out[f"codes/{name}"] = tensors[f"{name}.qweight"]
        kept = SparseKept(tensors[f"{name}.kept_row_ptr"], tensors[f"{name}.kept_col_idx"], tensors[f"{name}.kept_values"])
        out[f"mask/{name}"] = unpack_sparse(kept, (spec["out_features"], spec["in_features"]))[1]
    return out


def differing(a: dict, b: dict, part: str) -> float:
    """Fraction of packed code words (part 'codes') or mask entries (part 'mask') that differ."""
    names = [n for n in a if n.startswith(part + "/")]
    return sum(int((a[n] != b[n]).sum()) for n in names) / sum(a[n].numel() for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16 * 256)
    p.add_argument("--ratio", type=float, default=0.0035)
    p.add_argument("--model", default="embedded", help="'embedded', a Hugging Face id or a local folder")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "determinism"), help="folder for the JSON")
    args = p.parse_args()
    flags = ["--model", args.model, "--method", "tacq", "--bits", "3", "--no-mse", "--ratio", str(args.ratio), "--n-calib", str(args.n_calib),
             "--seq-len", str(args.seq_len), "--eval", "wikitext2", "--eval-tokens", str(args.eval_tokens), "--no-kl",
             "--quiet"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (threads, extra)) in enumerate(SETTINGS.items()):
            out = Path(tmp) / f"run{i}"
            cmd = [sys.executable, "-m", "tacq_lite.cli", "quantize", *flags, *extra, "--cache-dir", str(out / "cache"),
                   "--save", str(out / "model"), "--json", str(out / "record.json")]
            subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": threads})
            record = json.loads((out / "record.json").read_text())
            runs[name] = {"record": record, "tensors": codes_and_masks(out / "model"),
                          "sha256": hashlib.sha256((out / "model" / TENSOR_FILE).read_bytes()).hexdigest()}
            print(f"{name}: ppl {record['metrics']['wikitext2']['ppl']:.2f}", flush=True)
    ref = runs[REFERENCE]
    rows = []
    for name, run in runs.items():
        m = run["record"]["metrics"]["wikitext2"]
        rows.append({"setting": name, "threads": SETTINGS[name][0], "flags": SETTINGS[name][1],
                     "identical_to_reference": run["sha256"] == ref["sha256"],
                     "codes_differing": differing(run["tensors"], ref["tensors"], "codes"),
                     "mask_differing": differing(run["tensors"], ref["tensors"], "mask"),
                     "ppl": m["ppl"], "ppl_low": m["ppl_low"], "ppl_high": m["ppl_high"],
                     "n_windows": m["n_windows"], "n_tokens": m["n_tokens"], "sha256": run["sha256"]})
    print(f"\n`python bench/bench_determinism.py {' '.join(sys.argv[1:])}`, {date.today()}, reference: {REFERENCE}\n")
    print("| setting | model.safetensors identical | packed code words differing | keep-mask entries differing "
          "| WikiText-2 ppl [95 % CI] |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {'yes' if r['identical_to_reference'] else 'no'} | {r['codes_differing']:.2%} | "
              f"{r['mask_differing']:.4%} | {r['ppl']:.2f} [{r['ppl_low']:.2f}, {r['ppl_high']:.2f}] |")
    print(f"\n{rows[0]['n_windows']} windows × {rows[0]['n_tokens'] // rows[0]['n_windows']} tokens")
    name = f"n{args.n_calib}_s{args.seq_len}_e{args.eval_tokens}_r{args.ratio}.json"
    out = write_json_atomic(Path(args.out) / name,
                            {"date": str(date.today()), "command": f"python bench/bench_determinism.py "
                             f"{' '.join(sys.argv[1:])}".strip(), "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
