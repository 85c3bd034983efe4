"""In the notebook: what a cell reads and binds, found with :mod:`ast` (nothing is executed).

``analyze_cell(source)`` returns the cell's *free* names (read before the cell binds them: the
candidates to ship from the notebook), the names it binds at top level, and whether its value is
displayed (IPython hides it when the cell ends with ``;``). The scope rules are followed closely
enough for shipping: function parameters and locals, comprehension variables and class bodies do
not count as reads of notebook variables; a name bound by an earlier statement of the cell does not
either.
"""
from __future__ import annotations

import ast
import io
import tokenize
import types
from dataclasses import dataclass
from typing import FrozenSet, Iterable, List, Set, Tuple

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@dataclass(frozen=True)
class CellAnalysis:
    reads: FrozenSet[str]
    binds: FrozenSet[str]
    display: bool


class IPythonSyntaxError(SyntaxError):
    """The cell uses IPython-only syntax (``%magic``, ``!shell``), which ranks cannot run."""


def analyze_cell(source: str, filename: str = "<fabric-cell>", line_offset: int = 0) -> CellAnalysis:
    """Parse ``source``; raise :class:`SyntaxError` (with the cell's file name, and line numbers
    shifted by ``line_offset`` to count the ``%%fabric`` line) if it does not parse."""
    try:
        tree = ast.parse(source, filename=filename, mode="exec")
    except SyntaxError as error:
        _explain_ipython_syntax(source, filename, error, line_offset)
        if error.lineno is not None:
            error.lineno += line_offset
            if getattr(error, "end_lineno", None) is not None:
                error.end_lineno += line_offset
        raise
    reads, bound = _sequential(tree.body, set())
    display = bool(tree.body) and isinstance(tree.body[-1], ast.Expr) and not _ends_with_semicolon(source)
    return CellAnalysis(reads=frozenset(reads), binds=frozenset(bound), display=display)


def code_globals(function: types.FunctionType) -> Set[str]:
    """Global names a function's code may read (``co_names`` of it and its nested code objects)."""
    names: Set[str] = set()
    stack = [function.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


# -- reads ------------------------------------------------------------------------------------------
def _sequential(statements: Iterable[ast.stmt], bound: Set[str]) -> Tuple[Set[str], Set[str]]:
    """Free reads of ``statements`` run in order, and the names bound afterwards (branches merged)."""
    reads: Set[str] = set()
    bound = set(bound)
    for node in statements:
        if isinstance(node, (ast.For, ast.AsyncFor)):
            reads |= _reads([node.iter]) - bound
            bound |= _store_names(node.target)
            inner, bound = _sequential([*node.body, *node.orelse], bound)
            reads |= inner
        elif isinstance(node, (ast.If, ast.While)):
            reads |= _reads([node.test]) - bound
            inner, bound = _sequential([*node.body, *node.orelse], bound)
            reads |= inner
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                reads |= _reads([item.context_expr]) - bound
                if item.optional_vars is not None:
                    bound |= _store_names(item.optional_vars)
            inner, bound = _sequential(node.body, bound)
            reads |= inner
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            inner, after = _sequential(node.body, bound)  # type: ignore[attr-defined]
            reads |= inner
            for handler in node.handlers:  # type: ignore[attr-defined]
                if handler.type is not None:
                    reads |= _reads([handler.type]) - bound
                names = {handler.name} if handler.name else set()
                inner, handled = _sequential(handler.body, bound | names)
                reads |= inner
                after |= handled
            inner, after = _sequential([*node.orelse, *node.finalbody], after)  # type: ignore[attr-defined]
            reads |= inner
            bound = after
        else:
            reads |= _reads([node]) - bound
            bound |= _binds([node])
    return reads, bound


def _reads(nodes: Iterable[ast.AST]) -> Set[str]:
    """Names loaded by ``nodes`` in the current scope, plus the free names of nested scopes."""
    found: Set[str] = set()
    stack: List[ast.AST] = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name):
            if not isinstance(node.ctx, ast.Store):
                found.add(node.id)
            continue
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found |= _function_reads(node)
            continue
        if isinstance(node, ast.ClassDef):
            outer = [*node.bases, *node.keywords, *node.decorator_list]
            found |= _reads(outer) | (_reads(node.body) - _binds(node.body))
            continue
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            found |= _comprehension_reads(node)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _function_reads(node: ast.AST) -> Set[str]:
    args = node.args  # type: ignore[attr-defined]
    outer: List[ast.AST] = [*args.defaults, *[d for d in args.kw_defaults if d is not None]]
    if not isinstance(node, ast.Lambda):
        outer += list(node.decorator_list)  # type: ignore[attr-defined]
        outer += [a.annotation for a in _all_args(args) if a.annotation is not None]
        if node.returns is not None:  # type: ignore[attr-defined]
            outer.append(node.returns)  # type: ignore[attr-defined]
        body: List[ast.AST] = list(node.body)  # type: ignore[attr-defined]
    else:
        body = [node.body]  # type: ignore[attr-defined]
    params = {a.arg for a in _all_args(args)}
    declared_global = {name for n in ast.walk(node) if isinstance(n, (ast.Global, ast.Nonlocal)) for name in n.names}
    local = (_binds(body) | params) - declared_global
    return _reads(outer) | (_reads(body) - local)


