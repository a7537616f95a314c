"""Notebook 06 as committed: what a learner reads before running it, and what it promises.

Static checks on the stored notebook (no kernel, no model): the opening block, an assert in every
section, labelled figures in the course colours, the parameters checked, notebook 00's baseline
reprinted, the GSM8K claim backed by a source that ran GSM8K, and a computed verdict for every
general-versus-task comparison that agrees with the intervals printed beside it. Running it is
tests/test_notebooks.py's job (papermill) and nbval's.
"""
import re
from pathlib import Path

import pytest
from notebook_checks import sections

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "06_evaluation.ipynb"
TASKS = ("copy", "count", "calendar", "add", "agreement", "last_word")  # tacq_lite.data.synthetic.TASKS
VERDICTS = ("better", "worse", "not distinguishable")
NUM = r"(-?[\d.]+)"
INTERVAL = rf"{NUM} \[{NUM}, {NUM}\]"


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


def outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def all_output(nb) -> str:
    return "".join(outputs(c) for c in nb.cells if c.cell_type == "code")


def markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_the_task_list_matches_the_library():
    from tacq_lite.data.synthetic import TASKS as LIBRARY_TASKS

    assert tuple(LIBRARY_TASKS) == TASKS


def test_opens_with_what_you_learn_need_and_run_time(nb):
    intro = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and intro.startswith("# 06 · ")
    for block in ("**What you will learn**", "**What you need:**", "**Run time**"):
        assert block in intro, f"the opening block lacks {block}"
    need = intro[intro.index("**What you need:**"):intro.index("**Run time**")]
    assert all(f"{n:02d}" in need for n in (0, 2, 3, 4)), "name the notebooks this one builds on"
    # the run time and its source: tests/test_course_notebooks.py::test_run_time_is_the_measured_one


def test_papermill_hints_pass_lists_with_y(nb):
    text = markdown(nb)
    assert '-y "evals: [' in text
    assert not re.search(r"-p (evals|mmlu_subjects)\b", text), "papermill's -p turns a list into text"


def test_text_parameters_are_checked_after_the_imports(nb):
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for call in ('check_choices("evals"', 'check_choices("mmlu_subjects"', 'check_choice("qw_method"',
                 'check_choice("task"'):
        assert call in code, f"missing {call}...)"
    assert code.index("check_choice") < code.index("load_model()"), "check the parameters before any long work"


def test_every_section_ends_in_an_assert(nb):
    found = sections(nb)
    assert len(found) >= 4, list(found)
    for heading, cells in found.items():
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        assert re.search(r"^\s*assert ", code, re.M), f"{heading!r} asserts nothing"


