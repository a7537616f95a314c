"""Write the issue-18 tables into BENCHMARKS.md from the records in bench/results/paper/ and
bench/results/paper-tasks/.

    python bench/fill_paper_tables.py

Runs `bench_quality.py <suite> --report --summary` for paper-seeds, paper-selectors, paper-2bit and
paper-tasks (nothing is quantized) and replaces the text between the `<!-- paper tables` markers.
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tables(suite: str) -> list[str]:
    """The markdown tables `bench_quality.py SUITE --report --summary` prints, in order."""
    out = subprocess.run([sys.executable, "bench/bench_quality.py", suite, "--report", "--summary"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [b for b in out.strip().split("\n\n") if b.startswith("|")]


def rows_with(table: str, marker: str) -> str:
    head, rule, *rows = table.split("\n")
    picked = [line for line in rows if marker in line]
    return "\n".join([head, rule, *picked]) if picked else "(not measured yet)"


def task_blocks() -> tuple[str, str]:
    out = subprocess.run([sys.executable, "bench/bench_quality.py", "paper-tasks", "--report", "--summary"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    blocks = out.strip().split("\n\n")[1:]  # after the command line: table + items note, paired + legend
    if len(blocks[0].split("\n")) <= 2:  # a header and a rule: no record yet
        todo = "(not measured yet: `python bench/bench_quality.py paper-tasks`)"
        return todo, todo
    vs_gptq, vs_wikitext = "\n\n".join(blocks[2:4]), "\n\n".join(blocks[4:])
    return "\n\n".join(blocks[:2]), (f"{vs_gptq}\n\nEach task-calibrated TaCQ row minus TaCQ calibrated on "
                                      f"WikiText-2, on the same windows and items (paired bootstrap):\n\n{vs_wikitext}")


def main() -> None:
    _, summary, paired = tables("paper-seeds")
    sel_rows, _, sel_paired = tables("paper-selectors")
    two_rows, _, two_paired = tables("paper-2bit")
    task_rows, task_paired = task_blocks()
    text = f"""<!-- paper tables: made by `python bench/fill_paper_tables.py` (bench_quality.py paper-seeds,
paper-selectors, paper-2bit and paper-tasks with --report --summary) from the records in bench/results/paper/
and bench/results/paper-tasks/ -->

**Over seeds (0.35 % kept, compensated unless marked).** Mean over the calibration seeds, their
spread, and the envelope of the per-seed 95 % intervals (the lowest lower bound to the highest upper
bound: it covers both the evaluation text and the calibration seed):

{summary}

**Paired, per seed.** Both runs on the same 64 windows: the ratio of perplexities and the bootstrap
interval of the per-window NLL differences (`tacq_lite.eval.lm.paired_ppl_ratio`). The windows' own
difficulty cancels, so these intervals are much narrower than the ones above; they say whether two
models differ *on this text at this seed*, not across seeds:

{paired}

**Seed 0, every selector, both budgets, both keep values for tacq / msg / random** (3-bit per
channel, MSE grids):

{sel_rows}

Paired at 1 % kept, seed 0:

{rows_with(sel_paired, "| 1.00% |")}

**2-bit, groups of 64, MSE grids** (seed 0, compensated):

{two_rows}

Paired, seed 0:

{two_paired}

**Task calibration, 3-bit per channel, MSE grids, 0.35 % kept** (seed 0, compensated): TaCQ
calibrated on WikiText-2, on GSM8K (train solutions, loss on the answers) and on MMLU (dev + val
questions), beside GPTQ. Intervals are bootstrap intervals over windows (perplexity) or over items:

{task_rows}

Each TaCQ row minus GPTQ on the same windows and items (paired bootstrap):

{task_paired}
<!-- /paper tables -->"""
    p = ROOT / "BENCHMARKS.md"
    s = p.read_text()
    if "<!-- paper tables:" not in s:
        sys.exit("BENCHMARKS.md has no <!-- paper tables --> markers; nothing written.")
    s = re.sub(r"<!-- paper tables:.*?<!-- /paper tables -->", lambda m: text, s, flags=re.S)
    tmp = p.with_suffix(".md.tmp")
    tmp.write_text(s)
    tmp.replace(p)  # never half-written
    print(f"wrote the paper tables into {p}")


if __name__ == "__main__":
    main()
