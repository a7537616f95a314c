"""Parameter sweeps: run a notebook over a grid with papermill and collect one table.

    tacq-lite sweep -p bits=2,3 -p ratio=0,0.0035 --out sweeps/bits_ratio
    tacq-lite sweep --grid grid.yaml --notebook notebooks/04_outlier_masking.ipynb --out sweeps/nb04
    tacq-lite sweep -p bits=2,3 -p ratio=0,0.0035 --workers 2 --out sweeps/bits_ratio   # 2 runs at a time
    tacq-lite sweep -p bits=2,3 --scheduler tcp://10.0.0.5:8786 --out /shared/sweeps/bits   # on a Dask cluster

Every combination of the grid is one run: papermill executes the notebook with those
parameters plus `results_path`, and the notebook writes its results there as JSON. An output
folder holds

    sweep.json              the notebook and the grid (a rerun must ask for the same grid)
    runs/<id>.ipynb         the executed notebook of each finished run
    runs/<id>.json          its results (written by the notebook)
    runs/<id>.error.json    the error of a failed run (it is retried on the next rerun)
    results.csv, results.json   one row per run: parameters, status, every scalar result

A run counts as done only when both its executed notebook and its results file exist. Both
are written under temporary names and renamed when the run finishes, so an interrupted run
leaves no file that looks done; a rerun skips the finished runs and redoes the rest.

Runs execute one at a time in this process, N at a time in local worker processes, or on a Dask
cluster (course/executors.py); wherever a run executes, it writes the same files, and this process
reads them back into the table, in grid order.
"""
from __future__ import annotations

import concurrent.futures
import csv
import functools
import hashlib
import itertools
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import NamedTuple

from ..io import PACKAGE_ROOT, atomic_file, write_json_atomic
from . import executors

logger = logging.getLogger(__name__)

DEFAULT_NOTEBOOK = PACKAGE_ROOT / "notebooks" / "07_end_to_end.ipynb"
DEFAULT_GRID = {"method": ["gptq", "tacq"]}  # two runs, a few minutes on 2 cores
# Parameter names any tacq_lite notebook may declare: a grid key outside this set is a typo.
KNOWN_PARAMETERS = frozenset({
    "model", "method", "bits", "groupsize", "ratio", "ratios", "selector", "selectors", "calib", "task", "n_task",
    "n_calib", "seq_len", "seed", "percdamp", "mse", "qw_method", "quantizer", "settings", "evals", "eval_tokens",
    "eval_seq_len", "synthetic_limit", "gsm8k_limit", "mmlu_limit", "mmlu_subjects", "bits_list", "groupsizes",
    "ppl_bits", "keep", "rows", "cols", "model_bits", "model_groupsize", "layer_name", "save_dir", "sweep_table",
})


class SweepError(ValueError):
    """A sweep that cannot start as asked (bad grid, wrong folder); the message says what to do."""


