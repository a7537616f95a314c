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
    python bench/bench_quality.py paper-seeds --summary    # issue 18: the paper's setting, 3 seeds, 32k eval tokens
    python bench/bench_quality.py paper-selectors --summary  # every selector, both budgets, both keep values
    python bench/bench_quality.py paper-2bit --summary     # 2-bit g64 (MSE grids): gptq, tacq, msg, random

The paper-* suites are the paper's setting (64 x 512 calibration windows, GPTQ's MSE grids, per
channel unless stated) evaluated on 64 windows x 512 tokens of WikiText-2's second half with a
95 % bootstrap interval over windows, without KL (it would double the evaluation time). Their
rows name their seed; `--summary` adds a table with one line per configuration: the mean over
seeds, the spread (min-max), and each seed's perplexity with its interval.

Each row is one `tacq-lite quantize` run (tacq_lite.run.experiment.run_quantize) in a fresh process, so
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
# Issue 18: the paper's setting, re-measured after kept weights started storing GPTQ's compensated
# value. Within each seed, hessian comes first (its Q(W) pass records the Hessian diagonals) and
# fisher second (its gradient pass records the squares); every later row reads the score cache.
PAPER_SELECTORS = ("hessian", "fisher", "tacq", "msg", "random", "magnitude", "gradient", "qal", "activation",
                   "owq_columns")
RANKING_ROWS = ("tacq", "msg", "random", "hessian")  # the rows that decide the ranking, run at three seeds


def paper_rows(seed: int, *, bits: int = 3, groupsize: int = -1, selectors=RANKING_ROWS + ("fisher",), ratios=(0.0035,),
               originals=("tacq", "msg", "random")) -> list[dict]:
    """GPTQ, then each selector at each ratio (compensated), then `originals` with keep_value original."""
    base = dict(bits=bits, groupsize=groupsize, seed=seed)
    rows = [dict(method="gptq", **base)]
    order = [s for s in PAPER_SELECTORS if s in selectors]
    rows += [dict(method="tacq", selector=s, ratio=r, keep_value="compensated", **base) for r in ratios for s in order]
    rows += [dict(method="tacq", selector=s, ratio=r, keep_value="original", **base) for r in ratios for s in originals]
    return rows


# Seeds 0-2 of the ranking rows at 0.35 %, seed 0 first: the decisive comparison. Seed 0 also runs
# fisher, so that its gradient pass records the squares the paper-selectors suite needs.
SUITES["paper-seeds"] = paper_rows(0) + [row for seed in (1, 2) for row in paper_rows(seed, selectors=RANKING_ROWS)]
# Every selector at both budgets (seed 0), and tacq / msg / random with keep_value original; the rows
# already in paper-seeds are the same configurations and are not run twice (same file name).
SUITES["paper-selectors"] = paper_rows(0, selectors=PAPER_SELECTORS, ratios=(0.0035, 0.01))
SUITES["paper-2bit"] = paper_rows(0, bits=2, groupsize=64, selectors=("tacq", "msg", "random"), ratios=(0.0035, 0.01),
                                  originals=())
# Evaluations per suite (default: WikiText-2 perplexity and KL only).
EVALS = {
    "tasks": dict(evals=["wikitext2", "mmlu", "gsm8k", "synthetic"], mmlu_limit=5, gsm8k_limit=200,
                  gsm8k_generate=False, synthetic_limit=20),
    "generation": dict(evals=["gsm8k"], gsm8k_limit=10, gsm8k_generate=True, gsm8k_max_new_tokens=256),
}
# The 3-bit rows of the task matrix at the paper's setting (MSE grids), with the compensated kept values:
# GPTQ alone, then TaCQ calibrated on general text and on each task. Records keep every item's result
# (MMLU questions, GSM8K solutions, synthetic items), so each metric gets a bootstrap interval.
SUITES["paper-tasks"] = [dict(method="gptq", bits=3, groupsize=-1, seed=0)] + [
    dict(method="tacq", bits=3, groupsize=-1, seed=0, selector="tacq", ratio=0.0035, keep_value="compensated", calib=c)
    for c in ("wikitext2", "gsm8k", "mmlu")]
