import json
import os
import socket
import time

import nbformat
import pytest

from tacq_lite import cli
from tacq_lite.course import executors, sweep


def _write_notebook(path, body: str):
    """A notebook declaring bits, ratio and results_path, then running `body`."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("bits = 3\nratio = 0.0\nresults_path = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def tiny_notebook(tmp_path):
    """A notebook declaring bits and ratio; it fails when bits == 99 and records bits * ratio."""
    return _write_notebook(tmp_path / "tiny.ipynb", (
        "import json\nassert bits != 99, 'bits 99 is not a thing'\n"
        "if results_path:\n    json.dump({'product': bits * ratio, 'nested': {'bits': bits}}, open(results_path, 'w'))"
    ))


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

    def execute(src, dst, parameters, cwd):  # `real` is defined below, before the first call
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


def test_cli_sweep_with_papermill(tiny_notebook, tmp_path, capsys, caplog):
    grid = tmp_path / "grid.yaml"
    grid.write_text("bits: [2, 4]\nratio: 0.25\n")
    rc = cli.main(["sweep", "--grid", str(grid), "--notebook", str(tiny_notebook), "--out", str(tmp_path / "o")])
    assert rc == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["product"] for r in rows] == [0.5, 1.0]
    assert "2 of 2 runs done" in caplog.text  # a status line, through logging (the CLI shows it on stderr)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    assert cli.main(["sweep", "-p", "bits=2", "--notebook", str(tiny_notebook), "--out", str(tmp_path / "junk")]) == 2
    assert "not empty" in capsys.readouterr().err


# --- parallel and cluster sweeps -------------------------------------------------------------------

PARALLEL_GRID = {"bits": [2, 3, 4, 99], "ratio": [0.5]}  # three runs and one failure


@pytest.fixture(scope="module")
def threads_notebook(tmp_path_factory):
    """The tiny notebook, also recording what its kernel saw: the process that started it (a
    sweep worker), OMP_NUM_THREADS and torch's thread count."""
    return _write_notebook(tmp_path_factory.mktemp("nb") / "threads.ipynb", (
        "import json, os, torch\nassert bits != 99, 'bits 99 is not a thing'\n"
        "worker = {'pid': os.getppid(), 'omp': os.environ.get('OMP_NUM_THREADS'), 'torch_threads': torch.get_num_threads()}\n"
        "json.dump({'product': bits * ratio, 'nested': {'bits': bits}, 'worker': worker}, open(results_path, 'w'))"
    ))


