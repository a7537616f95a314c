"""Every course notebook, as committed: what a learner reads before running it, and what it promises.

Static checks of the stored notebooks (no kernel, no model), the same for all eight: an opening block
(what you will learn, what you need, run time cold and warm), an assert in every section, labelled
figures among the stored outputs, papermill hints that pass lists with -y, and no error stored in an
output. Running them is tests/test_notebooks.py's job (papermill) and nbval's.
"""
import json
import re

import pytest
from notebook_checks import NOTEBOOKS, figure_cells, read, sections

pytest.importorskip("nbformat")

COURSE_PLOTS = ("plot_rtn", "explore")  # tacq_lite.course.explore's figure functions
NAMES = sorted(p.name for p in NOTEBOOKS.glob("0*.ipynb"))
TIMES = NOTEBOOKS.parent / "bench" / "results" / "notebooks" / "times.json"  # python bench/bench_notebooks.py
ASSERT = re.compile(r"^\s*(assert |torch\.testing\.assert_close|check_\w+\()", re.M)


def test_all_eight_notebooks_are_checked():
    assert len(NAMES) == 8 and NAMES[0].startswith("00_") and NAMES[-1].startswith("07_")


@pytest.mark.parametrize("name", NAMES)
def test_opens_with_what_you_learn_need_and_run_time(name):
    intro = read(name).cells[0]
    assert intro.cell_type == "markdown" and intro.source.startswith(f"# {name[:2]} ·")
    for block in ("**What you will learn**", "**What you need:**", "**Run time**"):
        assert block in intro.source, f"{name}: the opening block lacks {block}"
    run_time = intro.source[intro.source.index("**Run time**"):]
    assert "cold" in run_time and "warm" in run_time and re.search(r"\d+ minutes?", run_time), name


@pytest.mark.parametrize("name", NAMES)
def test_every_section_asserts(name):
    found = sections(read(name))
    assert len(found) >= 3, f"{name}: {list(found)}"
    for heading, cells in found.items():
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        if heading.lower().startswith(("## what to take away", "## next", "## summary")):
            continue  # a closing text section teaches nothing new to check
        assert ASSERT.search(code), f"{name}: section {heading!r} asserts nothing"


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("name", NAMES)
def test_each_heading_opens_its_cell_and_numbers_do_not_repeat(name):
    """A '## ' heading inside a cell is invisible to the section checks above, and shows twice to a reader."""
    headings = []
    for cell in read(name).cells:
        lines = cell.source.splitlines() if cell.cell_type == "markdown" else []
        buried = [line for line in lines[1:] if line.startswith("## ")]
        assert not buried, f"{name}: {buried[0]!r} sits inside a cell; start a new markdown cell with it"
        headings += lines[:1] if lines and lines[0].startswith("## ") else []
    numbers = [m[1] for h in headings if (m := re.match(r"## (\d+)\.", h))]
    assert len(numbers) == len(set(numbers)), f"{name}: a section number repeats in {headings}"


@pytest.mark.parametrize("name", NAMES)
def test_run_time_is_the_measured_one(name):
    """The opening block quotes bench/bench_notebooks.py's record of this notebook, cold and warm."""
    intro = read(name).cells[0].source
    m = re.search(r"([\d.]+) minutes with a cold cache, ([\d.]+) minutes warm", intro)
    assert m, f"{name}: the run time should read 'X minutes with a cold cache, Y minutes warm'"
    measured = json.loads(TIMES.read_text())["notebooks"][name]
    assert (m[1], m[2]) == tuple(f"{measured[k]['wall_s'] / 60:.1f}" for k in ("cold", "warm")), name
