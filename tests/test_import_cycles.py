"""The import graph of pocketd's packages: no cycles, dependencies one way, no torch in the daemon.

The graph is read from the source with `ast` (nothing is imported). Module names are the
folder names (`daemon.cli`); `pocketd.daemon.cli` and relative imports map onto them.

- Imports anywhere in a module count (inside functions too: a lazy import is still a
  dependency, it only moves the failure to later).
- Imports under `if TYPE_CHECKING:` count as well, for cycles and for the layer rule: a
  type-only import is a design dependency, and a cycle through one (`commands <-> service`)
  is refused like any other. They are ignored only for the torch check, which is about
  what the daemon process loads at run time.
- `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`.

Layer rule (DESIGN.md): daemon -> ingest, trainer, store; trainer -> store; ingest -> store;
store imports none of them. The daemon process never imports torch: nothing reachable from
`daemon.cli` (with the command modules it registers) or `daemon.service` through module-level
imports may import torch or a library that loads it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "ingest", "store", "trainer")
ALLOWED: dict[str, set[str]] = {
    "daemon": {"ingest", "trainer", "store"},
    "trainer": {"store"},
    "ingest": {"store"},
    "store": set(),
}
TORCH_LIBRARIES = {"torch", "transformers", "peft", "accelerate", "torchvision"}
# What the daemon process always loads: the CLI (which registers every cli_* module at import)
# and the service.
DAEMON_ROOTS = ("daemon.cli", "daemon.service")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str  # a pocketd module name ("store.db") or an external one ("torch.nn")
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    module_level: bool  # not inside a function (runs when the module is imported)


def discover() -> dict[str, Path]:
    """module name -> file, for every module of the packages."""
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = f
    return mods


MODULES = discover()


def canonical(name: str) -> str:
    """`pocketd.store.db` -> `store.db`; other names unchanged."""
    return name.removeprefix("pocketd.") if name.startswith("pocketd.") else name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, type_only: bool, module_level: bool) -> Iterator[tuple[ast.AST, bool, bool]]:
    """Every node with whether it sits under `if TYPE_CHECKING:` and whether it runs at import."""
    for child in ast.iter_child_nodes(node):
        child_type_only, child_level = type_only, module_level
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            child_level = False
        yield child, child_type_only, child_level
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True, child_level
                yield from _walk(stmt, True, child_level)
            for stmt in child.orelse:
                yield stmt, child_type_only, child_level
                yield from _walk(stmt, child_type_only, child_level)
        else:
            yield from _walk(child, child_type_only, child_level)


def edges_of(module: str) -> list[Edge]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Edge] = []
    for node, type_only, level in _walk(tree, False, True):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [canonical(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = canonical(node.module or "")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in MODULES else base)
        for t in dict.fromkeys(targets):
            if t != module:
                out.append(Edge(module, t, node.lineno, type_only, level))
    return out


EDGES: dict[str, list[Edge]] = {m: edges_of(m) for m in MODULES}


def internal(edge: Edge) -> str | None:
    """The pocketd module an edge reaches (its longest known prefix), or None if external."""
    name = edge.target
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp: list[str] = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return sorted(found)


def describe(component: list[str]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for m in component:
        for e in EDGES[m]:
            t = internal(e)
            if t in members and t != m:
                lines.append(f"    {m} -> {t} ({MODULES[m].relative_to(ROOT)}:{e.line}"
                             f"{', TYPE_CHECKING' if e.type_only else ''})")
    return "\n".join(lines)


def test_no_import_cycles() -> None:
    graph = {m: {t for e in EDGES[m] if (t := internal(e)) is not None and t != m} for m in MODULES}
    found = cycles(graph)
    assert not found, f"{len(found)} import cycles:\n" + "\n".join(describe(c) for c in found)


def test_dependencies_go_one_way() -> None:
    bad = []
    for m, edges in EDGES.items():
        pkg = m.split(".")[0]
        for e in edges:
            t = internal(e)
            if t is None:
                continue
            target_pkg = t.split(".")[0]
            if target_pkg != pkg and target_pkg not in ALLOWED[pkg]:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{e.line}: {m} imports {t} ({pkg} -> {target_pkg})")
    assert not bad, "imports against the layer rule:\n" + "\n".join(bad)


def _load_path(module: str) -> list[str]:
    """The module and the parent packages Python runs before it: `daemon.x` -> [`daemon`, `daemon.x`]."""
    parts = module.split(".")
    return [p for i in range(1, len(parts) + 1) if (p := ".".join(parts[:i])) in MODULES]


def test_daemon_never_loads_torch_at_import() -> None:
    roots = [*DAEMON_ROOTS, *(m for m in MODULES if m.startswith("daemon.cli_"))]
    via: dict[str, str | None] = {}
    todo: list[str] = []
    for r in roots:
        for m in _load_path(r):
            via.setdefault(m, None)
            todo.append(m)
    bad: list[str] = []
    while todo:
        m = todo.pop()
        for e in EDGES[m]:
            if not e.module_level or e.type_only:
                continue
            t = internal(e)
            if t is None:
                if e.target.split(".")[0] in TORCH_LIBRARIES:
                    chain = [m]
                    while (p := via.get(chain[-1])) is not None:
                        chain.append(p)
                    bad.append(f"{MODULES[m].relative_to(ROOT)}:{e.line} imports {e.target} "
                               f"(loaded via {' <- '.join(chain)})")
                continue
            for n in _load_path(t):
                if n not in via:
                    via[n] = m
                    todo.append(n)
    assert not bad, "the daemon's modules load torch at import:\n" + "\n".join(bad)


# -- the checker itself ----------------------------------------------------------------------------


def test_cycles_finds_components() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"x": {"y"}, "y": {"x"}, "z": {"w"}, "w": {"z"}}) == [["w", "z"], ["x", "y"]]


def test_edges_cover_relative_lazy_and_type_checking_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "daemon"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "import pocketd.store.db\n"
        "if TYPE_CHECKING:\n    from .c import C\n"
        "def f():\n    import torch\n"
    )
    for name in ("b", "c"):
        (pkg / f"{name}.py").write_text("")
    fake = {"daemon": pkg / "__init__.py", "daemon.a": pkg / "a.py", "daemon.b": pkg / "b.py",
            "daemon.c": pkg / "c.py", "store.db": pkg / "b.py"}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    got = {(e.target, e.type_only, e.module_level) for e in edges_of("daemon.a")}
    assert got == {("typing", False, True), ("daemon.b", False, True), ("store.db", False, True),
                   ("daemon.c", True, True), ("torch", False, False)}
