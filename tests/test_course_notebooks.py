"""Every course notebook, as committed: what a learner reads before running it, and what it promises.

Static checks of the stored notebooks (no kernel, no model), the same for all eight: an opening block
(what you will learn, what you need, run time cold and warm), an assert in every section, labelled
figures among the stored outputs, papermill hints that pass lists with -y, and no error stored in an
output. Running them is tests/test_notebooks.py's job (papermill) and nbval's.
"""
import re

import pytest
from notebook_checks import NOTEBOOKS, figure_cells, read, sections

pytest.importorskip("nbformat")

COURSE_PLOTS = ("plot_rtn", "explore")  # tacq_lite.course.explore's figure functions
# Issue 24: notebooks 03 and 07 are not rebuilt yet (their drafts wait on branch wip/issue24-nb03-nb07);
# strict xfail, so this list must shrink as soon as one of them passes.
NAMES = sorted(p.name for p in NOTEBOOKS.glob("0*.ipynb"))


def checked(*not_yet: str) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason="issue 24: not rebuilt yet"))
            if n[:2] in not_yet else n for n in NAMES]
ASSERT = re.compile(r"^\s*(assert |torch\.testing\.assert_close|check_\w+\()", re.M)


def test_all_eight_notebooks_are_checked():
    assert len(NAMES) == 8 and NAMES[0].startswith("00_") and NAMES[-1].startswith("07_")


@pytest.mark.parametrize("name", checked("03", "07"))
def test_opens_with_what_you_learn_need_and_run_time(name):
    intro = read(name).cells[0]
    assert intro.cell_type == "markdown" and intro.source.startswith(f"# {name[:2]} ·")
    for block in ("**What you will learn**", "**What you need:**", "**Run time**"):
        assert block in intro.source, f"{name}: the opening block lacks {block}"
    run_time = intro.source[intro.source.index("**Run time**"):]
    assert "cold" in run_time and "warm" in run_time and re.search(r"\d+ minutes?", run_time), name


@pytest.mark.parametrize("name", checked("07"))
def test_every_section_asserts(name):
    found = sections(read(name))
    assert len(found) >= 3, f"{name}: {list(found)}"
    for heading, cells in found.items():
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        if heading.lower().startswith(("## what to take away", "## next", "## summary")):
            continue  # a closing text section teaches nothing new to check
        assert ASSERT.search(code), f"{name}: section {heading!r} asserts nothing"


@pytest.mark.parametrize("name", checked("03", "07"))
def test_figures_are_stored_and_labelled(name):
    figures = figure_cells(read(name))
    assert figures, f"{name}: no figure is stored (run the notebook before committing it)"
    for cell in figures:
        if any(f"{fn}(" in cell.source for fn in COURSE_PLOTS):
            continue  # drawn by tacq_lite.course.explore, whose plots label themselves (test_course_tools.py)
        missing = [k for k in ("xlabel", "ylabel", "title") if k not in cell.source]
        assert not missing, f"{name}: a figure cell sets no {missing}: {cell.source[:80]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_papermill_hints_pass_lists_with_y(name):
    nb = read(name)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    bad = re.findall(r"-p \w+ [\"']?\[[^\n]*", text)
    assert not bad, f"{name}: -p passes a list as a string; use -y \"name: [...]\": {bad}"


@pytest.mark.parametrize("name", NAMES)
def test_no_error_is_stored(name):
    for cell in read(name).cells:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{name}: a stored cell raised {out.get('ename')}"
