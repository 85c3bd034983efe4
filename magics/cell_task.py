"""Inside a rank: run one ``%%fabric`` cell in the rank's persistent namespace, the way IPython would.

A :class:`CellTask` is the task the magic sends through the pool (``task(fabric, namespace)``).
It is a small dataclass of an importable module, so it pickles by reference and costs little per
cell. In the rank it

1. registers the cell's source with :mod:`linecache` under its own file name
   (``<fabric-cell-N>``), so tracebacks and ``where`` stacks show the cell's lines,
2. loads the notebook values that were shipped with it into the namespace (functions defined in
   the notebook are re-bound to the rank's namespace, as if the cell had defined them),
3. compiles the cell with its last expression split off (``eval``, like IPython), runs it
   (under the subset guard when only some ranks run it), and
4. returns a :class:`CellOutcome`: the value's ``repr`` (and the value itself when it pickles) and
   the ``--out`` variables.

Nothing here imports IPython: ranks never load it.
"""
from __future__ import annotations

import ast
import linecache
import types
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

MAX_VALUE_BYTES = 32 * 1024 * 1024  # larger values come back as their repr only
_COMPILED: "OrderedDict[Tuple[str, str, int], Tuple[types.CodeType, Optional[types.CodeType]]]" = OrderedDict()


@dataclass(frozen=True)
class CellValue:
    """A rank's value of the cell's last expression: its ``repr``, and the pickled value when it travels."""

    text: str
    payload: Optional[bytes] = None


@dataclass(frozen=True)
class CellOutcome:
    """What a rank sends back after a cell: the displayed value (or ``None``) and ``--out`` pickles."""

    value: Optional[CellValue] = None
    outs: Dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class CellTask:
    """One cell for the ranks (see the module docstring).

    ``values`` maps names to cloudpickled notebook values; ``rebind`` names the functions among
    them to re-bind to the rank's namespace; ``outs`` names variables to send back; ``display``
    is false when the cell ends with ``;``; ``running`` lists the ranks that run the cell when it
    is only some of them (``None``: every rank). ``header`` is the cell's first line as the user
    sees it (``%%fabric ...``): with it, line numbers in tracebacks match the notebook's cell.
    """

    filename: str
    source: str
    values: Dict[str, bytes] = field(default_factory=dict)
    rebind: Tuple[str, ...] = ()
    outs: Tuple[str, ...] = ()
    display: bool = True
    running: Optional[Tuple[int, ...]] = None
    header: Optional[str] = None

    def __call__(self, fabric: Any, namespace: Dict[str, Any]) -> CellOutcome:
        offset = 0 if self.header is None else 1
        register_source(self.filename, self.source if self.header is None else f"{self.header}\n{self.source}")
        namespace.setdefault("__name__", "__main__")
        if self.values:
            load_values(self.values, self.rebind, namespace, fabric.global_rank)
        body, last = compile_cell(self.source, self.filename, offset)
        guard = nullcontext() if self.running is None else _subset_guard(self.running, fabric.world_size)
        with guard:
            exec(body, namespace)
            value = eval(last, namespace) if last is not None else None
        shown = None
        if last is not None and value is not None:
            namespace["_"] = value
            if self.display:
                shown = describe_value(value)
        return CellOutcome(value=shown, outs=collect_outs(self.outs, namespace, fabric.global_rank))


def register_source(filename: str, source: str) -> None:
    """Make ``filename`` (which is not a file) show ``source`` in tracebacks and stacks."""
    lines = source.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len(source), None, lines, filename)


def compile_cell(source: str, filename: str, line_offset: int = 0) -> Tuple[types.CodeType, Optional[types.CodeType]]:
    """The cell's statements (``exec``) and its last expression (``eval``), or ``None`` if it ends
    with a statement; line numbers shifted by ``line_offset``. Cached: re-running a cell does not
    compile it again."""
    key = (filename, source, line_offset)
    cached = _COMPILED.get(key)
    if cached is not None:
        return cached
    tree = ast.parse(source, filename=filename, mode="exec")
    if line_offset:
        ast.increment_lineno(tree, line_offset)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
    compiled = (compile(tree, filename, "exec"), last)
    _COMPILED[key] = compiled
    while len(_COMPILED) > 256:
        _COMPILED.popitem(last=False)
    return compiled


def load_values(values: Dict[str, bytes], rebind: Tuple[str, ...], namespace: Dict[str, Any], rank: int) -> None:
    """Unpickle the shipped notebook values into ``namespace``; name the variable if one fails."""
    from notebook_fabric.utilities import by_value

    for name, payload in values.items():
        try:
            value = by_value.loads(payload)
        except Exception as error:
            raise RuntimeError(
                f"the notebook variable {name!r} could not be loaded on rank {rank}: {type(error).__name__}: {error}. "
                "If it needs a module the ranks cannot import, make it inside the %%fabric cell instead."
            ) from error
        if name in rebind and isinstance(value, types.FunctionType):
            value = rebind_globals(value, namespace)
        namespace[name] = value


def rebind_globals(function: types.FunctionType, namespace: Dict[str, Any]) -> types.FunctionType:
    """A copy of ``function`` whose globals are the rank's namespace (as if a cell defined it)."""
    copy = types.FunctionType(function.__code__, namespace, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__doc__ = function.__doc__
    copy.__dict__.update(function.__dict__)
    copy.__annotations__ = dict(getattr(function, "__annotations__", {}) or {})
    return copy


def describe_value(value: Any) -> CellValue:
    """The value as the notebook will show it: its ``repr`` always, the pickle when it is small enough."""
    from notebook_fabric.launching.errors import pickle_for_parent
    from notebook_fabric.utilities.apply import tensors_to_cpu

    try:
        text = repr(value)
    except Exception as error:  # a broken __repr__ must not fail the cell
        text = f"<{type(value).__qualname__} object; repr() failed: {type(error).__name__}: {error}>"
    payload = None if _is_module(value) else pickle_for_parent(tensors_to_cpu(value))
    if payload is not None and len(payload) > MAX_VALUE_BYTES:
        payload = None
    return CellValue(text=text, payload=payload)


def collect_outs(names: Tuple[str, ...], namespace: Dict[str, Any], rank: int) -> Dict[str, bytes]:
    """Pickle the ``--out`` variables; a missing or unpicklable one is an error naming it and the rank."""
    from notebook_fabric.launching.errors import pickle_for_parent
    from notebook_fabric.utilities.apply import tensors_to_cpu

    outs = {}
    for name in names:
        if name not in namespace:
            raise NameError(f"--out {name}: there is no variable {name!r} on rank {rank} after the cell; "
                            "assign it in the cell (or drop --out)")
        value = namespace[name]
        payload = pickle_for_parent(tensors_to_cpu(value))
        if payload is None:
            raise TypeError(f"--out {name}: the value on rank {rank} (a {type(value).__module__}."
                            f"{type(value).__qualname__}) cannot be pickled to send it to the notebook; "
                            "--out something picklable (e.g. model.state_dict()) instead")
        outs[name] = payload
    return outs




def _is_module(value: Any) -> bool:
    """Models come back as their repr only (``--out``/``%fabric pull`` fetch them on purpose)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _subset_guard(running: Tuple[int, ...], world_size: int) -> Any:
    from notebook_fabric.collectives.subset_guard import subset_guard

    return subset_guard(running, world_size)
