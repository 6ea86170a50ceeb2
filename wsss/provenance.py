"""Where a result came from: stable digests of config material, the source code a stage runs, the git version.

`code_digest(module)` hashes a module and every wsss module it imports, transitively (read from the sources, so
registries that import by name count too); a stage's cache key holds its digest, so an edit recomputes what
depends on the edited code and nothing else. `code_version()` is what a manifest records: the package version
and `git rev-parse --short HEAD`, with `.dirty` when the checkout has uncommitted changes.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import wsss


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@cache
def import_graph(root: Path | None = None, by_name: bool = True) -> dict[str, tuple[Path, frozenset[str]]]:
    """Every module of the wsss package (at `root`, default the installed one): its file and the wsss modules
    it imports (anywhere in the file, also by name, as a registry does with importlib). `from pkg import sub`
    imports `pkg` (its `__init__` runs first) and `pkg.sub`. `by_name=False` leaves out the modules named only
    as strings (imported lazily, when called: no circle at import time)."""
    root = Path(wsss.__file__).parent if root is None else Path(root)
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .ops import x
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # from wsss import dist -> wsss.dist
            elif by_name and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.add(node.value)  # importlib.import_module("wsss.data.voc"), as the dataset registry does
        graph[name] = (path, frozenset(f for f in found if f in names))
    return graph


@cache
def code_digest(module: str = "wsss") -> str:
    """sha256 of the source a module runs: its file and every wsss module it imports, transitively.

    A stage's key holds the digest of its module, so an edit to the refinement code recomputes refinements
    and what follows them, not the classifier. `wsss` alone (the default) covers the whole package.
    """
    graph = import_graph()
    seen: set[str] = set()
    stack = [module] if module != "wsss" else list(graph)
    while stack:
        m = stack.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        stack.extend(graph[m][1])
    h = hashlib.sha256(wsss.__version__.encode())
    for m in sorted(seen):
        h.update(m.encode())
        h.update(graph[m][0].read_bytes())
    return h.hexdigest()[:16]


@cache
def code_version() -> str:
    """Package version, plus the git commit (and `.dirty` for uncommitted changes) when run from a checkout."""
    here = Path(__file__).parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "--short", "HEAD")
    if not sha:
        return wsss.__version__
    dirty = ".dirty" if git("status", "--porcelain", "--", ".") else ""
    return f"{wsss.__version__}+g{sha}{dirty}"
