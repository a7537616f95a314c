"""Notebook 03 as committed: intuition before the formula, and the prose's claims against the outputs.

Static checks on the stored notebook (no kernel, no model): the circuit and attribution-patching
ideas come before the score's formula, the heatmaps use a log scale, the selectors use the course
colours, and what the prose says about the Taylor test, the score's structure and the masks'
overlaps holds in the stored outputs. The checks every notebook shares (opening block, asserts,
figures) are in tests/test_course_notebooks.py; running it is tests/test_notebooks.py's job.
"""
import re

import pytest
from notebook_checks import cell_text, read

pytest.importorskip("nbformat")


@pytest.fixture(scope="module")
def nb():
    return read("03_contrastive_importance.ipynb")


def cell_with(nb, fragment: str):
    found = [c for c in nb.cells if c.cell_type == "code" and fragment in c.source]
    assert len(found) == 1, f"expected one code cell containing {fragment!r}, found {len(found)}"
    return found[0]


def test_intuition_comes_before_the_formula(nb):
    text = [c.source for c in nb.cells if c.cell_type == "markdown"]
    first_formula = next(i for i, s in enumerate(text) if r"\text{score}" in s)
    before = "\n".join(text[:first_formula]).lower()
    for idea in ("circuit", "attribution patching", "contrast", "q(w)", "first-order taylor"):
        assert idea in before, f"{idea!r} should be explained before the score's formula"
    assert "$$" not in nb.cells[0].source, "the opening block should not start with a formula"


def test_heatmaps_use_a_log_scale_and_constrained_layout(nb):
    cell = cell_with(nb, "imshow(f.clamp_min(floor)")
    assert "LogNorm" in cell.source and "constrained_layout=True" in cell.source


def test_selector_colours_are_the_course_colours(nb):
    cell = cell_with(nb, "Jaccard overlap with the tacq mask")
    assert "method_color(" in cell.source


def test_whole_layer_taylor_test_shows_where_first_order_breaks(nb):
    cell = cell_with(nb, "growing patches of one layer")
    rows = re.findall(r"([\d.]+)% of the layer: predicted ([+-][\d.]+), actual ([+-][\d.]+)", cell_text(cell))
    assert len(rows) >= 3, "the share test's printed lines are missing or changed their wording"
    share, predicted, actual = (list(map(float, col)) for col in zip(*rows))
    assert share == sorted(share) and share[-1] == 100.0
    error = [abs(p - a) for p, a in zip(predicted, actual)]
    assert error[0] < error[-1], "the prose says the estimate is good for small shares and breaks for the whole layer"
    assert actual[-1] > 0, "quantizing a whole layer at 2 bits should raise the loss"


def test_structure_claim_matches_the_printed_shares(nb):
    cell = cell_with(nb, "def share_in_top")
    m = re.search(r"(\d+)% sit in 5 % of the rows, (\d+)% in 5 % of the columns", cell_text(cell))
    assert m, "the structure cell's printed line is missing or changed its wording"
    rows, cols = int(m[1]), int(m[2])
    assert rows > 10 and cols > 10, "the prose says both rows and columns concentrate the top scores"


def test_whole_layers_miss_more_at_the_coarser_grid(nb):
    cell = cell_with(nb, "curvature = ")
    rows = re.findall(r"(\d)-bit +([\w.]+): predicted ([+-][\d.]+), actual ([+-][\d.]+)", cell_text(cell))
    assert len(rows) == 14, "seven linears at two bit widths, one printed line each"
    miss = {b: sum(abs(float(p) - float(a)) for b_, _, p, a in rows if b_ == b) for b in {r[0] for r in rows}}
    coarse, fine = sorted(miss)  # '2' < '3'
    assert miss[coarse] > miss[fine], "the prose says first order misses whole layers by more at push_bits"
    assert sum(float(a) - float(p) for b, _, p, a in rows if b == coarse) > 0, "the prose's positive second-order term"


def test_one_head_stands_out_as_the_prose_says(nb):
    m = re.search(r"head (\d) \(input columns (\d+)–(\d+)\) holds (\d+)% of the top 1 %", cell_text(
        cell_with(nb, "def share_in_top")))
    assert m, "the per-head line is missing or changed its wording"
    assert int(m[3]) - int(m[2]) + 1 == 64, "the prose says the band is 64 columns wide: one head"
    assert int(m[4]) > 2 * 100 // 9, "the prose says one head holds far more than its even share"
    prose = next(c.source for c in nb.cells if c.cell_type == "markdown" and "What the heatmaps show" in c.source)
    assert "64 columns wide" in prose and "9 heads" in prose


def test_overlap_prose_matches_the_printed_rtn_overlap(nb):
    m = re.search(r"RTN Q\(W\): Jaccard ([\d.]+)", cell_text(cell_with(nb, "tacq mask with GPTQ Q(W) vs RTN Q(W)")))
    assert m and float(m[1]) < 0.5, "the prose says well under half of the mask survives RTN's Q(W)"