PAPER_EVAL = dict(evals=["wikitext2"], eval_tokens=64 * 512, kl=False)  # 64 windows of 512, no KL
EVALS.update({name: PAPER_EVAL for name in SUITES if name.startswith("paper-")})
EVALS["paper-tasks"] = dict(EVALS["tasks"], evals=["wikitext2", "mmlu", "gsm8k", "synthetic"], eval_tokens=64 * 512,
                            kl=False)


def row_name(cfg: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(cfg.items()))


def run_one(cfg: dict, common: dict, out: Path, evals: dict | None = None) -> dict:
    """Run one configuration in a child process (fresh peak-RSS) and return its record."""
    if out.is_file():
        return json.loads(out.read_text())
    code = (
        "import json, sys; from tacq_lite.config import QuantConfig; from tacq_lite.run.experiment import run_quantize;"
        "from tacq_lite.io import write_json_atomic;"
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


def _ppl(m: dict) -> str:
    return f"{m['ppl']:.2f} [{m['ppl_low']:.2f}, {m['ppl_high']:.2f}]"


def _label(c: dict) -> str:
    if c["method"] != "tacq":
        return c["method"]
    return f"tacq {c['selector']} {c['ratio']:.2%} {c.get('keep_value', 'original')}"


def paper_table(records: list[dict]) -> str:
    head = "| configuration | bits | group | seed | avg bits | WikiText-2 ppl [95 % CI] | windows × tokens | seconds |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        c, m = r["config"], r["metrics"]["wikitext2"]
        lines.append(f"| {_label(c)} | {c['bits']} | {c['groupsize']} | {c['seed']} | {r['avg_bits']:.3f} | {_ppl(m)} | "
                     f"{m['n_windows']} × {m['n_tokens'] // m['n_windows']} | {r['seconds_total']:.0f} |")
    return "\n".join(lines)


def summary_table(records: list[dict]) -> str:
    """One line per configuration over its seeds: mean, min-max spread, the envelope of the per-seed
    95 % intervals (what two rows must not share to be called different), each seed's value."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        c = r["config"]
        key = (c["method"], c.get("selector"), c.get("ratio"), c.get("keep_value"), c["bits"], c["groupsize"])
        groups.setdefault(key, []).append(r)
    head = ("| configuration | bits | group | seeds | mean ppl | seed spread (min–max) | envelope of 95 % CIs | "
            "per seed: ppl [95 % CI] |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for rs in groups.values():
        c = rs[0]["config"]
        ms = [r["metrics"]["wikitext2"] for r in sorted(rs, key=lambda r: r["config"]["seed"])]
        ppl = [m["ppl"] for m in ms]
        lines.append(
            f"| {_label(c)} | {c['bits']} | {c['groupsize']} | {len(ms)} | {sum(ppl) / len(ppl):.2f} | "
            f"{min(ppl):.2f}–{max(ppl):.2f} | [{min(m['ppl_low'] for m in ms):.2f}, {max(m['ppl_high'] for m in ms):.2f}] | "
            + "; ".join(f"s{r['config']['seed']}: {_ppl(m)}" for r, m in
                        zip(sorted(rs, key=lambda r: r["config"]["seed"]), ms)) + " |")
    return "\n".join(lines)


PAIRS = [  # (a, b) compared on the same windows: ppl_a / ppl_b
    (("tacq", "compensated"), ("tacq", "original")), (("msg", "compensated"), ("msg", "original")),
    (("random", "compensated"), ("random", "original")),
    (("tacq", "compensated"), ("gptq", None)), (("tacq", "compensated"), ("msg", "compensated")),
    (("tacq", "compensated"), ("random", "compensated")), (("tacq", "compensated"), ("hessian", "compensated")),
    (("msg", "compensated"), ("random", "compensated")), (("hessian", "compensated"), ("random", "compensated")),
    (("random", "compensated"), ("gptq", None)),
]


def paired_table(records: list[dict]) -> str:
    """ppl_a / ppl_b per seed and ratio with the paired bootstrap interval over the shared windows
    (tacq_lite.eval.lm.paired_ppl_ratio): the windows' own difficulty cancels, so this interval is
    far narrower than the two perplexity intervals side by side."""
    from tacq_lite.eval.lm import paired_ppl_ratio

    def key(c):  # GPTQ's record carries the config's keep_value too; it has no mask, so it does not apply
        return (c["selector"], c["keep_value"]) if c["method"] == "tacq" else (c["method"], None)

    def name(k):
        return k[0] if k[1] in (None, "compensated") else f"{k[0]} ({k[1]})"

    found = {}
    for r in records:
        c = r["config"]
        for ratio in ([c["ratio"]] if c["method"] == "tacq" else [0.0035, 0.01]):
            found[(c["bits"], c["groupsize"], c["seed"], ratio, key(c))] = r["metrics"]["wikitext2"]["window_nll"]
    head = "| a / b | bits | group | ratio | seed | ppl ratio [95 % paired CI] | verdict |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for (bits, gs, seed, ratio, ka) in sorted(k for k in found if k[4] in {a for a, _ in PAIRS}):
        for a, b in PAIRS:
            kb = (bits, gs, seed, ratio, b)
            if a != ka or kb not in found:
                continue
            q, lo, hi = paired_ppl_ratio(found[(bits, gs, seed, ratio, a)], found[kb])
            verdict = "a lower" if hi < 1 else "b lower" if lo > 1 else "not distinguishable"
            lines.append(f"| {name(a)} / {name(b)} | {bits} | {gs} | {ratio:.2%} | {seed} | {q:.3f} [{lo:.3f}, {hi:.3f}] "
                         f"| {verdict} |")
    return "\n".join(lines)


def _mean_ci(values) -> str:
    """mean [95 % bootstrap interval] of per-item values (questions, solutions, items)."""
    import torch

    from tacq_lite.eval.lm import bootstrap_interval

    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    lo, hi = bootstrap_interval(v)
    return f"{v.mean():.3f} [{lo:.3f}, {hi:.3f}]"


# (column, eval, per-item key) of the paper-tasks tables: every metric there is a mean over items.
TASK_ITEMS = [("MMLU acc", "mmlu", "item_right"), ("MMLU letter NLL", "mmlu", "item_nll"),
              ("GSM8K answer NLL", "gsm8k", "item_nll"), ("synthetic acc", "synthetic", "item_right"),
              ("synthetic NLL", "synthetic", "item_nll")]


def _task_label(c: dict) -> str:
    return f"tacq ({c['calib']} calibration)" if c["method"] == "tacq" else c["method"]


def paper_task_table(records: list[dict]) -> str:
    """Every metric with its 95 % bootstrap interval: over windows (perplexity) or over items."""
    head = ("| configuration | WikiText-2 ppl [95 % CI] | " + " | ".join(f"{name} [95 % CI]" for name, _, _ in TASK_ITEMS)
            + " | seconds |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        m = r["metrics"]
        lines.append(f"| {_task_label(r['config'])} | {_ppl(m['wikitext2'])} | "
                     + " | ".join(_mean_ci(m[e][k]) for _, e, k in TASK_ITEMS) + f" | {r['seconds_total']:.0f} |")
    if records:
        m = records[0]["metrics"]
        lines.append(f"\nItems: WikiText-2 {m['wikitext2']['n_windows']} windows × "
                     f"{m['wikitext2']['n_tokens'] // m['wikitext2']['n_windows']} tokens; MMLU {m['mmlu']['n']} "
                     f"questions; GSM8K {m['gsm8k']['n']} test solutions (answer NLL); synthetic "
                     f"{len(m['synthetic']['item_right'])} items.")
    return "\n".join(lines)


def paper_task_paired(records: list[dict], *, against: str = "gptq") -> str:
    """Each other row minus the row labelled `against` (GPTQ, or e.g. "tacq (wikitext2 calibration)") on the
    same items, with the bootstrap interval of the paired differences."""
    import torch

    from tacq_lite.eval.lm import bootstrap_interval, paired_ppl_ratio

    base = next((r for r in records if _task_label(r["config"]) == against), None)
    head = f"| configuration − {against} | WikiText-2 ppl ratio [95 % CI] | " + " | ".join(
        f"Δ {name} [95 % CI]" for name, _, _ in TASK_ITEMS) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in records:
        if base is None or r is base or (against != "gptq" and r["config"]["method"] == "gptq"):
            continue
        q, lo, hi = paired_ppl_ratio(r["metrics"]["wikitext2"]["window_nll"], base["metrics"]["wikitext2"]["window_nll"])
        cells = [f"{q:.3f} [{lo:.3f}, {hi:.3f}]" + ("" if lo <= 1 <= hi else " *")]
        for _, e, k in TASK_ITEMS:
            d = (torch.tensor([float(x) for x in r["metrics"][e][k]], dtype=torch.float64)
                 - torch.tensor([float(x) for x in base["metrics"][e][k]], dtype=torch.float64))
            dlo, dhi = bootstrap_interval(d)
            cells.append(f"{d.mean():+.3f} [{dlo:+.3f}, {dhi:+.3f}]" + ("" if dlo <= 0 <= dhi else " *"))
        lines.append(f"| {_task_label(r['config'])} | " + " | ".join(cells) + " |")
    lines.append("\n`*`: the interval excludes no difference (ratio 1, Δ 0); every other cell is not distinguishable "
                 f"from {against} on these items.")
    return "\n".join(lines)


TABLES = {"tasks": task_table, "generation": generation_table}
TABLES.update({name: paper_table for name in SUITES if name.startswith("paper-")})
TABLES["paper-tasks"] = paper_task_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--only", default=None, help="comma-separated row indices to run (default: all)")
    p.add_argument("--seed", type=int, default=None, help="run only the rows of this calibration seed")
    p.add_argument("--summary", action="store_true", help="also print the over-seeds summary table")
    p.add_argument("--dry-run", action="store_true", help="list the rows and whether each has a record, run nothing")
    p.add_argument("--report", action="store_true", help="print the tables from the records there are, run nothing")
    args = p.parse_args()
    common = dict(n_calib=args.n_calib, seq_len=args.seq_len, eval_tokens=args.eval_tokens)
    # The paper-* suites share one folder: a configuration in two of them runs once.
    # (paper-tasks evaluates more than perplexity, so its records live apart.)
    shared = args.suite.startswith("paper-") and args.suite != "paper-tasks"
    out_dir = ROOT / "bench" / "results" / ("paper" if shared else args.suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = SUITES[args.suite]
    if args.only:
        rows = [rows[int(i)] for i in args.only.split(",")]
    if args.seed is not None:
        rows = [r for r in rows if r.get("seed", 0) == args.seed]
    records = []
    show = TABLES.get(args.suite, table)
    evals = EVALS.get(args.suite)
    for cfg in rows:
        named = {**cfg, **common}
        if evals and "eval_tokens" in evals:  # the suite's own evaluation size names its files
            named["eval_tokens"] = evals["eval_tokens"]
        out = out_dir / f"{row_name(named)}.json"
        if args.dry_run:
            print(f"{'done' if out.is_file() else 'todo'}  {out.name}")
            continue
        if args.report:
            if out.is_file():
                records.append(json.loads(out.read_text()))
            continue
        records.append(run_one(cfg, common, out, evals))
        print(show(records[-1:]).splitlines()[2], flush=True)
    if args.dry_run:
        return
    print(f"\n{args.suite}: {date.today()}, `python bench/bench_quality.py {' '.join(sys.argv[1:])}`\n")
    print(show(records))
    if args.summary and args.suite == "paper-tasks":
        print()
        print(paper_task_paired(records))
        print()
        print(paper_task_paired(records, against="tacq (wikitext2 calibration)"))
    elif args.summary:
        print()
        print(summary_table(records))
        print()
        print(paired_table(records))


if __name__ == "__main__":
    main()
