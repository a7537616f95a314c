import json

import nbformat
import pytest

from tacq_lite import cli
from tacq_lite.course import sweep


@pytest.fixture
def tiny_notebook(tmp_path):
    """A notebook declaring bits and ratio; it fails when bits == 99 and records bits * ratio."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("bits = 3\nratio = 0.0\nresults_path = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json\nassert bits != 99, 'bits 99 is not a thing'\n"
        "if results_path:\n    json.dump({'product': bits * ratio, 'nested': {'bits': bits}}, open(results_path, 'w'))"
    )]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


def test_parse_grid_reads_yaml_scalars():
    g = sweep.parse_grid(["bits=2,3", "selector=tacq,random", "mse=true", "settings=[[3, -1]];[[2, 64]]"])
    assert g == {"bits": [2, 3], "selector": ["tacq", "random"], "mse": [True], "settings": [[[3, -1]], [[2, 64]]]}
    with pytest.raises(sweep.SweepError, match="name=v1,v2"):
        sweep.parse_grid(["bits"])
    with pytest.raises(sweep.SweepError, match="twice"):
        sweep.parse_grid(["bits=2", "bits=3"])


def test_bad_grid_files_are_one_line_errors(tmp_path, capsys):
    grid = tmp_path / "bad.yaml"
    grid.write_text("bits: [2, 3\n")
    assert cli.main(["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tacq-lite: error: grid file") and "bad.yaml is not valid YAML" in err and "line 2" in err
    cases = {"- 2\n- 3\n": "must map parameter names", "bits: 2001-13-45\n": "not valid YAML",
             "bits: [2]\n# \xe9t\xe9\n": r"not UTF-8 text \(byte 0xe9 at offset 12\)"}
    for text, phrase in cases.items():
        grid.write_bytes(text.encode("latin-1"))
        with pytest.raises(sweep.SweepError, match=phrase):
            sweep.read_grid_file(grid)
    with pytest.raises(sweep.SweepError, match="missing.yaml does not exist"):
        sweep.read_grid_file(tmp_path / "missing.yaml")


def test_empty_value_lists_are_rejected(tiny_notebook, tmp_path):
    with pytest.raises(sweep.SweepError, match="parameter 'bits' has no values"):
        sweep.parse_grid(["bits="])
    grid = tmp_path / "grid.yaml"
    grid.write_text("ratio: [0.5]\nbits: []\n")
    with pytest.raises(sweep.SweepError, match="grid.yaml: parameter 'bits' has no values"):
        sweep.read_grid_file(grid)
    with pytest.raises(sweep.SweepError, match="'bits' needs a non-empty list"):
        sweep.run_sweep({"bits": []}, out_dir=tmp_path / "o", notebook=tiny_notebook)
    assert not (tmp_path / "o").exists()


def test_grid_names_are_checked(tiny_notebook, tmp_path):
    with pytest.raises(sweep.SweepError, match="unknown parameter 'bitz'.*Did you mean 'bits'"):
        sweep.run_sweep({"bitz": [2]}, out_dir=tmp_path / "o", notebook=tiny_notebook)
    with pytest.raises(sweep.SweepError, match="does not declare the parameter 'selector'"):
        sweep.run_sweep({"selector": ["tacq"]}, out_dir=tmp_path / "o", notebook=tiny_notebook)
    assert not (tmp_path / "o").exists()  # nothing written for a bad grid


def test_sweep_runs_collects_and_resumes(tiny_notebook, tmp_path):
    out = tmp_path / "out"
    calls = []
    real = None

    def execute(src, dst, parameters, cwd):
        calls.append(parameters["bits"])
        if parameters["bits"] == 3 and parameters["ratio"] == 0.5 and len(calls) == 2:
            dst.write_text("{}")  # a partial notebook, then the interrupt
            raise KeyboardInterrupt
        real(src, dst, parameters, cwd)

    import papermill

    def real(src, dst, parameters, cwd):
        papermill.execute_notebook(str(src), str(dst), parameters=parameters, cwd=str(cwd), progress_bar=False)

    grid = {"bits": [2, 3, 99], "ratio": [0.5]}
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(grid, out_dir=out, notebook=tiny_notebook, execute=execute, log=lambda *_: None)
    rows = sweep.collect(out)
    assert [r["status"] for r in rows] == ["done", "missing", "missing"]  # the partial run is not collected
    calls.clear()
    rows = sweep.run_sweep(grid, out_dir=out, notebook=tiny_notebook, execute=execute, log=lambda *_: None)
    assert calls == [3, 99]  # only the missing runs
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert rows[0]["product"] == 1.0 and rows[1]["nested.bits"] == 3 and rows[0]["param.bits"] == 2
    assert "bits 99 is not a thing" in rows[2]["error"]
    import csv

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and [r["status"] for r in table] == ["done", "done", "failed"]
    assert rows[2]["error"] == "AssertionError: bits 99 is not a thing"
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    assert not list((out / "runs").glob("*.partial*"))
    with pytest.raises(sweep.SweepError, match="different|holds a sweep"):
        sweep.run_sweep({"bits": [2]}, out_dir=out, notebook=tiny_notebook, execute=execute)


def test_cli_sweep_with_papermill(tiny_notebook, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("bits: [2, 4]\nratio: 0.25\n")
    rc = cli.main(["sweep", "--grid", str(grid), "--notebook", str(tiny_notebook), "--out", str(tmp_path / "o")])
    assert rc == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["product"] for r in rows] == [0.5, 1.0]
    assert "2 of 2 runs done" in capsys.readouterr().out
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    assert cli.main(["sweep", "-p", "bits=2", "--notebook", str(tiny_notebook), "--out", str(tmp_path / "junk")]) == 2
    assert "not empty" in capsys.readouterr().err
