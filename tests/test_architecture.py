"""The import walls of the mmft package, read from the source with `ast` (nothing is imported).

The layout is a pipeline (config -> data -> model -> loss -> training -> run directory -> embeddings ->
index -> evaluation -> bundle / serve), and it only stays one if the imports keep to it:
1. no import cycle between modules, module-level and function-level imports alike (a function-level
   import hides a cycle from the interpreter until that function runs, but it is still a tangle);
2. the readers of artifacts (evaluation, index, embeddings, serve, bundle) never reach mmft.training,
   directly or through another module: they read the run directory, they do not need the trainer;
3. no library module imports mmft.cli (only mmft/__main__.py may): the CLI calls the library, never
   the other way round.
The graph builder is tested here too, on tiny packages written to tmp_path, so that each check is seen
to fail when it should.
"""
from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "mmft"
READERS = ("evaluation", "index", "embeddings", "serve", "bundle")  # under mmft.; may not reach training
CLI_IMPORTERS = ("__main__",)  # the only modules that may import mmft.cli


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` at `line` of `path` (relative to the package's parent folder);
    `in_function` when the import runs inside a function."""

    source: str
    target: str
    path: Path
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        return f"{self.source} -> {self.target} ({self.path.as_posix()}:{self.line}, {where})"


def discover_modules(pkg_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = [pkg_dir.name, *path.relative_to(pkg_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def lazy_exports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """package -> {name: module} from a literal `_EXPORTS` dict in its __init__ (mmft's lazy exports)."""
    out = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            names = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
            if isinstance(node, ast.Assign) and "_EXPORTS" in names and isinstance(node.value, ast.Dict):
                table = ast.literal_eval(node.value)
                out[name] = {k: f"{name}.{v}" for k, v in table.items()}
    return out


class _ImportVisitor(ast.NodeVisitor):
    """Collects (target, line, in_function) for every import of the package inside one module."""

    def __init__(self, module: str, is_package: bool, modules: dict[str, Path], exports: dict):
        self.module, self.is_package, self.modules, self.exports = module, is_package, modules, exports
        self.root = module.split(".")[0]
        self.depth = 0
        self.bound_root = False  # `import mmft` seen: `mmft.<lazy export>` then names a module
        self.found: list[tuple[str, int, bool]] = []

    def _add(self, target: str, node: ast.AST) -> None:
        while target not in self.modules and "." in target:  # `import mmft.a.b.attr` -> mmft.a.b
            target = target.rsplit(".", 1)[0]
        if target in self.modules and target != self.module:
            self.found.append((target, node.lineno, self.depth > 0))

    def _scope(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == self.root or alias.name.startswith(self.root + "."):
                self.bound_root |= alias.asname is None
                self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: start from this module's package and climb
            parts = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        if base != self.root and not base.startswith(self.root + "."):
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.modules:
                self._add(sub, node)
            elif alias.name in self.exports.get(base, {}):
                self._add(self.exports[base][alias.name], node)
            else:
                self._add(base, node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if (self.bound_root and isinstance(node.value, ast.Name) and node.value.id == self.root
                and node.attr in self.exports.get(self.root, {})):
            self._add(self.exports[self.root][node.attr], node)
        self.generic_visit(node)


def import_graph(pkg_dir: Path) -> dict[str, list[Edge]]:
    """Every module of the package -> its import edges to other modules of the package."""
    modules = discover_modules(pkg_dir)
    exports = lazy_exports(modules)
    graph = {}
    for name, path in modules.items():
        visitor = _ImportVisitor(name, path.name == "__init__.py", modules, exports)
        tree = ast.parse(path.read_text(), str(path))
        # `import mmft` anywhere binds the root name for the attribute pass, so collect imports first
        visitor.bound_root = any(isinstance(n, ast.Import) and any(a.name == visitor.root and a.asname is None
                                                                   for a in n.names) for n in ast.walk(tree))
        visitor.visit(tree)
        seen, edges = set(), []
        for target, line, in_function in visitor.found:
            if target not in seen:  # the first import of each target is the one to report
                seen.add(target)
                edges.append(Edge(name, target, path.relative_to(pkg_dir.parent), line, in_function))
        graph[name] = edges
    return graph


def _strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's components with more than one module, each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_path(graph: dict[str, list[Edge]], start: str, goal, allowed=None) -> list[Edge] | None:
    """Fewest edges from `start` to a module where goal(module) holds (at least one edge), or None."""
    queue, came = deque([start]), {}
    while queue:
        v = queue.popleft()
        for e in graph.get(v, []):
            if allowed is not None and e.target not in allowed:
                continue
            if goal(e.target):
                path = [e]
                while path[0].source != start:
                    path.insert(0, came[path[0].source])
                return path
            if e.target not in came and e.target != start:
                came[e.target] = e
                queue.append(e.target)
    return None


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One shortest cycle per tangle of modules (strongly connected component), as its edges."""
    return [_shortest_path(graph, comp[0], lambda m, c=comp[0]: m == c, set(comp))
            for comp in _strongly_connected(graph)]


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def training_reached(graph: dict[str, list[Edge]], root: str = "mmft") -> list[list[Edge]]:
    """For each reader module that reaches root.training (directly or not), the shortest such path."""
    readers = [m for m in sorted(graph) if any(_is_under(m, f"{root}.{r}") for r in READERS)]
    paths = (_shortest_path(graph, m, lambda t: _is_under(t, f"{root}.training")) for m in readers)
    return [p for p in paths if p]


def cli_importers(graph: dict[str, list[Edge]], root: str = "mmft") -> list[Edge]:
    """Edges into root.cli from any module but the allowed entry points."""
    allowed = {f"{root}.{m}" for m in CLI_IMPORTERS}
    edges = (e for es in graph.values() for e in es)
    return [e for e in edges if e.target == f"{root}.cli" and e.source not in allowed]


def _show(paths: list[list[Edge]]) -> str:
    return "\n".join("  " + "\n    then ".join(str(e) for e in p) for p in paths)


# --- the walls of the real package --------------------------------------------------------------


def test_graph_covers_the_package():
    graph = import_graph(PACKAGE_DIR)
    for module in ("mmft.cli", "mmft.training.trainer", "mmft.index.core", "mmft.evaluation.core"):
        assert module in graph, f"{module} not found under {PACKAGE_DIR}"
    assert {"mmft.training.trainer", "mmft.index.core"} <= {e.target for e in graph["mmft.cli"]}


def test_no_import_cycle():
    cycles = find_cycles(import_graph(PACKAGE_DIR))
    if cycles:
        pytest.fail("import cycles (break each by moving the shared piece down a stage):\n" + _show(cycles))


def test_readers_of_artifacts_never_reach_training():
    paths = training_reached(import_graph(PACKAGE_DIR))
    if paths:
        pytest.fail("modules that read artifacts reach mmft.training (they read the run directory; "
                    "they need not import the trainer):\n" + _show(paths))


def test_only_the_entry_point_imports_cli():
    edges = cli_importers(import_graph(PACKAGE_DIR))
    if edges:
        pytest.fail("library modules import mmft.cli (the CLI calls the library, not back):\n"
                    + _show([[e] for e in edges]))


# --- the checks themselves, on tiny packages ------------------------------------------------------


def _write_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "mmft"
    for rel, text in {"__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(pkg).parents:
            (pkg / parent / "__init__.py").touch()
        path.write_text(text)
    return pkg


def _targets(graph, module):
    return {(e.target, e.in_function) for e in graph[module]}


def test_graph_resolves_every_import_form(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": '_EXPORTS = {"train": "training.trainer"}\n',
        "a/__init__.py": "", "a/b.py": "", "a/c.py": "X = 1\n", "training/trainer.py": "",
        "user.py": ("import os\nimport mmft.a.c\nfrom mmft.a import b\nfrom mmft.a.c import X\n"
                    "def f():\n    from . import a\n    from .a import c\n"),
        "lazy.py": "from mmft import train\n",
        "attr.py": "import mmft\ndef g():\n    return mmft.train\n",
    })
    graph = import_graph(pkg)
    assert _targets(graph, "mmft.user") == {("mmft.a.c", False), ("mmft.a.b", False), ("mmft.a", True)}
    assert _targets(graph, "mmft.lazy") == {("mmft.training.trainer", False)}
    assert ("mmft.training.trainer", True) in _targets(graph, "mmft.attr")
    assert [e.line for e in graph["mmft.user"]] == [2, 3, 6]


def test_a_cycle_is_found_with_its_path(tmp_path):
    pkg = _write_package(tmp_path, {
        "x.py": "from mmft import y\n",
        "y.py": "def f():\n    import mmft.z\n",  # function-level imports count
        "z.py": "from mmft.x import something\n",
        "free.py": "import mmft.x\n",
    })
    cycles = find_cycles(import_graph(pkg))
    assert len(cycles) == 1
    hops = [(e.source, e.target) for e in cycles[0]]
    assert hops == [("mmft.x", "mmft.y"), ("mmft.y", "mmft.z"), ("mmft.z", "mmft.x")]
    assert cycles[0][1].in_function and cycles[0][1].line == 2
    assert "mmft.y -> mmft.z (mmft/y.py:2, in a function)" in _show(cycles)


def test_a_reader_reaching_training_is_found(tmp_path):
    pkg = _write_package(tmp_path, {
        "training/trainer.py": "", "model/adapter.py": "def f():\n    from mmft.training import trainer\n",
        "index/core.py": "from mmft.model import adapter\n",
        "evaluation/core.py": "import mmft.training.trainer\n",
        "embeddings.py": "", "demo/runner.py": "import mmft.training.trainer\n",  # demo may train
    })
    paths = {p[0].source: [(e.source, e.target) for e in p] for p in training_reached(import_graph(pkg))}
    assert paths == {
        "mmft.evaluation.core": [("mmft.evaluation.core", "mmft.training.trainer")],
        "mmft.index.core": [("mmft.index.core", "mmft.model.adapter"),
                            ("mmft.model.adapter", "mmft.training.trainer")],
    }


def test_a_library_module_importing_cli_is_found(tmp_path):
    pkg = _write_package(tmp_path, {"cli.py": "", "__main__.py": "from mmft.cli import main\n",
                                    "serve/app.py": "def f():\n    from mmft import cli\n"})
    edges = cli_importers(import_graph(pkg))
    assert [(e.source, e.target, e.line) for e in edges] == [("mmft.serve.app", "mmft.cli", 2)]


def test_a_clean_package_passes_every_check(tmp_path):
    pkg = _write_package(tmp_path, {
        "cli.py": "import mmft.training.trainer\nimport mmft.index.core\n",
        "__main__.py": "import mmft.cli\n",
        "training/trainer.py": "from mmft import rundir\n", "rundir.py": "",
        "index/core.py": "from mmft import rundir\n",
    })
    graph = import_graph(pkg)
    assert not find_cycles(graph) and not training_reached(graph) and not cli_importers(graph)
