"""Write the issue-18 tables into BENCHMARKS.md from the records in bench/results/paper/.

    python bench/fill_paper_tables.py

Runs `bench_quality.py paper-seeds --report --summary` and `paper-selectors --report --summary`
(nothing is quantized) and replaces the text between the `<!-- paper tables` markers.
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report(*args):
    return subprocess.run([sys.executable, "bench/bench_quality.py", *args, "--report"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout

seeds = report("paper-seeds", "--summary")
blocks = [b for b in seeds.strip().split("\n\n") if b.startswith("|")]
per_row, summary, paired = blocks
sel = report("paper-selectors", "--summary")
sblocks = [b for b in sel.strip().split("\n\n") if b.startswith("|")]
sel_rows, _, sel_paired = sblocks
head, rule, *pairs = sel_paired.split("\n")
one_pct = [l for l in pairs if "| 1.00% |" in l]
sel_paired = "\n".join([head, rule, *one_pct]) if one_pct else "(no 1 % pair measured yet)"
text = f"""<!-- paper tables: made by `python bench/bench_quality.py paper-seeds --report --summary` and
`python bench/bench_quality.py paper-selectors --report --summary` from the records in bench/results/paper/ -->

**Over seeds (0.35 % kept, compensated unless marked).** Mean over the calibration seeds, their
spread, and the envelope of the per-seed 95 % intervals (the lowest lower bound to the highest upper
bound: it covers both the evaluation text and the calibration seed):

{summary}

**Paired, per seed.** Both runs on the same 64 windows: the ratio of perplexities and the bootstrap
interval of the per-window NLL differences (`tacq_lite.eval.paired_ppl_ratio`). The windows' own
difficulty cancels, so these intervals are much narrower than the ones above; they say whether two
models differ *on this text at this seed*, not across seeds:

{paired}

**Seed 0, every selector measured so far** (the rest of the paper-selectors suite is queued):

{sel_rows}

Paired at 1 % kept, seed 0:

{sel_paired}
<!-- /paper tables -->"""
p = ROOT / "BENCHMARKS.md"
s = p.read_text()
if "PAPER_TABLES_PLACEHOLDER" in s:
    s = s.replace("PAPER_TABLES_PLACEHOLDER", text)
elif "<!-- paper tables:" in s:
    s = re.sub(r"<!-- paper tables:.*?<!-- /paper tables -->", lambda m: text, s, flags=re.S)
else:
    sys.exit("BENCHMARKS.md has no <!-- paper tables --> markers; nothing written.")
tmp = p.with_suffix(".md.tmp")
tmp.write_text(s)
tmp.replace(p)  # never half-written
print(f"wrote the paper tables into {p}")
