"""Architecture rules, read from the source (``ast``), never from an import.

1. The import graph of ``edgetune`` (``edgetune/``, ``kernels/`` -> ``edgetune.kernels``,
   ``server/`` -> ``edgetune.server``) has no cycle, module by module or room by room. Every
   import counts (module level and inside functions) except those under ``if TYPE_CHECKING:``.
   ``from P import N`` is an edge to ``P.N`` when that is a module; for a lazy face
   (``lazy_face(__name__, {module: names})``) it is an edge to the submodule exporting ``N``;
   else an edge to ``P``. A package depends only on what its ``__init__`` imports.
2. The server imports only protocol, config, strategies, errors and _lazy; protocol imports no
   other room (but errors and _lazy); the kernels import no other edgetune module.
3. The torch-free entry points load no torch (each in a fresh interpreter).
4. ``tools/check_layout.py`` (module and function line budgets) passes.
"""

from __future__ import annotations

import ast
import functools
import importlib
import itertools
import os
import subprocess
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"edgetune": "edgetune", "kernels": "edgetune.kernels", "server": "edgetune.server"}
ROOMS = (
    "protocol",
    "config",
    "strategies",
    "models",
    "adapters",
    "data",
    "client",
    "sim",
    "measure",
    "onnx",
    "kernels",
    "server",
)

Where = tuple[str, int]  # (repo-relative path, line) of one import statement


@dataclass
class Graph:
    """Modules (name -> repo-relative path) and edges ``{src: {dst: [where, ...]}}``."""

    files: dict[str, str] = field(default_factory=dict)
    edges: dict[str, dict[str, list[Where]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )

    def add(self, src: str, dst: str, where: Where) -> None:
        if where not in self.edges[src][dst]:
            self.edges[src][dst].append(where)

    def nodes(self) -> set[str]:
        return set(self.files) | set(self.edges) | {d for ds in self.edges.values() for d in ds}


def _discover() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every ``.py`` file of the installed package."""
    modules = {}
    for folder, base in SOURCES.items():
        for file in sorted((REPO / folder).rglob("*.py")):
            if "__pycache__" in file.parts:
                continue
            parts = list(file.relative_to(REPO / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([base, *parts])] = (file, is_package)
    return modules


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    """``{name: submodule}`` from a ``lazy_face(__name__, {module: names})`` call, if any."""
    owner = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and len(node.args) >= 2):
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if called != "lazy_face" or not isinstance(node.args[1], ast.Dict):
            continue
        for key, value in zip(node.args[1].keys, node.args[1].values):
            if isinstance(key, ast.Constant) and isinstance(value, ast.Tuple | ast.List):
                for elt in value.elts:
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                        owner[elt.value] = key.value
    return owner


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """Every Import/ImportFrom below ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]))
        else:
            yield from _imports(child)


@functools.cache
def module_graph() -> Graph:
    modules = _discover()
    trees = {
        name: ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for name, (file, _) in modules.items()
    }
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items() if modules[name][1]}
    graph = Graph(files={name: str(file.relative_to(REPO)) for name, (file, _) in modules.items()})

    def known(name: str) -> str:
        """The longest prefix of ``name`` that is a module here (an import may name a symbol)."""
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    for name, tree in trees.items():
        package = name if modules[name][1] else name.rpartition(".")[0]
        for node in _imports(tree):
            where = (graph.files[name], node.lineno)
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = []
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    if candidate in modules:
                        targets.append(candidate)
                    elif alias.name in lazy.get(base, {}):
                        targets.append(f"{base}.{lazy[base][alias.name]}")
                    else:
                        targets.append(base)
            for target in targets:
                if target == "edgetune" or target.startswith("edgetune."):
                    graph.add(name, known(target), where)
    return graph


def room_of(module: str) -> str:
    """``edgetune.<room>`` for a module in a room; top-level modules are their own node."""
    parts = module.split(".")
    return ".".join(parts[:2])


@functools.cache
def room_graph() -> Graph:
    graph = Graph()
    for src, dsts in module_graph().edges.items():
        for dst, wheres in dsts.items():
            if room_of(src) != room_of(dst):
                for where in wheres:
                    graph.add(room_of(src), room_of(dst), where)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's SCCs with more than one node, or one node that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.edges.get(node, {})):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.edges.get(node, {}):
                found.append(sorted(component))

    for node in sorted(graph.nodes()):
        if node not in index:
            visit(node)
    return sorted(found)


