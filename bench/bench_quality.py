"""Quality benchmarks of the embedded model: perplexity / KL / seconds / memory per method.

    python bench/bench_quality.py rtn   --eval-tokens 8192
    python bench/bench_quality.py gptq  --n-calib 64 --seq-len 512
    python bench/bench_quality.py tacq  --n-calib 64 --seq-len 512
    python bench/bench_quality.py selectors --eval-tokens 4096     # 11 rows, about an hour on one core
    python bench/bench_quality.py tasks --eval-tokens 4096         # issue 6's matrix: MMLU, GSM8K, synthetic
    python bench/bench_quality.py generation --eval-tokens 4096    # GSM8K chain-of-thought generation, 10 questions
    python bench/bench_quality.py selectors-mse --eval-tokens 4096 # tacq vs msg with MSE grids, 0.35 % and 1 %
    python bench/bench_quality.py selectors-1pct --eval-tokens 4096  # every selector at 1 % kept, min/max grids
    python bench/bench_quality.py selectors-2bit --eval-tokens 4096  # every selector at 2-bit g64, both budgets

Each row is one `tacq-lite quantize` run (tacq_lite.cli.run_quantize) in a fresh process, so
peak RSS is per run. Records go to bench/results/<suite>/*.json and a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITES = {
    "rtn": [dict(method="fp")] + [
        dict(method="rtn", bits=b, groupsize=g, mse=False) for b in (8, 4, 3, 2) for g in (-1, 64, 32)
    ],
    "gptq": [dict(method=m, bits=b, groupsize=g) for b, g in ((4, -1), (3, -1), (2, 64), (4, 64), (3, 64), (2, -1))
             for m in ("rtn", "gptq")],
    "tacq": [dict(method="gptq", bits=3, groupsize=-1), dict(method="gptq", bits=2, groupsize=64)] + [
        dict(method="tacq", bits=b, groupsize=g, selector=s, ratio=r)
        for b, g in ((3, -1), (2, 64))
        for r in (0.0035, 0.01)
        for s in ("tacq", "magnitude", "gradient", "qal", "msg", "fisher", "hessian", "activation", "owq_columns", "random")
    ],
    # The selector table at CPU cost: 3-bit per channel, 0.35 %, min/max grids (no MSE search), every
    # selector. hessian first (its Q(W) pass also records the Hessian diagonals), fisher second (its
    # gradient pass also records the squares): every later selector reads both from the score cache.
    "selectors": [dict(method="gptq", bits=3, groupsize=-1, mse=False)] + [
        dict(method="tacq", bits=3, groupsize=-1, mse=False, selector=s, ratio=0.0035)
        for s in ("hessian", "fisher", "tacq", "magnitude", "gradient", "qal", "msg", "activation", "owq_columns",
                  "random")
    ] + [
        # TaCQ's score with Q(W) from RTN instead of GPTQ: |Q(W) - W| is then the bare rounding error.
        dict(method="tacq", bits=3, groupsize=-1, mse=False, selector="tacq", ratio=0.0035, qw_method="rtn"),
    ],
    # Issue 6's matrix: every metric for full precision, RTN, GPTQ and TaCQ calibrated on general text
    # (WikiText-2) or on each task, at 3 bits per channel with min/max grids. MMLU: all 57 subjects,
    # 5 test questions each (285); GSM8K: answer NLL on 200 test questions (no generation: see
    # BENCHMARKS.md); the synthetic suite: 20 items per task. GSM8K / MMLU calibration uses
    # n_calib task samples (train solutions; dev + val questions), WikiText-2 n_calib windows.
    "tasks": [dict(method="fp")] + [
        row for b, g in ((3, -1), (2, 64)) for row in (
            [dict(method="rtn", bits=b, groupsize=g, mse=False), dict(method="gptq", bits=b, groupsize=g, mse=False)]
            + [dict(method="tacq", bits=b, groupsize=g, mse=False, selector="tacq", ratio=0.0035, calib=c)
               for c in ("wikitext2", "gsm8k", "mmlu")])
    ],
}
# The selector table at the larger budget, 1 % kept, same settings; the Q(W), gradients, Hessian
# diagonals and squared gradients come from the score cache the "selectors" suite leaves.
SUITES["selectors-1pct"] = [
    dict(row, ratio=0.01) for row in SUITES["selectors"] if row["method"] == "tacq" and "qw_method" not in row
]
# The selector table's main comparison with GPTQ's MSE range search on (the paper's setting and the CLI
# default): TaCQ against msg, the best selector on min/max grids, at both budgets, beside GPTQ alone.
# The gptq row and the two tacq rows are the same configurations as the gptq suite's row and the
# end-to-end `tacq-lite quantize` runs in BENCHMARKS.md.
SUITES["selectors-mse"] = [dict(method="gptq", bits=3, groupsize=-1)] + [
    dict(method="tacq", bits=3, groupsize=-1, selector=s, ratio=r) for r in (0.0035, 0.01) for s in ("tacq", "msg")
]
# Every selector at 2 bits with groups of 64 (min/max grids), at both budgets: the paper's claim is
# strongest at 2 bits. hessian first (its Q(W) pass records the Hessian diagonals at this setting);
# the gradients (and fisher's squares) do not depend on the bits and come from the "selectors" cache.
SUITES["selectors-2bit"] = [dict(method="gptq", bits=2, groupsize=64, mse=False)] + [
    dict(method="tacq", bits=2, groupsize=64, mse=False, selector=s, ratio=r)
    for r in (0.0035, 0.01)
    for s in ("hessian", "fisher", "tacq", "magnitude", "gradient", "qal", "msg", "activation", "owq_columns",
              "random")
]
# GSM8K greedy chain-of-thought generation (exact match of the final number) with the answer NLL of
# the same questions: the tasks suite's 3-bit rows (their score cache serves the TaCQ rows), MMLU
# calibration left out. Ten questions: generation costs about 10 s per question on 2 cores.
SUITES["generation"] = [row for row in SUITES["tasks"][:6] if row.get("calib") != "mmlu"]
# Evaluations per suite (default: WikiText-2 perplexity and KL only).
EVALS = {
    "tasks": dict(evals=["wikitext2", "mmlu", "gsm8k", "synthetic"], mmlu_limit=5, gsm8k_limit=200,
                  gsm8k_generate=False, synthetic_limit=20),
    "generation": dict(evals=["gsm8k"], gsm8k_limit=10, gsm8k_generate=True, gsm8k_max_new_tokens=256),
}


def row_name(cfg: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(cfg.items()))


def run_one(cfg: dict, common: dict, out: Path, evals: dict | None = None) -> dict:
    """Run one configuration in a child process (fresh peak-RSS) and return its record."""
    if out.is_file():
        return json.loads(out.read_text())
    code = (
        "import json, sys; from tacq_lite.config import QuantConfig; from tacq_lite.cli import run_quantize;"
        "from tacq_lite.records import write_json_atomic;"
        "c = QuantConfig(**json.loads(sys.argv[1])); write_json_atomic(sys.argv[2], run_quantize(c, progress=False))"
    )
    cfg_all = {**common, **cfg, **(evals or {"evals": ["wikitext2"]})}
    subprocess.run([sys.executable, "-c", code, json.dumps(cfg_all), str(out)], check=True)
    return json.loads(out.read_text())


def table(records: list[dict]) -> str:
    head = "| method | selector | ratio | bits | group | avg bits | WikiText-2 ppl | KL | seconds | peak RSS MB |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        c, m = r["config"], r["metrics"]["wikitext2"]
        tacq = c["method"] == "tacq"
        lines.append(
            f"| {c['method']} | {c['selector'] if tacq else '-'} | {c['ratio'] if tacq else '-'} | {r['bits']} | "
            f"{c['groupsize'] if c['method'] != 'fp' else '-'} | {r['avg_bits']:.3f} | {m['ppl']:.2f} | "
            f"{m['kl']:.4f} | {r['seconds_total']:.0f} | {r['peak_rss_mb']:.0f} |"
            if m.get("kl") is not None else
            f"| {c['method']} | - | - | {r['bits']} | - | {r['avg_bits']:.3f} | {m['ppl']:.2f} | - | "
            f"{r['seconds_total']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def task_table(records: list[dict]) -> str:
    head = ("| method | calibration | bits | group | avg bits | WikiText-2 ppl | KL | MMLU acc | MMLU letter NLL "
            "| GSM8K answer NLL "
            "| synthetic acc | synthetic NLL | seconds | peak RSS MB |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        c, m = r["config"], r["metrics"]
        kl = m["wikitext2"].get("kl")
        lines.append(
            f"| {c['method']} | {c['calib'] if c['method'] == 'tacq' else '-'} | {c['bits'] if c['method'] != 'fp' else 16} | "
            f"{c['groupsize'] if c['method'] != 'fp' else '-'} | {r['avg_bits']:.3f} | "
            f"{m['wikitext2']['ppl']:.2f} | {'-' if kl is None else f'{kl:.4f}'} | {m['mmlu']['accuracy']:.3f} | "
            f"{m['mmlu']['letter_nll']:.3f} | {m['gsm8k']['nll']:.3f} | {m['synthetic']['accuracy']:.3f} | "
            f"{m['synthetic']['nll']:.3f} | {r['seconds_total']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def generation_table(records: list[dict]) -> str:
    head = "| method | calibration | avg bits | GSM8K exact match | GSM8K answer NLL | GSM8K seconds |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        c, m = r["config"], r["metrics"]["gsm8k"]
        right = round(m["accuracy"] * m["n"])
        lines.append(
            f"| {c['method']} | {c['calib'] if c['method'] == 'tacq' else '-'} | {r['avg_bits']:.3f} | "
            f"{m['accuracy']:.3f} ({right}/{m['n']}) | {m['nll']:.3f} | {r['seconds']['eval_gsm8k']:.0f} |"
        )
    return "\n".join(lines)


TABLES = {"tasks": task_table, "generation": generation_table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--only", default=None, help="comma-separated row indices to run (default: all)")
    args = p.parse_args()
    common = dict(n_calib=args.n_calib, seq_len=args.seq_len, eval_tokens=args.eval_tokens)
    out_dir = ROOT / "bench" / "results" / args.suite
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = SUITES[args.suite]
    if args.only:
        rows = [rows[int(i)] for i in args.only.split(",")]
    records = []
    show = TABLES.get(args.suite, table)
    for cfg in rows:
        name = row_name({**cfg, **common})
        records.append(run_one(cfg, common, out_dir / f"{name}.json", EVALS.get(args.suite)))
        print(show(records[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.suite}: {date.today()}, `python bench/bench_quality.py {' '.join(sys.argv[1:])}`\n")
    print(show(records))


if __name__ == "__main__":
    main()
