"""The package's import graph, read from the source (AST only; nothing is imported).

Prints the import circles that cross folders and every forbidden (upward) import:

- ``strategies/``, ``collectives/`` and ``live/`` never import ``launching/``;
- the rank side (``launching/rank/``) never imports ``fabric.py``.

Every ``import`` counts, also those inside functions (a lazy import still ties the folders
together), and so do the packages an import runs first (``import a.b.c`` runs ``a/__init__`` and
``a/b/__init__``, except a module's own enclosing packages); those under ``if TYPE_CHECKING:`` do
not (they never run). A circle is a strongly
connected set of modules that spans more than one folder.

    python scripts/import_graph.py          # exit status 1 if there is a circle or a forbidden import
    python scripts/import_graph.py --quiet  # counts only
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "notebook_fabric"
# where each part of the package lives (the magics are a folder of their own: see pyproject.toml)
SOURCES = {PACKAGE: ROOT / "notebook_fabric", f"{PACKAGE}.magics": ROOT / "magics"}
# (importing folder, imported module prefix, why)
FORBIDDEN: List[Tuple[str, str, str]] = [
    (f"{PACKAGE}.strategies", f"{PACKAGE}.launching", "strategies/ sits below launching/"),
    (f"{PACKAGE}.collectives", f"{PACKAGE}.launching", "collectives/ sits below launching/"),
    (f"{PACKAGE}.live", f"{PACKAGE}.launching", "live/ sits below launching/"),
    (f"{PACKAGE}.launching.rank", f"{PACKAGE}.fabric", "a rank builds its Fabric through what the launcher hands it"),
]


def modules() -> Dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found: Dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[ast.stmt]:
    """Every import statement, skipping ``if TYPE_CHECKING:`` bodies."""
    stack: List[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: Set[str]) -> Tuple[Set[str], Set[str]]:
    """The package's modules that module ``name`` names in its imports, and those the imports run
    (the named ones and the packages above them)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    named: Set[str] = set()
    targets: Set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for candidate in candidates:
            while candidate and candidate not in known:  # `from a.b import name`: name is no module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                named.add(candidate)
            while candidate:  # importing a.b.c runs the packages a.b and a first
                if candidate != name and candidate in known and not name.startswith(candidate + "."):
                    targets.add(candidate)
                candidate = candidate.rpartition(".")[0]
    return named, targets


def folder_of(name: str, found: Dict[str, Path]) -> str:
    return name if found[name].name == "__init__.py" else name.rpartition(".")[0]


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[List[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def analyse() -> Tuple[List[List[str]], List[Tuple[str, str, str]]]:
    """(circles across folders, forbidden imports as (importer, imported, why)). Circles follow
    what imports run; forbidden imports are counted as written."""
    found = modules()
    known = set(found)
    edges = {name: imports_of(name, path, known) for name, path in found.items()}
    graph = {name: runs for name, (_, runs) in edges.items()}
    circles = [c for c in strongly_connected(graph)
               if len(c) > 1 and len({folder_of(m, found) for m in c}) > 1]
    forbidden = []
    for importer, (named, _) in sorted(edges.items()):
        for target in sorted(named):
            for folder, prefix, why in FORBIDDEN:
                inside = importer == folder or importer.startswith(folder + ".")
                if inside and (target == prefix or target.startswith(prefix + ".")):
                    forbidden.append((importer, target, why))
    return circles, forbidden


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quiet", action="store_true", help="print the counts only")
    options = parser.parse_args(argv)
    circles, forbidden = analyse()
    found = modules()
    if not options.quiet:
        for circle in circles:
            folders = sorted({folder_of(m, found) for m in circle})
            print(f"circle of {len(circle)} modules across {len(folders)} folders ({', '.join(folders)}):")
            for member in circle:
                print(f"  {member}")
        for importer, target, why in forbidden:
            print(f"forbidden: {importer} imports {target} ({why})")
    modules_in_circles = sum(len(c) for c in circles)
    print(f"{len(circles)} circles across folders ({modules_in_circles} modules), {len(forbidden)} forbidden imports")
    return 1 if circles or forbidden else 0


if __name__ == "__main__":
    sys.exit(main())
