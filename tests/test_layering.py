"""The package's import graph, read from the source (AST, no imports executed).

* No circles among module-top imports, and none even counting the imports made inside functions.
* No module imports another module's private (``_name``) function, class or constant.
* Imports of the package inside functions are the listed exceptions below, each with its reason; any other
  belongs at the top of its module.

A ``from pkg import sub`` of a submodule counts as an import of ``pkg.sub`` (Python runs ``pkg/__init__`` first
either way); ``if TYPE_CHECKING:`` blocks never run and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "smoothtransfer"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: In-function imports of the package (importer -> imported), and why they are not at the module top.
#: ``smoothtransfer.commands.*`` are left out: the CLI imports one command module on demand, and each keeps
#: its own imports lazy so that ``smoothtransfer CMD --help`` stays fast.
LAZY = {
    ("smoothtransfer.cli", "smoothtransfer.utils"): "utils imports torch; `smoothtransfer --help` does not need it",
    ("smoothtransfer.experiments.runner", "smoothtransfer.cli"): "runs evaluations through argv (issue 14: to go)",
    ("smoothtransfer.experiments.runner", "smoothtransfer.train.loop"): "only a grid that trains needs it",
    ("smoothtransfer.job_configs", "smoothtransfer.smoothing.smooth"): "torch: only when a job is validated",
    ("smoothtransfer.job_configs", "smoothtransfer.models.denoisers"): "torch: only when a job is validated",
    ("smoothtransfer.smoothing", "smoothtransfer.smoothing.jobs"):
        "the jobs load checkpoints, datasets and tables, layers above smoothing: PEP 562 __getattr__",
    ("smoothtransfer.smoothing.jobs", "smoothtransfer.train.distributed"): "only under torchrun",
    ("smoothtransfer.smoothing.jobs", "smoothtransfer.models.denoisers"): "only with --denoiser",
    ("smoothtransfer.evaluation", "smoothtransfer.evaluation.jobs"):
        "the jobs load checkpoints and objectives, which import this package (the attacks): PEP 562 __getattr__",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _resolve(node: ast.ImportFrom, package: list[str]) -> str:
    """The absolute module name of ``from <node.module> import ...`` written inside ``package``."""
    if not node.level:
        return node.module
    parts = package[: len(package) - node.level + 1]
    return ".".join(parts + [node.module] if node.module else parts)


def _visit(node: ast.AST, lazy: bool, package: list[str], modules: dict):
    """Yield ``(imported, names, lazy, line)`` below ``node``; ``lazy``: inside a function."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _visit(child, True, package, modules)
            continue
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield alias.name, (), lazy, child.lineno
        elif isinstance(child, ast.ImportFrom):
            base, plain = _resolve(child, package), []
            for alias in child.names:
                if f"{base}.{alias.name}" in modules:  # from pkg import submodule
                    yield f"{base}.{alias.name}", (), lazy, child.lineno
                else:
                    plain.append(alias.name)
            if plain:
                yield base, tuple(plain), lazy, child.lineno
        yield from _visit(child, lazy, package, modules)


def _imports(modules: dict[str, tuple[Path, bool]]):
    """Yield ``(importer, imported, names, lazy, line)`` for every import of the package."""
    for name, (path, is_pkg) in modules.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        for target, names, lazy, line in _visit(ast.parse(path.read_text()), False, package, modules):
            if target.split(".")[0] != PACKAGE:
                continue
            while target not in modules:  # `import smoothtransfer.models.factory.x` etc.: the nearest module
                target = target.rsplit(".", 1)[0]
            if target != name:
                yield name, target, names, lazy, line


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _graph(lazy_too: bool) -> dict[str, set[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for importer, imported, _, lazy, _ in _imports(modules):
        if lazy_too or not lazy:
            edges[importer].add(imported)
    return edges


def test_no_import_circles_at_module_top():
    assert _cycles(_graph(lazy_too=False)) == []


def test_no_import_circles_even_through_imports_inside_functions():
    assert _cycles(_graph(lazy_too=True)) == []


def test_no_module_imports_another_modules_private_names():
    private = [f"{importer}:{line} imports {imported}.{n}"
               for importer, imported, names, _, line in _imports(_modules())
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_imports_inside_functions_are_the_listed_exceptions():
    unlisted = sorted({f"{importer} -> {imported} (line {line})"
                       for importer, imported, _, lazy, line in _imports(_modules())
                       if lazy and not importer.startswith(f"{PACKAGE}.commands.")
                       and (importer, imported) not in LAZY})
    assert unlisted == [], "import these at the top of the module, or list them in LAZY with the reason"


def test_the_graph_sees_the_imports():
    """The parser itself: known edges are found, top-level and lazy ones told apart."""
    top, everything = _graph(lazy_too=False), _graph(lazy_too=True)
    assert "smoothtransfer.models.factory" in top["smoothtransfer.models.checkpoint"]
    assert "smoothtransfer.smoothing.sequential" in top["smoothtransfer.smoothing.smooth"]
    assert "smoothtransfer.utils" not in top["smoothtransfer.cli"]
    assert "smoothtransfer.utils" in everything["smoothtransfer.cli"]
