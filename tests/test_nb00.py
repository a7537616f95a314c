"""Notebook 00 as committed: what a learner reads before running it, and what it promises.

Static checks on the stored notebook (no kernel, no model): the opening block, an assert in
every section, a labelled figure among the stored outputs, and the baseline printed with its
protocol. Running it is tests/test_notebooks.py's job (papermill) and nbval's.
"""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "00_setup.ipynb"


@pytest.fixture(scope="module")
def nb():
    return nbformat.read(NOTEBOOK, as_version=4)


def sections(nb) -> dict[str, list]:
    """{'## n. title': [cells up to the next '## ' heading]}."""
    out, current = {}, None
    for cell in nb.cells:
        heading = cell.source.splitlines()[0] if cell.cell_type == "markdown" and cell.source else ""
        if heading.startswith("## "):
            current = heading
            out[current] = []
        elif current is not None:
            out[current].append(cell)
    return out


def test_opens_with_what_you_learn_need_and_run_time(nb):
    intro = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and intro.startswith("# 00")
    for block in ("**What you will learn**", "**What you need:**", "**Run time**"):
        assert block in intro, f"the opening block lacks {block}"
    run_time = intro[intro.index("**Run time**"):]
    assert "cold" in run_time and "warm" in run_time and re.search(r"\d+ minutes", run_time)


def test_every_section_ends_in_an_assert(nb):
    found = sections(nb)
    assert len(found) >= 7, list(found)
    for heading, cells in found.items():
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        assert re.search(r"^\s*(assert |torch\.testing\.assert_close)", code, re.M), f"{heading!r} asserts nothing"


def test_a_labelled_figure_is_stored(nb):
    figures = [c for c in nb.cells if c.cell_type == "code"
               and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert figures, "run the notebook before committing it: no figure is stored"
    assert all(all(k in c.source for k in ("xlabel", "ylabel", "title")) for c in figures)


def test_baseline_is_printed_with_its_protocol(nb):
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    ppl = re.search(r"full-precision baseline: perplexity ([\d.]+) \[([\d.]+), ([\d.]+)\] \((\d+) × (\d+) tok\)", text)
    protocol = re.search(r"protocol: WikiText-2 evaluation half, (\d+) windows × (\d+) tokens = (\d+) tokens", text)
    assert ppl and protocol, "the baseline cell's output is missing or changed its wording"
    low, mid, high = float(ppl[2]), float(ppl[1]), float(ppl[3])
    n_windows, seq_len, n = map(int, protocol.groups())
    assert low < mid < high and n_windows * seq_len == n
    assert int(ppl[4]) == n_windows and int(ppl[5]) == seq_len - 1  # each window predicts seq_len − 1 tokens
