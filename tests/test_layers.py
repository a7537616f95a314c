"""The package's layering: calls only go down, and no module imports itself back in a cycle.

Every import of a tacq_lite module is counted, including the ones inside functions (a lazy
import is still a dependency). A layer is a folder of tacq_lite (core/, model/, algo/, ...) or a
top-level module (io.py, config.py, cli.py). A module may import modules of its own layer or of
a layer listed before it, and the module-level import graph has no cycle. The README's library
map shows the same layers.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tacq_lite"

LAYERS = [  # bottom to top
    ("primitives", {"io", "core", "kernels"}),
    ("model structure", {"model"}),
    ("per-layer algorithms", {"algo"}),
    ("config", {"config"}),
    ("data", {"data"}),
    ("evaluation", {"eval"}),
    ("model passes, the TaCQ recipe, experiments", {"run"}),
    ("course tools", {"course"}),
    ("command line", {"cli"}),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    """'core.quant' for tacq_lite/core/quant.py, 'kernels' for tacq_lite/kernels/__init__.py."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer unit of a module: its folder, or itself for a top-level module."""
    return module.split(".")[0]


def _resolve(parts: list[str]) -> str:
    """The deepest existing module for a dotted path inside the package ('' = the front door)."""
    for n in range(len(parts), 0, -1):
        p = PACKAGE.joinpath(*parts[:n])
        if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file():
            return ".".join(parts[:n])
    return "__init__"


def imported_modules(path: Path) -> set[str]:
    """The tacq_lite modules `path` imports anywhere in its body, as module_name gives them."""
    here = list(path.relative_to(PACKAGE).parts[:-1])  # [] for tacq_lite/x.py, ["run"] for run/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tacq_lite":
                    found.add(_resolve(parts[1:]) if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = here[: len(here) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "tacq_lite":
                parts = node.module.split(".")[1:]
            else:
                continue
            if not parts:  # `from . import a` at the top / `from tacq_lite import a`
                found.update(_resolve([a.name]) for a in node.names)
            else:  # `from .run import tacq` names a module; `from .io import x` names a module's attribute
                found.update(_resolve(parts + [a.name]) for a in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue  # the package's front door re-exports from above; nothing inside imports it
        name = module_name(path)
        graph.setdefault(name, set()).update(imported_modules(path) - {name})
    return graph


def test_every_module_has_a_layer():
    units = {layer_of(m) for m in import_graph()}
    assert units == set(RANK), "add new folders or top-level modules to LAYERS (and the README's library map)"


def test_no_module_imports_the_package_front_door():
    offenders = sorted(m for m, deps in import_graph().items() if "__init__" in deps)
    assert not offenders, f"import the module itself, not tacq_lite's __init__: {offenders}"


def test_imports_only_go_down():
    upward = sorted(f"{m} ({LAYERS[RANK[layer_of(m)]][0]}) imports {d} ({LAYERS[RANK[layer_of(d)]][0]})"
                    for m, deps in import_graph().items() for d in deps
                    if layer_of(d) in RANK and RANK[layer_of(d)] > RANK[layer_of(m)])
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


def test_the_checker_sees_lazy_and_relative_imports():
    """The parser counts an import inside a function and resolves `from ..core.pack import x`."""
    sub = PACKAGE / "kernels" / "dequant.py"
    assert {"core.pack", "core.quant"} <= imported_modules(sub)
    assert "run.tacq" in imported_modules(PACKAGE / "run" / "experiment.py")  # imported inside quantize_model
    assert "course.sweep" in imported_modules(PACKAGE / "cli.py")  # `from .course import sweep`, in a function


def test_the_checker_catches_an_upward_edge_and_a_cycle(tmp_path):
    """Planted violations fail: a model module importing course/, and two modules importing each other."""
    import shutil

    global PACKAGE
    fake = tmp_path / "tacq_lite"
    shutil.copytree(PACKAGE, fake, ignore=shutil.ignore_patterns("__pycache__"))
    (fake / "model" / "walk.py").write_text((fake / "model" / "walk.py").read_text()
                                            + "\n\ndef _up():\n    from ..course import explore\n")
    (fake / "core" / "bits.py").write_text((fake / "core" / "bits.py").read_text() + "\nfrom . import pack\n")
    (fake / "core" / "pack.py").write_text((fake / "core" / "pack.py").read_text() + "\nfrom . import bits\n")
    real, PACKAGE = PACKAGE, fake
    try:
        graph = import_graph()
        assert "course.explore" in graph["model.walk"]
        try:
            test_imports_only_go_down()
        except AssertionError as err:
            assert "model.walk (model structure) imports course.explore" in str(err)
        else:
            raise AssertionError("the upward import was not caught")
        try:
            test_no_import_cycles()
        except AssertionError as err:
            assert "core.bits" in str(err) and "core.pack" in str(err)
        else:
            raise AssertionError("the cycle was not caught")
    finally:
        PACKAGE = real
