"""Peak memory of a whole `tacq-lite quantize` run, counted over its process tree as PSS.

The gradient worker is a forked process that shares most of its pages with its parent, so adding
the two processes' resident sizes (RSS) would count the shared pages twice. PSS (proportional set
size, Linux /proc/PID/smaps_rollup) gives each shared page to its sharers in equal parts, so the
sum over the tree counts every page once. The tree is sampled every 0.2 s; a spike shorter than
that can be missed, so the peak is a lower bound that is tight for the allocations that matter
here (hundreds of MB held for seconds).

    python bench/bench_memory.py                       # the issue-21 setting, this checkout
    python bench/bench_memory.py --repo /tmp/old-tree  # the same command on another checkout
    python bench/bench_memory.py -- --method gptq      # extra tacq-lite flags after --

Writes bench/results/memory/<label>.json: the command, peak PSS (MiB) of the tree and of the main
process, wall seconds, the run's own JSON record (seconds per stage), the git commit, and the
timeline of samples ([seconds, main MiB, tree MiB]) to see which stage sets the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["--method", "tacq", "--n-calib", "16", "--seq-len", "512", "--no-mse", "--eval", "wikitext2",
           "--eval-tokens", "2048", "--quiet"]


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat parent fields)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=str(ROOT), help="checkout whose tacq_lite runs (default: this one)")
    ap.add_argument("--label", default=None, help="name of the result file (default: the repo's short commit)")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("extra", nargs="*", help="tacq-lite quantize flags replacing the default setting")
    args = ap.parse_args()
    repo = Path(args.repo).resolve()
    if not (repo / "tacq_lite" / "cli.py").is_file():
        print(f"bench_memory: {repo} holds no tacq_lite checkout; pass --repo with one.", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    flags = args.extra or DEFAULT
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        record_path = Path(tmp) / "record.json"
        cmd = [sys.executable, "-m", "tacq_lite.cli", "quantize", *flags, "--cache-dir", f"{tmp}/scores",
               "--json", str(record_path)]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak_tree = peak_main = 0
        timeline = []  # [seconds, main process MiB, tree MiB], every sample
        while proc.poll() is None:
            pids = tree(proc.pid)
            sizes = [pss_kib(p) for p in pids]
            peak_tree, peak_main = max(peak_tree, sum(sizes)), max(peak_main, sizes[0] if sizes else 0)
            timeline.append([round(time.perf_counter() - start, 2), (sizes[0] if sizes else 0) // 1024,
                             sum(sizes) // 1024])
            time.sleep(args.interval)
        seconds = time.perf_counter() - start
        err = proc.stderr.read()
        if proc.returncode != 0:
            print(err[-3000:], file=sys.stderr)
            return 1
        run_record = json.loads(record_path.read_text())
    result = {"date": date.today().isoformat(), "commit": commit, "repo": str(repo),
              "command": "tacq-lite quantize " + " ".join(flags), "threads": os.cpu_count(),
              "peak_pss_tree_mib": peak_tree / 1024, "peak_pss_main_mib": peak_main / 1024,
              "wall_seconds": seconds, "run_seconds": run_record["seconds"],
              "metrics": {k: {m: v.get(m) for m in ("ppl", "ppl_low", "ppl_high", "kl", "n_tokens")}
                          for k, v in run_record["metrics"].items()},
              "timeline": timeline}
    out = ROOT / "bench" / "results" / "memory" / f"{args.label or commit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['command']}\n  commit {commit}: peak PSS {peak_tree / 1024:.0f} MiB (tree), "
          f"{peak_main / 1024:.0f} MiB (main process), {seconds:.0f} s wall -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