def _comprehension_reads(node: ast.AST) -> Set[str]:
    generators = node.generators  # type: ignore[attr-defined]
    targets: Set[str] = set()
    inner: List[ast.AST] = []
    for index, generator in enumerate(generators):
        targets |= _store_names(generator.target)
        if index:
            inner.append(generator.iter)
        inner.extend(generator.ifs)
    if isinstance(node, ast.DictComp):
        inner += [node.key, node.value]
    else:
        inner.append(node.elt)  # type: ignore[attr-defined]
    return _reads([generators[0].iter]) | (_reads(inner) - targets)


def _all_args(args: ast.arguments) -> List[ast.arg]:
    every = [*getattr(args, "posonlyargs", []), *args.args, *args.kwonlyargs]
    every += [a for a in (args.vararg, args.kwarg) if a is not None]
    return every


# -- binds ------------------------------------------------------------------------------------------
def _binds(nodes: Iterable[ast.AST]) -> Set[str]:
    """Names bound by ``nodes`` in the current scope (nested scopes' own names excluded)."""
    found: Set[str] = set()
    stack: List[ast.AST] = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
            found |= {name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names}
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    found.add(alias.asname or alias.name.split(".")[0])
            continue
        if isinstance(node, ast.ExceptHandler) and node.name:
            found.add(node.name)
        if isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        if isinstance(node, _SCOPES):
            if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                found |= {n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr)
                          and isinstance(n.target, ast.Name)}
            continue
        if isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            found.add(node.name)
        if isinstance(node, ast.MatchMapping) and node.rest:
            found.add(node.rest)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _store_names(target: ast.AST) -> Set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


# -- display ----------------------------------------------------------------------------------------
def _ends_with_semicolon(source: str) -> bool:
    """IPython's rule: a trailing ``;`` (comments and blank lines after it ignored) hides the value."""
    last = None
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER,
                                  tokenize.INDENT, tokenize.DEDENT):
                last = token
    except (tokenize.TokenError, SyntaxError):
        return False
    return last is not None and last.type == tokenize.OP and last.string == ";"


def _explain_ipython_syntax(source: str, filename: str, error: SyntaxError, line_offset: int) -> None:
    for number, line in enumerate(source.splitlines(), start=1 + line_offset):
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")) and not stripped.startswith("%="):
            raise IPythonSyntaxError(
                f"line {number} of the %%fabric cell is IPython syntax ({stripped.split()[0]!r}); ranks run plain "
                "Python. Run magics and shell commands in a separate, plain cell.",
                (filename, number, 1, line),
            ) from error
