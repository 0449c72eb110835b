"""How `make test` spreads the suite over pytest-xdist workers (`-n 2 --dist loadgroup`).

Every test is its own unit of work, handed to whichever worker is free, except that the tests of a
module that defines a module-scoped (or class- or package-scoped) fixture - a trained store, a real
daemon, a built wheel - are one unit: they run on one worker, so the fixture is built once, not
once per worker. Units with more tests go first (xdist's loadscope order), the rest in collection
order (tests/test_bench_smoke.py, the longest single tests, comes first).

xdist's own `xdist_group` marks are still honoured where xdist can see them; pytest 9.2's structured
node ids hide them from xdist 3.8 (pytest-xdist issue 1386), which is why the module rule is decided
here, in the controller, from the test file itself (it does not collect tests).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

SHARED_SCOPES = frozenset({"module", "class", "package"})


def _is_fixture(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else node
    return (isinstance(func, ast.Attribute) and func.attr == "fixture") or (
        isinstance(func, ast.Name) and func.id == "fixture")


def _scope(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        for kw in node.keywords:
            if kw.arg == "scope":
                value = kw.value
                return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else "dynamic"
    return "function"


@functools.lru_cache(maxsize=None)
def defines_shared_fixture(path: Path) -> bool:
    """The test file at `path` defines a fixture whose scope is wider than a test and narrower than the
    session (or decided at run time). A file that cannot be read or parsed counts as not sharing."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if _is_fixture(dec) and _scope(dec) in SHARED_SCOPES | {"dynamic"}:
                    return True
    return False


def unit_of(rootpath: Path, nodeid: str) -> str:
    """The unit of work a test belongs to: its module's path if the module shares a fixture, else itself."""
    path = nodeid.split("::", 1)[0]
    return path if defines_shared_fixture(rootpath / path) else nodeid


def make_scheduler(config: Any, log: Any) -> Any:
    """A LoadGroupScheduling whose units are `unit_of`'s (explicit `xdist_group` groups first)."""
    from xdist.scheduler import LoadGroupScheduling

    rootpath = Path(config.rootpath)

    class ModuleFixtureScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            group = super()._split_scope(nodeid)  # "name" for "...@name", else the nodeid itself
            return group if group != nodeid else unit_of(rootpath, nodeid)

    return ModuleFixtureScheduling(config, log)
