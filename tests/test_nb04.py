"""Notebook 04 as committed: its papermill hints, its checks of the parameters, and its claims.

Static checks on the stored notebook (no kernel, no model): the hints pass lists with -y and strings
bare, the string parameters are checked right after the imports, the figures colour each selector
with the course colour, the ranking of the stored records is drawn, and what the prose says about
those records is what the stored outputs print. Running it is tests/test_notebooks.py's job.
"""
import re

import pytest
from notebook_checks import cell_text, figure_cells, outputs_text, read, sections

pytest.importorskip("nbformat")

NAME = "04_outlier_masking.ipynb"


@pytest.fixture(scope="module")
def nb():
    return read(NAME)


def markdown(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def test_hints_pass_lists_with_y_and_strings_bare(nb):
    text = markdown(nb)
    for name in ("settings", "selectors", "ratios"):
        assert f"-p {name}" not in text, f"-p {name} passes a list as text; use -y \"{name}: [...]\""
    assert re.search(r'-y "selectors: \[', text) and re.search(r'-y "settings: \[\[', text)
    assert "-p quantizer gptq" in text and not re.search(r"-p quantizer ['\"]{2}", text)


def test_string_parameters_are_checked_after_the_imports(nb):
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    checks = code[2].source  # after the parameters and the imports, before the model loads
    assert 'check_choice("quantizer", quantizer, ("rtn", "gptq"))' in checks
    assert 'check_choices("selectors", selectors, SELECTORS)' in checks
    assert checks.index("check_choice") < checks.index("load_model")


def test_figures_use_the_course_colours(nb):
    figures = figure_cells(nb)
    assert len(figures) >= 3
    for cell in figures:
        assert "method_color(" in cell.source and "tab:purple" not in cell.source


def test_stored_ranking_is_drawn_with_error_bars(nb):
    (cell,) = [c for c in figure_cells(nb) if "paper_point(" in c.source]
    assert "errorbar(" in cell.source and "constrained_layout=True" in cell.source


def test_baseline_is_reprinted_once_next_to_this_notebooks_own(nb):
    text = outputs_text(nb)
    assert text.count("full-precision baseline (notebook 00): perplexity") == 1
    assert "full precision in this notebook:" in text and "8 windows × 128 tokens" in text


def test_the_gradient_claim_is_printed_where_the_prose_states_it(nb):
    text = outputs_text(nb)
    for budget in ("0.35 %", "1.00 %"):
        assert re.search(rf"{re.escape(budget)} kept: gradient-based lower in 25 of 25 pairs \(paired\)", text), budget
    assert "25 pairs" in markdown(nb)
    # "msg at every one of three seeds", "random against GPTQ alone ... reversed at another seed"
    assert "msg vs tacq over seeds: msg < tacq at all 3 seeds" in text
    assert re.search(r"random vs none .*the seeds disagree\)", text)


def test_conclusions_are_computed(nb):
    heading = next(h for h in sections(nb) if "Conclusions" in h)
    printed = "".join(cell_text(c) for c in sections(nb)[heading] if c.cell_type == "code")
    assert "paper's setting, 0.35 % kept: gradient-based selectors" in printed and "quick run vs records:" in printed
    assert "|W|" not in printed  # no factor is blamed in a printed conclusion


def test_numbers_in_the_prose_are_printed_by_the_notebook(nb):
    """Every decimal number in the prose (outside code spans and the opening block) appears in the outputs."""
    text = outputs_text(nb)
    prose = "\n".join(c.source for c in nb.cells[1:] if c.cell_type == "markdown")
    prose = re.sub(r"`[^`]*`", "", prose)
    numbers = set(re.findall(r"(?<![\w.])\d+\.\d+", prose))
    missing = [n for n in numbers if n not in text]
    assert not missing, f"the prose quotes {missing}, which no stored output prints"
