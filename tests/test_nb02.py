"""Notebook 02 as committed: what a learner reads before running it, and what it promises.

Static checks on the stored notebook (no kernel, no model): the opening block, an assert in
every section, the Hessian/OBS/Cholesky derivation checked against the library's factor, the
damping figure stored, the baseline reprinted, and no check cell that later cells depend on.
Running it is tests/test_notebooks.py's job (papermill) and nbval's.
"""
import ast
import re
from pathlib import Path

import pytest
from notebook_checks import cell_text, sections

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "02_gptq.ipynb"


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


def cell_with(nb, needle: str):
    return next(c for c in nb.cells if c.cell_type == "code" and needle in c.source)


def test_opens_with_what_you_learn_need_and_run_time(nb):
    intro = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and intro.startswith("# 02")
    for block in ("**What you will learn**", "**What you need:**", "**Run time**"):
        assert block in intro, f"the opening block lacks {block}"
    assert "00" in intro[intro.index("**What you need:**"):] and "01" in intro[intro.index("**What you need:**"):]
    # the run time and its source: tests/test_course_notebooks.py::test_run_time_is_the_measured_one


def test_every_section_asserts(nb):
    found = sections(nb)
    assert len(found) >= 7, list(found)
    for heading, cells in found.items():
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        assert re.search(r"^\s*(assert |torch\.testing\.assert_close)", code, re.M), f"{heading!r} asserts nothing"


def test_hessian_is_derived_from_the_output_error(nb):
    cell = cell_with(nb, "output_err")
    assert "2 * X_toy.T @ X_toy" in cell.source and "assert torch.allclose(output_err, quadratic" in cell.source
    assert not any(o.get("output_type") == "error" for o in cell.outputs)


def test_schur_rows_are_asserted_equal_to_the_librarys_cholesky_factor(nb):
    cell = cell_with(nb, "schur")
    src = cell.source
    assert "torch.linalg.inv(H[1:, 1:])" in src  # the Schur complement is the inverse of the remaining block
    assert "torch.linalg.cholesky(torch.linalg.inv(H), upper=True)" in src and "inverse_hessian(" in src
    assert re.search(r"assert torch\.allclose\(from_schur, U\b.*from_schur, U_lib", src)
    assert "== inverse_hessian" in cell_text(cell), "the cell's stored output is missing: run the notebook"
    obs = cell_with(nb, "delta_F")
    assert "assert torch.allclose(delta_F, solved" in obs.source


def test_later_cells_do_not_need_the_learners_function(nb):
    """In a student copy the check cells fail; nothing after them may read a name only they define."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    check_defs, later_src = set(), []
    for c in code:
        tags = c.metadata.get("tags", [])
        if "exercise" in tags:
            check_defs.add("gptq_update")
        elif "check" in tags:
            tree = ast.parse(c.source)
            check_defs |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                           for t in n.targets for t in ast.walk(t) if isinstance(t, ast.Name)}
        elif check_defs:
            later_src.append(c.source)
    assert "Q" in check_defs and "Wc" in check_defs
    used = {n.id for s in later_src for n in ast.walk(ast.parse(s)) if isinstance(n, ast.Name)}
    defined_later = {t.id for s in later_src for n in ast.walk(ast.parse(s)) if isinstance(n, (ast.Assign, ast.For))
                     for t in ast.walk(n.target if isinstance(n, ast.For) else n.targets[0]) if isinstance(t, ast.Name)}
    leaked = (check_defs - defined_later) & used
    assert not leaked, f"cells after the check read {leaked}, which only the exercise/check cells define"


def test_damping_figure_is_stored_and_labelled(nb):
    cell = cell_with(nb, "percdamps, [damp_err")
    assert any("image/png" in o.get("data", {}) for o in cell.outputs), "the damping figure is not stored"
    assert all(k in cell.source for k in ("xlabel", "ylabel", "title"))
    assert 'method_color("gptq")' in cell.source and 'method_color("rtn")' in cell.source
    checked = cell_with(nb, "gap[few]")
    assert "assert" in checked.source and "held-out" in cell_text(checked)


def test_every_figure_is_labelled(nb):
    figures = [c for c in nb.cells if c.cell_type == "code"
               and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert len(figures) >= 3
    assert all(all(k in c.source for k in ("xlabel", "ylabel", "title")) for c in figures)


def test_baseline_is_reprinted_once(nb):
    calls = [c for c in nb.cells if c.cell_type == "code" and "print_baseline(" in c.source]
    assert len(calls) == 1
    text = cell_text(calls[0])
    assert "full-precision baseline (notebook 00): perplexity" in text and "full precision in this notebook" in text


def test_prose_quotes_no_run_dependent_number(nb):
    """Perplexities and ratios are printed by code; markdown never repeats one that a rerun could change."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and not cell.source.startswith("# 02"):
            # 3+ decimals, "291 [221, 396]"-style intervals, "0.993×"-style ratios; parameter values such as 0.01 are fine
            assert not re.search(r"\b\d+\.\d{3,}\b|\b\d+(\.\d+)? \[\d|\b\d+\.\d+×", cell.source), cell.source[:200]
