"""Student copies of the course notebooks: every exercise's solution cut out.

In a notebook, a solution sits between `### BEGIN SOLUTION` and `### END SOLUTION` inside a cell
tagged `exercise`; the student copy keeps the cell, its signature and its comments, and replaces
the solution with a `raise NotImplementedError` the learner fills in. `tacq-lite student` runs it.
"""
from __future__ import annotations

from pathlib import Path

from ..io import write_text_atomic

SOLUTION_BEGIN = "### BEGIN SOLUTION"


SOLUTION_END = "### END SOLUTION"


STUB = 'raise NotImplementedError("exercise: write this part")'


def strip_solutions(source: str) -> str:
    """Replace every BEGIN/END SOLUTION block by a NotImplementedError stub at the same indentation."""
    out, inside, indent = [], False, ""
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == SOLUTION_BEGIN:
            if inside:
                raise ValueError("nested BEGIN SOLUTION markers.")
            inside, indent = True, line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# YOUR CODE HERE")
            out.append(f"{indent}{STUB}")
        elif stripped == SOLUTION_END:
            if not inside:
                raise ValueError("END SOLUTION without BEGIN SOLUTION.")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("BEGIN SOLUTION without END SOLUTION.")
    return "\n".join(out)


def _has_exercises(nb) -> bool:
    return any("exercise" in c.metadata.get("tags", []) for c in nb.cells)


def _strip_notebook(nb, src) -> int:
    """Strip the solutions of `nb` in place; returns the number of exercise cells."""
    n = 0
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "exercise" in tags and cell.cell_type == "code":
            if SOLUTION_BEGIN not in cell.source:
                raise ValueError(f"{src}: an exercise cell has no '{SOLUTION_BEGIN}' block.")
            cell.source = strip_solutions(cell.source)
            cell.outputs, cell.execution_count = [], None
            n += 1
        if "check" in tags and cell.cell_type == "code":
            cell.metadata["tags"] = sorted(set(tags) | {"raises-exception"})
            cell.outputs, cell.execution_count = [], None
    return n


def student_copy(src, dst) -> int:
    """Write a student copy of notebook `src` to `dst`; returns the number of exercise cells.

    Cells tagged `exercise` lose their solution blocks and their outputs; cells tagged `check`
    (the checker calls) get the `raises-exception` tag so the copy still runs end to end and
    shows each checker's message.
    """
    import nbformat

    nb = nbformat.read(str(src), as_version=4)
    n = _strip_notebook(nb, src)
    _write_notebook(nb, dst)
    return n


def _write_notebook(nb, dst) -> None:
    """Write atomically: an interrupted run never leaves half a notebook (nbformat.write's text and newline)."""
    import nbformat

    text = nbformat.writes(nb)
    write_text_atomic(dst, text if text.endswith("\n") else text + "\n")


def make_student_copies(notebooks, out_dir, *, overwrite: bool = False) -> dict[str, int]:
    """Student copies of every notebook holding exercises, in out_dir; {name: exercise count}.

    Every notebook is read and stripped first; nothing is written when one fails, or when a
    copy already exists in out_dir and `overwrite` is False.
    """
    import nbformat

    out_dir = Path(out_dir)
    counts, copies = {}, []
    for src in map(Path, notebooks):
        if src.resolve().parent == out_dir.resolve():
            raise ValueError(f"{out_dir} holds the solution notebooks themselves; choose another --out folder.")
        nb = nbformat.read(str(src), as_version=4)
        if _has_exercises(nb):
            counts[src.name] = _strip_notebook(nb, src)
            copies.append((nb, out_dir / src.name))
    existing = [dst for _, dst in copies if dst.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace it.")
    for nb, dst in copies:
        _write_notebook(nb, dst)
    return counts
