"""The house rules of wsss/ that a reader can check by machine (issue #40; run by tests/test_structure.py).

    python scripts/check_structure.py            # prints every breach; exit 1 if any

- no import cycle among wsss's modules (strongly connected components of the import graph, every import
  counted, at module level or inside a function; `from pkg import sub` imports `pkg` and `pkg.sub`);
- no module longer than MAX_MODULE_LINES lines;
- no function or method longer than MAX_FUNCTION_LINES lines (from `def` to its last line, docstring
  included).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from wsss.provenance import import_graph

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70


def modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module of the wsss package under `root`."""
    return {name: path for name, (path, _) in import_graph(root / "wsss").items()}


def imports(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the wsss modules it imports (`wsss.provenance.import_graph`, whose graph also keys the cache;
    here without the modules a registry names as strings and imports lazily)."""
    return {name: set(deps) for name, (_, deps) in import_graph(root / "wsss", by_name=False).items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def long_modules(mods: dict[str, Path], limit: int = MAX_MODULE_LINES) -> list[tuple[str, int]]:
    out = []
    for name, path in mods.items():
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append((name, n))
    return out


def long_functions(mods: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    out = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((f"{name}:{node.lineno} {node.name}", n))
    return out


def breaches(root: Path = REPO) -> list[str]:
    mods = modules(root)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(imports(root))]
    out += [f"module {m}: {n} lines (at most {MAX_MODULE_LINES})" for m, n in long_modules(mods)]
    out += [f"function {f}: {n} lines (at most {MAX_FUNCTION_LINES})" for f, n in long_functions(mods)]
    return out


def main() -> int:
    found = breaches()
    print("\n".join(found) if found else "wsss/: no import cycle, no long module, no long function")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
