"""Notebook 05 as committed: what a learner reads before running it, and what it promises.

Static checks on the stored notebook (no kernel, no model): the roofline uses the stored format's
bits and the measured H100 numbers of BENCHMARKS.md, the Triton exercise is set up for student
copies, the saved file's split adds up, and the prose's numbers match the outputs. The checks
every notebook shares (opening block, asserts, figures) are in tests/test_course_notebooks.py.
"""
import re
from pathlib import Path

import pytest
from notebook_checks import cell_text, figure_cells, read, sections

pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nb():
    return read("05_triton_dequant_kernels.ipynb")


def _code(nb, start: str):
    return next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(start))


def test_has_six_sections_each_with_an_assert(nb):
    secs = sections(nb)
    assert len(secs) == 6, list(secs)
    for title, cells in secs.items():
        assert any(c.cell_type == "code" and "assert " in c.source for c in cells), title


def test_cross_references_point_at_the_right_notebooks(nb):
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "notebook 02" not in text  # the bits accounting and the keep-masks are notebook 04's
    assert "bits accounting of notebook 04" in text and "notebook 06" in text


def test_stored_bits_are_computed_not_written_by_hand(nb):
    assert "3.12" not in "\n".join(c.source for c in nb.cells)  # the paper's accounting is not the stored format
    table = cell_text(_code(nb, "R = C = 4096"))
    row = re.search(r"3-bit g128 \|\s+([\d.]+) \|\s+([\d.]+) \|\s+([\d.]+) \|\s+[\d.]+ \|\s+([\d.]+)x", table)
    assert row, table
    paper, stored, intensity, ceiling = map(float, row.groups())
    assert 3.2 < stored < 3.6 and stored > paper + 0.2
    assert abs(ceiling - 16 / stored) < 0.01 and intensity == ceiling
    # the prose quotes the ceiling as "about 4.5×"
    assert "about 4.5× higher" in "\n".join(c.source for c in nb.cells) and round(ceiling, 1) == 4.5


def test_measured_points_are_benchmarks_h100_numbers(nb):
    src = _code(nb, "# BENCHMARKS.md").source
    assert '"GPU: H100 (2026-11-23)"' in src
    bench = (ROOT / "BENCHMARKS.md").read_text()
    tune = (ROOT / "bench/results/kernels/h100_tune_2026-11-23.md").read_text()
    assert "### GPU: H100 (2026-11-23)" in bench and "| 4 | 256 | 1 | 36.8 | 103.9 | 112.1 |" in tune
    for packed, fp16 in ((36.8, 23.2), (103.9, 54.3), (112.1, 56.2)):
        assert f'"packed": {packed}, "fp16": {fp16}' in src
        assert f"| {fp16} |" in bench
    out = cell_text(_code(nb, "# BENCHMARKS.md"))
    assert out.count("GB/s of 3350") == 6


def test_roofline_is_a_labelled_plot(nb):
    figures = figure_cells(nb)
    roof = next(c for c in figures if "roofline" in c.source)
    for word in ("xlabel", "ylabel", "title", "method_color", "loglog"):
        assert word in roof.source, word


def test_triton_exercise_is_tagged_and_checked(nb):
    ex = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    assert len(ex) == 2
    kernel = next(c for c in ex if "@triton.jit" in c.source)
    assert "### BEGIN SOLUTION" in kernel.source and "def dequant_groups(" in kernel.source
    check = next(c for c in nb.cells if "check_dequant_groups(my_dequant_groups)" in c.source)
    assert "check" in check.metadata.get("tags", []) and "✓ dequant_groups matches" in cell_text(check)
    later = nb.cells[nb.cells.index(check) + 1:]
    assert not any("my_dequant_groups" in c.source or "dequant_groups[" in c.source for c in later)  # no NameError


def test_saved_file_split_adds_up(nb):
    out = cell_text(_code(nb, 'path = os.path.join(folder, "model.safetensors")'))
    parts = dict((k.strip(), float(v)) for k, v in re.findall(r"^\s*([\w .+()]+?):\s+([\d.]+) MiB \(", out, re.M))
    size = float(re.search(r"file ([\d.]+) MiB", out)[1])
    header = float(re.search(r"header:\s+([\d.]+) MiB", out)[1])
    assert {"embedding", "packed codes", "group scale + zero", "kept (CSR)", "norms"} <= set(parts)
    assert abs(sum(parts.values()) + header - size) < 0.1
    assert "BF16" in out and parts["embedding"] > 0.4 * size  # the 16-bit embedding is half the file
