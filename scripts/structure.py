"""The package's shape, measured: import circles, module sizes, long functions, imports of private names.

    python scripts/structure.py [PACKAGE_DIR]     # default: embedpipe/ beside this script

Every import counts, those inside functions too: a circle hidden in a function body is still one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.Module, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports (``from .x import y`` counts ``x``, or ``x.y`` when that is a module)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(root: Path) -> int:
    files = sorted(root.rglob("*.py"))
    names = {module_name(p, root): p for p in files}
    known = set(names)
    graph, lines, long_functions, up = {}, {}, [], []
    for name, path in names.items():
        tree = ast.parse(path.read_text())
        graph[name] = imports(tree, name, path.name == "__init__.py", known)
        lines[name] = len(path.read_text().splitlines())
        if root.name in graph[name] and name != root.name:
            up.append(name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long_functions.append((length, f"{name}.{node.name}"))
    found = cycles(graph)
    print(f"modules: {len(names)}, lines: {sum(lines.values())}")
    print(f"import circles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"imports of the package's own __init__ from inside it: {len(up)}" + "".join(f"\n  {m}" for m in up))
    biggest = sorted(lines.items(), key=lambda kv: -kv[1])
    print("largest modules: " + ", ".join(f"{n} {c}" for n, c in biggest[:6]))
    print(f"modules over 700 lines: {sum(c > 700 for c in lines.values())}")
    print(f"functions over 80 lines: {len(long_functions)}" + "".join(f"\n  {n} ({c})" for c, n in sorted(long_functions, reverse=True)))
    return 1 if found or up else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "embedpipe"))
