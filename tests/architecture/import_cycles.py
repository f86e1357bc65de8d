"""Import cycles among kvpool's own modules: `python tests/architecture/import_cycles.py [REPO_ROOT]`.

Counts every import statement, inside functions and under `if TYPE_CHECKING:` too (a lazy import
still ties two modules), and prints each group of modules that import each other (a strongly
connected component of the import graph). Tests, scripts and docs are left out. There must be none
(test_layers.py); this prints where they are.
"""

from __future__ import annotations

import ast
import pathlib
import sys

SKIPPED = {"tests", "scripts", "docs", "examples", "build"}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted name (`kvpool.…`) → file, for every module of the package at `root`."""
    out: dict[str, pathlib.Path] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIPPED or rel.parts[0].startswith(".") or "__pycache__" in rel.parts:
            continue
        name = ".".join(("kvpool", *rel.with_suffix("").parts)).removesuffix(".__init__")
        out[name] = path
    return out


def imported(name: str, path: pathlib.Path, known: dict[str, pathlib.Path]) -> set[str]:
    """kvpool modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return sorted(found, key=len, reverse=True)


def main(root: pathlib.Path) -> int:
    known = modules(root)
    graph = {name: imported(name, path, known) for name, path in known.items()}
    groups = cycles(graph)
    print(f"{len(known)} modules; {len(groups)} import cycles, {sum(map(len, groups))} modules in them")
    for group in groups:
        print(f"  {len(group)}: {', '.join(group)}")
    return 1 if groups else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