def parse_value(text: str):
    """'3' -> 3, '0.01' -> 0.01, 'true' -> True, '[2, 64]' -> [2, 64], 'tacq' -> 'tacq' (YAML scalars)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):  # ValueError: a date-like string such as 2001-13-45
        return text


def parse_grid(items: list[str]) -> dict[str, list]:
    """['bits=2,3', 'selector=tacq,random'] -> {'bits': [2, 3], 'selector': ['tacq', 'random']}.

    A value holding brackets is read whole as one YAML value per ';' (e.g. 'settings=[[3,-1]];[[2,64]]').
    """
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise SweepError(f"grid item {item!r} must look like name=v1,v2 (e.g. bits=2,3).")
        name, values = (part.strip() for part in item.split("=", 1))
        sep = ";" if "[" in values else ","
        parsed = [parse_value(v.strip()) for v in values.split(sep) if v.strip()]
        if not name:
            raise SweepError(f"grid item {item!r} has no parameter name; write name=v1,v2 (e.g. bits=2,3).")
        if not parsed:
            raise SweepError(f"parameter {name!r} has no values in {item!r}; give at least one, e.g. {name}=v1,v2.")
        if name in grid:
            raise SweepError(f"parameter {name!r} appears twice in the grid; give all its values in one item.")
        grid[name] = parsed
    return grid


def read_grid_file(path: str | os.PathLike) -> dict[str, list]:
    """A YAML mapping of parameter names to lists of values ('bits: [2, 3]'); a lone value is a list of one."""
    import yaml

    from ..data.corpus import read_utf8

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"grid file {path} does not exist; pass a YAML file such as one holding 'bits: [2, 3]'.")
    try:
        text = read_utf8(path)
    except ValueError as err:  # not UTF-8; the message names the file
        raise SweepError(f"grid file {err}") from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: a date-like value such as 2001-13-45
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err) or type(err).__name__
        raise SweepError(f"grid file {path} is not valid YAML ({problem}{where}); fix it so it reads like "
                         "'bits: [2, 3]'.") from None
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"grid file {path} must map parameter names to lists of values, e.g. 'bits: [2, 3]'.")
    for name, values in raw.items():
        if values is None or values == []:
            raise SweepError(f"grid file {path}: parameter {name!r} has no values; give at least one, "
                             f"e.g. '{name}: [v1, v2]'.")
    return {str(k): (v if isinstance(v, list) else [v]) for k, v in raw.items()}


def notebook_parameters(notebook: str | os.PathLike) -> dict:
    """The names declared in the notebook's cell tagged `parameters`."""
    from papermill import inspect_notebook

    path = Path(notebook)
    if not path.is_file():
        raise SweepError(f"notebook {path} does not exist.")
    params = inspect_notebook(str(path))
    if not params:
        raise SweepError(f"{path} has no cell tagged 'parameters'; papermill cannot set anything in it.")
    return params