@pytest.fixture(scope="module")
def serial_rows(threads_notebook, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "out"
    return sweep.run_sweep(PARALLEL_GRID, out_dir=out, notebook=threads_notebook, log=lambda *_: None)


def _without_worker(rows):
    """The rows minus what depends on where a run executed."""
    return [{k: v for k, v in r.items() if not k.startswith("worker.")} for r in rows]


def test_two_workers_give_the_serial_table_with_one_thread_each(threads_notebook, serial_rows, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(executors, "available_cpus", lambda: 2)  # 2 cores / 2 workers: 1 thread each, anywhere
    out, lines = tmp_path / "out", []
    t = time.perf_counter()
    rows = sweep.run_sweep(PARALLEL_GRID, out_dir=out, notebook=threads_notebook, workers=2, log=lines.append)
    print(f"2-worker sweep of 4 runs: {time.perf_counter() - t:.1f} s")
    assert "on 2 local worker processes, 1 thread each" in lines[0]
    assert [r["status"] for r in serial_rows] == ["done", "done", "done", "failed"]
    assert _without_worker(rows) == _without_worker(serial_rows)  # same rows, same values, grid order
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    done = [r for r in rows if r["status"] == "done"]
    assert {(r["worker.omp"], r["worker.torch_threads"]) for r in done} == {("1", 1)}
    assert len({r["worker.pid"] for r in done}) == 2  # two worker processes shared the runs
    assert os.getpid() not in {r["worker.pid"] for r in done}
    err = json.loads((out / "runs" / f"{rows[3]['run']}.error.json").read_text())
    assert err["error"] == "AssertionError: bits 99 is not a thing" and err["params"]["bits"] == 99

    # a rerun, here serial, takes up the files the workers wrote: only the failed run is redone
    calls = []

    def execute(src, dst, parameters, cwd):
        calls.append(parameters["bits"])
        raise RuntimeError("still broken")

    lines.clear()
    rows = sweep.run_sweep(PARALLEL_GRID, out_dir=out, notebook=threads_notebook, execute=execute, log=lines.append)
    assert calls == [99] and "3 already done, 1 to run" in lines[0]
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert rows[3]["error"] == "RuntimeError: still broken"


def test_a_dask_cluster_gives_the_serial_table(threads_notebook, serial_rows, tmp_path):
    distributed = pytest.importorskip("distributed")
    out, lines = tmp_path / "out", []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        rows = sweep.run_sweep(PARALLEL_GRID, out_dir=out, notebook=threads_notebook, scheduler=c.scheduler_address,
                               log=lines.append)
    assert f"on the Dask cluster at {c.scheduler_address} (2 worker threads)" in lines[0]
    assert _without_worker(rows) == _without_worker(serial_rows)
    # each Dask worker is a process of its own with OMP_NUM_THREADS=1 (its nanny sets it)
    done = [r for r in rows if r["status"] == "done"]
    assert {(r["worker.omp"], r["worker.torch_threads"]) for r in done} == {("1", 1)}
    assert os.getpid() not in {r["worker.pid"] for r in done}


def _record_bits(src, dst, parameters, cwd):
    """An execute without a kernel: writes the notebook and results files a run must leave."""
    dst.write_text("{}")
    with open(parameters["results_path"], "w") as f:
        json.dump({"bits": parameters["bits"]}, f)


def _die_on_bits_3(src, dst, parameters, cwd):
    """Kills its worker process on bits == 3, as the OOM killer would (module-level: the workers import it)."""
    if parameters["bits"] == 3:
        os._exit(1)
    _record_bits(src, dst, parameters, cwd)


def test_a_dead_worker_is_recorded_and_a_rerun_finishes(tiny_notebook, tmp_path):
    out, grid = tmp_path / "out", {"bits": [2, 3, 4, 5]}
    rows = sweep.run_sweep(grid, out_dir=out, notebook=tiny_notebook, workers=2, execute=_die_on_bits_3,
                           log=lambda *_: None)
    assert rows[1]["status"] == "failed" and rows[1]["error"].startswith("BrokenProcessPool")
    # the others finished before the death, died with the pool, or were never started
    assert all(r["status"] in ("done", "missing") or r["error"].startswith("BrokenProcessPool") for r in rows)
    rows = sweep.run_sweep(grid, out_dir=out, notebook=tiny_notebook, execute=_record_bits, log=lambda *_: None)
    assert [r["status"] for r in rows] == ["done"] * 4


def test_workers_must_be_at_least_one(tiny_notebook, tmp_path, capsys):
    for bad in ["0", "-2"]:
        rc = cli.main(["sweep", "-p", "bits=2", "--notebook", str(tiny_notebook), "--out", str(tmp_path / "o"),
                       "--workers", bad])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"tacq-lite: error: workers must be a whole number of at least 1, got {bad}")
        assert err.count("\n") == 1
    with pytest.raises(sweep.SweepError, match="at least 1"):
        sweep.run_sweep({"bits": [2]}, out_dir=tmp_path / "o", notebook=tiny_notebook, workers=1.5)
    rc = cli.main(["sweep", "-p", "bits=2", "--notebook", str(tiny_notebook), "--out", str(tmp_path / "o"),
                   "--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"])
    assert rc == 2 and "not both" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_scheduler_that_does_not_answer_fails_fast_and_names_it(tiny_notebook, tmp_path, capsys, monkeypatch):
    pytest.importorskip("distributed")
    address = f"tcp://127.0.0.1:{_closed_port()}"
    t = time.perf_counter()
    rc = cli.main(["sweep", "-p", "bits=2", "--notebook", str(tiny_notebook), "--out", str(tmp_path / "o"),
                   "--scheduler", address])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t < 5  # a refused port: at once, not after the timeout
    assert err.startswith(f"tacq-lite: error: no Dask scheduler answered at {address}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing written
    # a port that accepts the connection and then says nothing: given up after the timeout
    monkeypatch.setattr(executors, "SCHEDULER_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        t = time.perf_counter()
        with pytest.raises(sweep.SweepError, match=f"no Dask scheduler answered at {address} within 1 s"):
            sweep.run_sweep({"bits": [2]}, out_dir=tmp_path / "o", notebook=tiny_notebook, scheduler=address)
        assert time.perf_counter() - t < 5
    with pytest.raises(sweep.SweepError, match="answered at nonsense .*missing port"):
        sweep.run_sweep({"bits": [2]}, out_dir=tmp_path / "o", notebook=tiny_notebook, scheduler="nonsense")
