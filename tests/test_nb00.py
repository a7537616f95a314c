"""Notebook 00 as committed: what a learner reads before running it, and what it promises.

Static checks on the stored notebook (no kernel, no model): the baseline printed with its
protocol and at least seven sections. The checks every notebook shares (opening block, asserts,
figures) are in tests/test_course_notebooks.py.
"""
import re

import pytest
from notebook_checks import read, sections

pytest.importorskip("nbformat")

@pytest.fixture(scope="module")
def nb():
    return read("00_setup.ipynb")


def test_baseline_is_printed_with_its_protocol(nb):
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    ppl = re.search(r"full-precision baseline: perplexity ([\d.]+) \[([\d.]+), ([\d.]+)\] \((\d+) × (\d+) tok\)", text)
    protocol = re.search(r"protocol: WikiText-2 evaluation half, (\d+) windows × (\d+) tokens = (\d+) tokens", text)
    assert ppl and protocol, "the baseline cell's output is missing or changed its wording"
    low, mid, high = float(ppl[2]), float(ppl[1]), float(ppl[3])
    n_windows, seq_len, n = map(int, protocol.groups())
    assert low < mid < high and n_windows * seq_len == n
    assert int(ppl[4]) == n_windows and int(ppl[5]) == seq_len - 1  # each window predicts seq_len − 1 tokens


def test_has_its_seven_sections(nb):
    assert len(sections(nb)) >= 7, list(sections(nb))