def check_grid(grid: dict[str, list], notebook: str | os.PathLike) -> None:
    declared = notebook_parameters(notebook)
    for name in grid:
        if not isinstance(grid[name], list) or not grid[name]:
            raise SweepError(f"parameter {name!r} needs a non-empty list of values, got {grid[name]!r}.")
        if name not in KNOWN_PARAMETERS and name not in declared:
            import difflib

            near = difflib.get_close_matches(name, sorted(set(declared) | KNOWN_PARAMETERS), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise SweepError(f"unknown parameter {name!r} in the grid.{hint} {Path(notebook).name} declares: "
                             f"{', '.join(sorted(declared))}.")
        if name not in declared:
            raise SweepError(f"{Path(notebook).name} does not declare the parameter {name!r}; it declares: "
                             f"{', '.join(sorted(declared))}. Choose another notebook (--notebook) or drop it.")
        if name == "results_path":
            raise SweepError("results_path is set by the sweep itself; remove it from the grid.")


def expand(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def run_id(params: dict) -> str:
    """A readable, file-safe, unique name for one combination."""
    text = "_".join(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                    for k, v in params.items())
    safe = "".join(c if c.isalnum() or c in "=._-" else "-" for c in text)[:80]
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{safe}_{digest}"


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix] = value


def collect(out_dir: str | os.PathLike) -> list[dict]:
    """One row per run of the grid in out_dir: parameters, status, flattened scalar results."""
    out_dir = Path(out_dir)
    spec = json.loads((out_dir / "sweep.json").read_text())
    rows = []
    for params in expand(spec["grid"]):
        rid = run_id(params)
        row = {"run": rid, **{f"param.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
                              for k, v in params.items()}}
        res, nb, err = (out_dir / "runs" / f"{rid}{s}" for s in (".json", ".ipynb", ".error.json"))
        if res.is_file() and nb.is_file():
            row["status"] = "done"
            _flatten("", json.loads(res.read_text()), row)
        elif err.is_file():
            row["status"] = "failed"
            row["error"] = json.loads(err.read_text()).get("error")
        else:
            row["status"] = "missing"
        rows.append(row)
    return rows


def write_table(out_dir: str | os.PathLike, rows: list[dict]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out_dir / "results.csv"
    with atomic_file(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return csv_path, write_json_atomic(out_dir / "results.json", {"rows": rows})


def prepare(out_dir: str | os.PathLike, notebook: str | os.PathLike, grid: dict[str, list]) -> None:
    """Create or reopen the output folder; refuse one that holds another sweep."""
    out_dir = Path(out_dir)
    spec = {"notebook": str(Path(notebook).resolve()), "grid": grid}
    spec_path = out_dir / "sweep.json"
    if spec_path.is_file():
        old = json.loads(spec_path.read_text())
        if old.get("grid") != grid or Path(old.get("notebook", "")).name != Path(notebook).name:
            raise SweepError(
                f"{out_dir} holds a sweep of {Path(old.get('notebook', '?')).name} over {old.get('grid')}; this one "
                f"is {Path(notebook).name} over {grid}. Use a new --out folder (or delete the old one)."
            )
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise SweepError(f"{out_dir} is not empty and holds no sweep.json; choose a new or empty --out folder.")
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    if not spec_path.is_file():
        write_json_atomic(spec_path, spec)


class RunOutcome(NamedTuple):
    run: str            # run_id(params)
    status: str         # "done" or "failed"
    seconds: float      # wall time of the run where it executed
    error: str | None   # "ExceptionName: message" of a failed run


def execute_with_papermill(src: Path, dst: Path, parameters: dict, cwd: Path, *, kernel: str = "python3") -> None:
    import papermill

    papermill.execute_notebook(str(src), str(dst), parameters=parameters, cwd=str(cwd), kernel_name=kernel,
                               progress_bar=False)


def _record_failure(runs: Path, params: dict, err: BaseException) -> str:
    """Write runs/<id>.error.json for a failed run; returns its one-line message."""
    # papermill's error carries the notebook's own exception name and message
    message = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"[:2000]
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    write_json_atomic(runs / f"{run_id(params)}.error.json", {"params": params, "error": message,
                                                             "traceback": tb[-4000:]})
    return message


def run_one(params: dict, *, notebook: Path, runs: Path, kernel: str = "python3", execute=None) -> RunOutcome:
    """Execute one combination and commit its files; a failure is recorded, not raised.

    This is what a worker runs (in this process, a local worker process or a Dask worker), so it
    takes absolute paths and returns plain data; the results themselves travel as files.
    """
    execute = execute or functools.partial(execute_with_papermill, kernel=kernel)
    rid = run_id(params)
    res, nb, err = (runs / f"{rid}{s}" for s in (".json", ".ipynb", ".error.json"))
    tmp_res, tmp_nb = runs / f"{rid}.json.partial", runs / f"{rid}.partial.ipynb"
    for stale in (res, nb, tmp_res, tmp_nb):  # an interrupted run is redone from scratch
        stale.unlink(missing_ok=True)
    t = time.perf_counter()
    try:
        execute(notebook, tmp_nb, {**params, "results_path": str(tmp_res)}, notebook.parent)
        if not tmp_res.is_file():
            raise RuntimeError(f"{notebook.name} finished but wrote no results to results_path.")
        json.loads(tmp_res.read_text())  # a results file that is not JSON is a failure too
        os.replace(tmp_res, res)
        os.replace(tmp_nb, nb)  # last: its presence with res marks the run done
        err.unlink(missing_ok=True)
        return RunOutcome(rid, "done", time.perf_counter() - t, None)
    except Exception as e:  # noqa: BLE001 -- a failed run is recorded and the sweep goes on
        message = _record_failure(runs, params, e)
        if tmp_nb.is_file():
            os.replace(tmp_nb, runs / f"{rid}.failed.ipynb")
        tmp_res.unlink(missing_ok=True)
        return RunOutcome(rid, "failed", time.perf_counter() - t, message)


def _outcome(future, params: dict, runs: Path) -> RunOutcome:
    """The future's outcome; a run whose worker died (killed, out of memory) is recorded as failed here."""
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 -- BrokenProcessPool, distributed's KilledWorker, ...
        return RunOutcome(run_id(params), "failed", 0.0, _record_failure(runs, params, e))


def run_sweep(grid: dict[str, list] | None = None, *, out_dir: str | os.PathLike,
              notebook: str | os.PathLike = DEFAULT_NOTEBOOK, kernel: str = "python3", workers: int = 1,
              scheduler: str | None = None, log=None, execute=None) -> list[dict]:
    """Run every combination not yet done; returns the collected rows (also written to results.csv/json).

    workers=N runs N notebooks at a time in local processes of cpus // N threads each; scheduler
    (a Dask address such as tcp://10.0.0.5:8786) sends the runs to that cluster's workers, which
    must see the notebook and out_dir at the same paths (a shared filesystem). Rows come in grid
    order whatever order the runs finish in.
    execute(notebook_in, notebook_out, parameters, cwd) runs one notebook (default: papermill); with
    workers > 1 or a scheduler it must be a module-level function, as it is sent to the workers.
    """
    log = log or logger.info  # status lines: route or silence them with `logging` (tacq_lite.course.sweep)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SweepError(f"workers must be a whole number of at least 1, got {workers!r}: --workers 1 runs one "
                         "notebook at a time, --workers N runs N at once on this machine.")
    if scheduler is not None and workers != 1:
        raise SweepError("give --workers (parallel runs on this machine) or --scheduler (runs on a Dask "
                         "cluster, whose workers set the parallelism), not both.")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    notebook = Path(notebook).resolve()  # absolute: a worker may run in another folder or on another machine
    check_grid(grid, notebook)
    try:
        with executors.open_engine(workers=workers, scheduler=scheduler) as engine:
            return _run_grid(engine, grid, out_dir=Path(out_dir), notebook=notebook, kernel=kernel, log=log,
                             execute=execute)
    except executors.EngineError as e:
        raise SweepError(str(e)) from None


def _run_grid(engine: executors.Engine, grid: dict[str, list], *, out_dir: Path, notebook: Path, kernel: str,
              log, execute) -> list[dict]:
    prepare(out_dir, notebook, grid)
    runs = (out_dir / "runs").resolve()
    combos = expand(grid)
    todo = [p for p in combos
            if not ((runs / f"{run_id(p)}.json").is_file() and (runs / f"{run_id(p)}.ipynb").is_file())]
    log(f"sweep of {notebook.name}: {len(combos)} runs, {len(combos) - len(todo)} already done, {len(todo)} to run"
        + (f" on {engine.where}" if todo else ""))
    queue = list(enumerate(todo, 1))[::-1]  # popped from the end: grid order
    in_flight: dict = {}  # future -> (index, params)
    slots = engine.slots or len(todo)
    n_left = len(todo)
    while queue or in_flight:
        while queue and len(in_flight) < slots:
            i, params = queue.pop()
            log(f"[{i}/{len(todo)}] {run_id(params)} ...")
            try:
                future = engine.executor.submit(run_one, params, notebook=notebook, runs=runs, kernel=kernel,
                                                execute=execute)
            except concurrent.futures.BrokenExecutor:  # a worker process died; the pool takes no more runs
                log(f"the worker pool broke; {len(queue) + 1} runs not started stay missing: rerun to resume")
                queue.clear()
                break
            in_flight[future] = (i, params)
        finished, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in sorted(finished, key=lambda f: in_flight[f][0]):
            i, params = in_flight.pop(future)
            outcome = _outcome(future, params, runs)
            n_left -= 1
            if outcome.status == "done":
                log(f"[{i}/{len(todo)}] done in {outcome.seconds:.0f} s, {n_left} left")
            else:
                log(f"[{i}/{len(todo)}] FAILED ({outcome.error.split(':')[0]}); recorded in "
                    f"{outcome.run}.error.json, going on")
    rows = collect(out_dir)
    csv_path, _ = write_table(out_dir, rows)
    done = sum(r["status"] == "done" for r in rows)
    log(f"{done} of {len(rows)} runs done; table: {csv_path}")
    return rows


__all__ = ["DEFAULT_GRID", "DEFAULT_NOTEBOOK", "RunOutcome", "SweepError", "collect", "parse_grid", "read_grid_file",
           "run_one", "run_sweep"]