def _shortest_cycle(graph: Graph, start: str, members: set[str]) -> list[str]:
    """``[start, ..., start]``: a shortest cycle through ``start`` inside one SCC."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.edges.get(node, {})):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if nxt in members and nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")


def describe_cycles(graph: Graph) -> str:
    """Every SCC, with a shortest cycle through each member and where each edge is imported."""
    lines = []
    for component in strongly_connected(graph):
        lines.append(f"cycle among {len(component)}: {', '.join(component)}")
        seen: set[tuple[str, ...]] = set()
        for start in component:
            cycle = _shortest_cycle(graph, start, set(component))
            turn = cycle[:-1].index(min(cycle[:-1]))
            key = tuple(cycle[turn:-1] + cycle[:turn])
            if key in seen:
                continue
            seen.add(key)
            lines.append("  " + " -> ".join(cycle))
            for src, dst in itertools.pairwise(cycle):
                at = ", ".join(f"{path}:{line}" for path, line in graph.edges[src][dst][:3])
                lines.append(f"      {src} -> {dst}  ({at})")
    return "\n".join(lines)


# --- 1. no import cycles ------------------------------------------------------------------


def test_graph_sees_the_package() -> None:
    graph = module_graph()
    for name in ("edgetune.cli", "edgetune.protocol.names", "edgetune.kernels", "edgetune.server"):
        assert name in graph.files
    assert graph.edges, "no edgetune imports found: the parser is broken"


def test_no_module_import_cycles() -> None:
    cycles = describe_cycles(module_graph())
    assert not cycles, "import cycles between modules:\n" + cycles


def test_no_room_import_cycles() -> None:
    cycles = describe_cycles(room_graph())
    assert not cycles, "import cycles between rooms:\n" + cycles


# --- 2. who may import whom ---------------------------------------------------------------

ALLOWED = {
    "edgetune.server": {"protocol", "config", "strategies", "errors", "_lazy", "server"},
    "edgetune.protocol": {"protocol", "errors", "_lazy"},
    "edgetune.kernels": {"kernels"},
}


@pytest.mark.parametrize("room", sorted(ALLOWED), ids=lambda room: room.split(".")[1])
def test_room_imports_only_what_it_may(room: str) -> None:
    allowed = {f"edgetune.{name}" for name in ALLOWED[room]}
    bad = [
        f"{path}:{line}: {src} imports {dst}"
        for src, dsts in sorted(module_graph().edges.items())
        if room_of(src) == room
        for dst, wheres in sorted(dsts.items())
        if room_of(dst) not in allowed
        for path, line in wheres
    ]
    assert not bad, f"{room} may import only {sorted(allowed)}:\n" + "\n".join(bad)


# --- 3. torch-free entry points -----------------------------------------------------------

# A meta-path spy records the stack at the first `import torch`, so a failure names the chain.
_SPY = """
import sys, traceback
class _Spy:
    chain = []
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not _Spy.chain:
            stack = traceback.extract_stack()[:-1]
            _Spy.chain = [f"{f.filename}:{f.lineno}: {f.line}" for f in stack
                          if not f.filename.startswith("<frozen")]
        return None
sys.meta_path.insert(0, _Spy())
"""
_CHECK = """
if "torch" in sys.modules:
    print("torch was imported; first import from:")
    print("\\n".join(_Spy.chain or ["(unknown)"]))
    sys.exit(3)
"""
_HELP = """
import edgetune.cli
try:
    edgetune.cli.main(["--help"])
except SystemExit as exit:
    assert exit.code in (0, None), f"--help exited with {exit.code!r}"
"""


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import edgetune.config", id="config"),
        pytest.param("import edgetune.protocol.names, edgetune.protocol.spec", id="protocol"),
        pytest.param(_HELP, id="cli-help"),
        pytest.param("import edgetune.onnx.infer", id="onnx-infer"),
    ],
)
def test_torch_free(code: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SPY + code + _CHECK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stdout[-4000:]}{done.stderr[-4000:]}"


# --- 4. layout budget ---------------------------------------------------------------------


def test_layout_budget() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "check_layout.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, "tools/check_layout.py:\n" + done.stdout + done.stderr


FACES = (
    "edgetune.protocol",
    "edgetune.config",
    "edgetune.strategies",
    "edgetune.models",
    "edgetune.adapters",
    "edgetune.data",
    "edgetune.client",
    "edgetune.sim",
    "edgetune.measure",
    "edgetune.onnx",
)


@pytest.mark.parametrize("face", FACES)
def test_every_name_a_face_exports_resolves(face: str) -> None:
    """A lazy face lists its names by hand: each one must exist in the module it names."""
    module = importlib.import_module(face)
    assert module.__all__, f"{face} exports nothing"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{face}.__all__ names that do not resolve: {missing}"
