"""The house rules of wsss/ that a reader can check by machine (issue #40; run by tests/test_structure.py).

    python scripts/check_structure.py            # prints every breach; exit 1 if any

- no import cycle among wsss's modules (strongly connected components of the import graph, every import
  counted, at module level or inside a function; `from pkg import sub` counts as importing `pkg.sub`);
- no module longer than MAX_MODULE_LINES lines;
- no function or method longer than MAX_FUNCTION_LINES lines (from `def` to its last line, docstring
  included).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 70


def modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted name -> file of every module of the wsss package."""
    out = {}
    for path in sorted((root / "wsss").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the wsss modules it imports."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                deps.update(subs if len(subs) == len(node.names) else [module, *subs])
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


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
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(import_graph(mods))]
    out += [f"module {m}: {n} lines (at most {MAX_MODULE_LINES})" for m, n in long_modules(mods)]
    out += [f"function {f}: {n} lines (at most {MAX_FUNCTION_LINES})" for f, n in long_functions(mods)]
    return out


def main() -> int:
    found = breaches()
    print("\n".join(found) if found else "wsss/: no import cycle, no long module, no long function")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
