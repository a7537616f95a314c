"""What recomputation in TaCQ's backward passes buys: peak memory and time of the gradient pass, three ways.

    python bench/bench_checkpointing.py                 # the embedded model, 3 samples of 512 tokens
    python bench/bench_checkpointing.py --tiny          # a tiny random Llama (tests use it)

- plain: autograd keeps every activation the backward pass needs (the default);
- selective: each decoder layer is checkpointed with a policy that keeps the matmul and attention
  outputs and recomputes the elementwise ops (norms, rotary, SiLU, products, residual adds) in
  backward (torch's selective activation checkpointing), an experiment, not a library option;
- full: `--checkpointing`, each decoder layer recomputed whole in backward.

For each: wall seconds of `accumulate_gradients`, the peak RSS above the process's RSS before it
(sampled every 10 ms), and a hash of G, which must be the same three times (recomputing
deterministic CPU ops gives the same values). One process per mode, so peaks do not mix.
Writes bench/results/memory/checkpointing.json.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("plain", "selective", "full")


def selective_policy():
    from torch.utils.checkpoint import CheckpointPolicy

    keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def measure(mode: str, tiny: bool, n: int, seq_len: int) -> dict:
    import psutil

    from tacq_lite.algo import gradients
    from tacq_lite.model.loading import load_model, tiny_llama

    model = tiny_llama() if tiny else load_model()[0]
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        enable = gradients._enable_checkpointing

        def enable_selective(m):
            enable(m)
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
                "use_reentrant": False,
                "context_fn": functools.partial(create_selective_checkpoint_contexts, selective_policy())})

        gradients._enable_checkpointing = enable_selective
    ids = torch.randint(0, model.config.vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(0))
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    before = proc.memory_info().rss
    watcher = threading.Thread(target=watch)
    watcher.start()
    t = time.perf_counter()
    acc = gradients.accumulate_gradients(model, ids, progress=False, checkpointing=mode != "plain")
    seconds = time.perf_counter() - t
    done.set()
    watcher.join()
    h = hashlib.sha256()
    for name in sorted(acc.G):
        h.update(acc.G[name].numpy().tobytes())
    return {"mode": mode, "seconds": seconds, "peak_above_start_mib": (peak[0] - before) / 2**20,
            "G_sha256": h.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measurement, in a child process
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory" / "checkpointing.json")
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args.tiny, args.n, args.seq_len)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--n", str(args.n), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode:9s} {rows[-1]['seconds']:6.1f} s  peak +{rows[-1]['peak_above_start_mib']:6.0f} MiB  "
              f"G {rows[-1]['G_sha256'][:12]}")
    record = {"date": date.today().isoformat(), "model": "tiny" if args.tiny else "embedded", "samples": args.n,
              "seq_len": args.seq_len, "threads": torch.get_num_threads(), "rows": rows,
              "same_G": len({r["G_sha256"] for r in rows}) == 1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
