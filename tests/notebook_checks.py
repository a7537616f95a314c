"""Reading a stored notebook for static tests: its sections, its outputs' text, its figures."""
from __future__ import annotations

from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def read(name: str):
    import nbformat

    return nbformat.read(NOTEBOOKS / name, as_version=4)


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


def cell_text(cell) -> str:
    """Everything a code cell printed (stdout, stderr, text/plain results), as one string."""
    parts = []
    for out in cell.get("outputs", []):
        text = out.get("text", "")
        parts.append("".join(text) if isinstance(text, list) else text)
        plain = out.get("data", {}).get("text/plain", "")
        parts.append("".join(plain) if isinstance(plain, list) else plain)
    return "".join(parts)


def outputs_text(nb) -> str:
    return "".join(cell_text(c) for c in nb.cells if c.cell_type == "code")


def figure_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"
            and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