def test_figures_are_labelled_and_use_the_course_colours(nb):
    figures = [c for c in nb.cells if c.cell_type == "code"
               and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert len(figures) >= 3, "run the notebook before committing it: the matrix, the masks and the per-task panel"
    for c in figures:
        assert all(k in c.source for k in ("xlabel", "ylabel", "title")), c.source[:80]
        assert "style(" in c.source and "tab:" not in c.source and not re.search(r"(?<!\w)color=", c.source), \
            "every method's bars come from style() (method_color), never a local palette"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "method_color(" in code and "hatch" in code
    assert any("hatched" in c.source for c in figures), "say in a legend that hatching marks task calibration"


def test_baseline_is_reprinted_next_to_this_notebooks_number(nb):
    text = all_output(nb)
    assert "full-precision baseline (notebook 00): perplexity" in text
    here = re.search(r"full precision in this notebook: +perplexity ([\d.]+) \[", text)
    protocols = re.findall(r"protocol: WikiText-2 evaluation half, (\d+) windows × (\d+) tokens", text)
    assert here and len(protocols) == 2, "print_baseline's output is missing"
    assert protocols[0] == ("4", "512") and protocols[1] != protocols[0]
    matrix = re.search(r"full precision +([\d.]+) \[", text[text.index("95 % bootstrap interval over windows"):])
    assert matrix and abs(float(matrix[1]) - float(here[1])) < 0.01, "the reprint must show the matrix's float number"


def test_the_gsm8k_claim_cites_a_run_that_did_gsm8k(nb):
    nb00 = (ROOT / "notebooks" / "00_setup.ipynb").read_text()
    for sentence in re.split(r"(?<=[.;:])\s", markdown(nb)):
        if "GSM8K" in sentence and "notebook 00" in sentence:
            assert "gsm8k" in nb00.lower(), f"notebook 00 never runs GSM8K: {sentence!r}"
    text = markdown(nb)
    if "0 of the first 10" in text:
        bench = (ROOT / "BENCHMARKS.md").read_text()
        assert re.search(r"\| fp \| - \| 16\.000 \| 0\.000 \(0/10\) \|", bench), "BENCHMARKS.md no longer says 0/10"


def test_benchmark_numbers_quoted_in_the_prose_exist(nb):
    text, bench = markdown(nb), (ROOT / "BENCHMARKS.md").read_text()
    quoted = {"0.29 [0.27, 0.31]": "-0.294 [-0.313, -0.274]", "0.14 [0.08, 0.21]": "-0.143 [-0.211, -0.078]",
              "62.5": "62.47 [", "67.1": "67.10 [", "46.6": "46.6, paired ratios"}
    for in_notebook, in_benchmarks in quoted.items():
        if in_notebook in text:
            assert in_benchmarks in bench, f"{in_notebook} is no longer in BENCHMARKS.md"


def test_prose_does_not_hard_code_verdict_counts(nb):
    text = markdown(nb)
    assert not re.search(r"\b(\d+|one|two|three|four|five|six) of (the )?(6|six) tasks\b", text, re.I), \
        "refer to the printed verdicts instead of counting them in prose"


def per_task_lines(nb) -> list[re.Match]:
    pattern = re.compile(rf"^\s*(\w+) +(NLL|accuracy) +{INTERVAL} +{INTERVAL} +-> ({'|'.join(VERDICTS)}) +"
                         rf"{INTERVAL} -> ({'|'.join(VERDICTS)})$", re.M)
    return list(pattern.finditer(all_output(nb)))


def test_a_verdict_is_printed_for_every_task_and_metric(nb):
    seen = {(m[1], m[2]) for m in per_task_lines(nb)}
    assert seen == {(t, k) for t in TASKS for k in ("NLL", "accuracy")}, sorted(seen)


def apart(low_a, high_a, low_b, high_b) -> bool:
    return high_a < low_b or high_b < low_a


def test_printed_verdicts_follow_the_printed_intervals(nb):
    lines = per_task_lines(nb)
    assert lines
    for m in lines:
        g, gl, gh, t, tl, th = map(float, m.groups()[2:8])
        d, dl, dh = map(float, m.groups()[9:12])
        separate, paired = m[9], m[13]
        assert gl <= g <= gh and tl <= t <= th and dl <= d <= dh, m[0]
        near_tie = min(abs(gh - tl), abs(th - gl)) < 0.0015  # printed to 3 decimals
        if not near_tie:
            assert (separate == "not distinguishable") == (not apart(gl, gh, tl, th)), m[0]
        if min(abs(dl), abs(dh)) >= 0.0015:
            assert (paired == "not distinguishable") == (dl < 0 < dh), m[0]
        if paired != "not distinguishable":
            lower_is_better = m[2] == "NLL"
            assert (paired == "better") == ((d < 0) == lower_is_better), m[0]


def test_whole_suite_comparison_prints_both_verdicts(nb):
    text = all_output(nb)
    lines = re.findall(rf"general {INTERVAL}, task {INTERVAL} -> separate: ({'|'.join(VERDICTS)}); "
                       rf"paired task − general {INTERVAL} -> ({'|'.join(VERDICTS)})", text)
    assert len(lines) >= 3, "the synthetic NLL, accuracy and WikiText-2 comparisons"
    assert re.search(r"perplexity ratio task / general on the same windows: [\d.]+ \[[\d.]+, [\d.]+\]", text)
