"""The package's layering: calls only go down, and no module imports itself back in a cycle.

Every import of a tacq_lite module is counted, including the ones inside functions (a lazy
import is still a dependency). A module may import modules of its own layer or of a layer
listed before it; the README's library map shows the same layers.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tacq_lite"

LAYERS = [  # bottom to top
    ("primitives", {"records", "quant", "pack", "bits", "kernels"}),
    ("model structure", {"walk", "models", "qlinear"}),
    ("per-layer algorithms", {"gptq", "importance", "scores", "outliers"}),
    ("config", {"config"}),
    ("data and evaluation", {"data", "tasks", "scoring", "synthetic", "calibration", "eval", "benchmarks"}),
    ("model passes", {"pipeline"}),
    ("the TaCQ recipe", {"tacq"}),
    ("experiments", {"experiment"}),
    ("course tools", {"exercises", "explore", "sweep"}),
    ("command line", {"cli"}),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def module_name(path: Path) -> str:
    """'quant' for tacq_lite/quant.py, 'kernels' for anything inside tacq_lite/kernels/."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported_modules(path: Path) -> set[str]:
    """The tacq_lite modules `path` imports anywhere in its body (top-level names, as module_name)."""
    here = path.relative_to(PACKAGE).parts[:-1]  # () for tacq_lite/x.py, ("kernels",) inside kernels
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tacq_lite":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "tacq_lite":
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(parts[0])
            else:  # `from . import a, b` / `from tacq_lite import a`: each name is a module (or __init__'s)
                found.update(a.name if (PACKAGE / f"{a.name}.py").is_file() or (PACKAGE / a.name).is_dir()
                             else "__init__" for a in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the package's front door re-exports from above; nothing inside imports it
        name = module_name(path)
        graph.setdefault(name, set()).update(imported_modules(path) - {name})
    return graph


def test_every_module_has_a_layer():
    assert set(import_graph()) == set(RANK), "add new modules to LAYERS (and the README's library map)"


def test_no_module_imports_the_package_front_door():
    offenders = sorted(m for m, deps in import_graph().items() if "__init__" in deps)
    assert not offenders, f"import the module itself, not tacq_lite's __init__: {offenders}"


def test_imports_only_go_down():
    upward = sorted(f"{m} ({LAYERS[RANK[m]][0]}) imports {d} ({LAYERS[RANK[d]][0]})"
                    for m, deps in import_graph().items() for d in deps if d in RANK and RANK[d] > RANK[m])
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (cycle := visit(dep, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The parser counts an import inside a function and resolves `from ..pack import x`."""
    sub = PACKAGE / "kernels" / "dequant.py"
    assert "pack" in imported_modules(sub) and "quant" in imported_modules(sub)
    assert "tacq" in imported_modules(PACKAGE / "experiment.py")  # imported inside quantize_model
