"""Notebook 07 as committed: the pipeline's checks, the sweep it plots, and the capstone.

Static checks on the stored notebook (no kernel, no model), plus one fast run of the capstone's
solution cells on the tiny Llama: the pieces a learner writes must keep giving tacq_lite's masks
and weights whenever the library changes. The checks every notebook shares (opening block,
asserts, figures) are in tests/test_course_notebooks.py.
"""
import csv
import re

import pytest
from notebook_checks import NOTEBOOKS, figure_cells, outputs_text, read, sections

pytest.importorskip("nbformat")

PIECES = ("gptq_update", "tacq_score", "abs_grad_sum", "global_topk", "masked_gptq")


@pytest.fixture(scope="module")
def nb():
    return read("07_end_to_end.ipynb")


def _parameters(nb) -> dict:
    import ast

    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {t.id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body
            if isinstance(node, ast.Assign) for t in node.targets}


def test_string_parameters_are_checked_after_the_imports(nb):
    source = "".join(c.source for c in nb.cells if c.cell_type == "code")
    for name, choices in (("method", "METHODS"), ("selector", "SELECTORS"), ("qw_method", "QW_METHODS"),
                          ("dtype", "placement.DTYPES")):
        assert re.search(rf'\("{name}", {name}, {re.escape(choices)}\)', source), name


def test_default_sweep_table_is_committed_and_plotted(nb):
    path = (NOTEBOOKS / _parameters(nb)["sweep_table"]).resolve()
    assert path.is_file(), f"the default sweep_table {path} is not in the repository"
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "done"]
    assert len(rows) >= 2 and {r["method"] for r in rows} <= {"rtn", "gptq", "tacq"}
    for r in rows:
        low, mid, high = (float(r[f"metrics.wikitext2.{k}"]) for k in ("ppl_low", "ppl", "ppl_high"))
        assert low <= mid <= high
    assert f"{len(rows)} finished runs" in outputs_text(nb)
    part2 = next(cells for head, cells in sections(nb).items() if head.startswith("## Part 2"))
    assert figure_cells(nb) and any(c in figure_cells(nb) for c in part2), "part 2 stores no plot"
    plot = next(c for c in part2 if c in figure_cells(nb))
    assert "errorbar" in plot.source and "method_color" in plot.source


def test_baseline_is_reprinted_next_to_this_notebooks_number(nb):
    text = outputs_text(nb)
    assert "full-precision baseline (notebook 00): perplexity" in text
    assert "full precision in this notebook:" in text


def test_capstone_has_an_exercise_and_a_check_per_piece(nb):
    cells = nb.cells
    exercises = [i for i, c in enumerate(cells) if "exercise" in c.metadata.get("tags", [])]
    assert len(exercises) == len(PIECES)
    for i, piece in zip(exercises, PIECES):
        assert f"def {piece}(" in cells[i].source and "### BEGIN SOLUTION" in cells[i].source
        nxt = cells[i + 1]
        assert "check" in nxt.metadata.get("tags", []) and f'passed.add("{piece}")' in nxt.source


def test_capstone_stored_outputs_match_the_library(nb):
    text = outputs_text(nb)
    assert f"pieces of yours: {len(PIECES)} of {len(PIECES)}" in text
    kept = re.search(r"tacq_lite on the tiny Llama: (\d+) weights kept", text)
    assert kept and f"masks == tacq_quantize's: {kept[1]} kept" in text
    assert "weights == tacq_quantize's on all 14 linears" in text


def test_capstone_solutions_reproduce_tacq_lite(nb):
    """Run the capstone's cells (solutions included) on the tiny Llama: its asserts compare with tacq_lite."""
    pytest.importorskip("transformers")
    cells = nb.cells
    start = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and c.source.startswith("## Part 3"))
    setup = [c for c in cells[:start] if c.cell_type == "code"][:3]  # parameters, imports, config
    namespace: dict = {}
    for c in setup + [c for c in cells[start:] if c.cell_type == "code"]:
        exec(compile(c.source, "notebook 07", "exec"), namespace)
    assert namespace["passed"] == set(PIECES)


def test_prose_on_the_committed_sweep_matches_its_intervals(nb):
    with open((NOTEBOOKS / _parameters(nb)["sweep_table"]).resolve()) as f:
        ci = {(r["method"], r["bits"]): (float(r["metrics.wikitext2.ppl_low"]), float(r["metrics.wikitext2.ppl_high"]))
              for r in csv.DictReader(f) if r["status"] == "done"}
    def overlap(a, b):
        return ci[a][0] <= ci[b][1] and ci[b][0] <= ci[a][1]
    pairs = [("rtn", "gptq"), ("rtn", "tacq"), ("gptq", "tacq")]
    prose = next(c.source for c in nb.cells if c.source.startswith("**Reading the committed table.**"))
    assert "At 3 bits the intervals of RTN, GPTQ and TaCQ overlap" in prose
    assert all(overlap((a, "3"), (b, "3")) for a, b in pairs)
    assert "At 2 bits the three methods' intervals are apart" in prose and "tens of thousands or above" in prose
    assert not any(overlap((a, "2"), (b, "2")) for a, b in pairs) and min(lo for (_, b), (lo, _) in ci.items()
                                                                         if b == "2") > 10_000
    printed = re.findall(r"^3-bit: \w+ .*: (.*)$", outputs_text(nb), re.M)
    assert printed == ["not distinguishable (the intervals overlap)"] * 2, "the printed verdicts follow the intervals"
