"""In the notebook: which notebook values a cell needs on the ranks, pickled once per change.

Rule (the latest assignment wins): a name the cell reads is shipped when the notebook has it and
the ranks do not already hold that same notebook value. The :class:`ValueTracker` remembers, per
name, a fingerprint of the notebook value the ranks are in sync with:

- after shipping a value, its fingerprint;
- after a cell (or ``--out`` / ``%fabric pull``) binds the name on the ranks, the fingerprint of
  the notebook's value at that moment, so the ranks' own value is not overwritten by an older
  notebook value; assigning the name again in the notebook makes it newer, and it ships again.

Fingerprints are cheap where it matters: modules by identity, tensors by identity and version
counter (in-place changes bump it), ``nn.Module`` objects by their parameters' versions; anything
else by a digest of its pickle (which ships as is when it changed). Functions defined in the
notebook travel without their globals and are re-bound to the rank's namespace, and the notebook
globals they read are shipped by the same rule, as if the cell read them.
"""
from __future__ import annotations

import hashlib
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Set, Tuple

from .analysis import code_globals

NEVER_SHIPPED = frozenset({
    "fabric", "In", "Out", "get_ipython", "exit", "quit", "_", "__", "___", "_ih", "_oh", "_dh", "_i", "_ii",
    "_iii", "__builtins__", "__builtin__", "__name__", "__doc__", "__package__", "__loader__", "__spec__",
})
_HISTORY_NAME = re.compile(r"^_(i)?\d+$")
_MISSING: Hashable = ("missing",)


class UnpicklableVariableError(TypeError):
    """A notebook variable a cell reads cannot be pickled to send it to the ranks."""

    def __init__(self, name: str, value: Any, error: BaseException) -> None:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        super().__init__(
            f"the cell reads the notebook variable {name!r} (a {kind}), which cannot be sent to the ranks: "
            f"cloudpickle fails with {type(error).__name__}: {error}. Create it inside the %%fabric cell "
            f"instead, or give the notebook variable another name if the cell does not need it. "
            "Nothing was run; the pool is unaffected."
        )
        self.name = name


@dataclass
class Shipment:
    """The values to send with one cell, and the fingerprints to record once the cell ran."""

    values: Dict[str, bytes] = field(default_factory=dict)
    rebind: Tuple[str, ...] = ()
    fingerprints: Dict[str, Hashable] = field(default_factory=dict)


def shippable(name: str) -> bool:
    """Whether ``name`` may travel at all (the rank's ``fabric`` and IPython's history never do)."""
    return name not in NEVER_SHIPPED and not _HISTORY_NAME.match(name)


class ValueTracker:
    """Per pool: which notebook values the ranks already hold (see the module docstring)."""

    def __init__(self) -> None:
        self._synced: Dict[str, Hashable] = {}

    def reset(self) -> None:
        """A new pool holds nothing."""
        self._synced.clear()

    def collect(self, names: Iterable[str], user_ns: Mapping[str, Any], force: bool = False) -> Shipment:
        """Pickle what must travel for a cell reading ``names`` (``force``: ship even if in sync)."""
        from notebook_fabric.utilities import by_value

        shipment = Shipment()
        rebind: List[str] = []
        pending = [n for n in names if shippable(n) and n in user_ns]
        seen: Set[str] = set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            value = user_ns[name]
            if _is_notebook_function(value):
                rebind.append(name)
                pending.extend(n for n in code_globals(value) if n not in seen and shippable(n) and n in user_ns)
            cheap = cheap_fingerprint(value)
            if not force and cheap is not None and self._synced.get(name) == cheap:
                continue
            try:
                payload = by_value.dumps(_without_globals(value) if name in rebind else value)
            except Exception as error:
                raise UnpicklableVariableError(name, value, error) from error
            fingerprint = cheap if cheap is not None else ("pickle", hashlib.blake2b(payload, digest_size=16).digest())
            if not force and self._synced.get(name) == fingerprint:
                continue
            shipment.values[name] = payload
            shipment.fingerprints[name] = fingerprint
        shipment.rebind = tuple(n for n in rebind if n in shipment.values)
        return shipment

    def commit(self, shipment: Shipment) -> None:
        """The ranks received ``shipment``."""
        self._synced.update(shipment.fingerprints)

    def forget(self, names: Iterable[str]) -> None:
        """Unsure what the ranks hold for ``names`` (a failed cell): ship them again next time."""
        for name in names:
            self._synced.pop(name, None)

    def mark_rank_bound(self, names: Iterable[str], user_ns: Mapping[str, Any]) -> None:
        """The ranks bound ``names`` themselves: the notebook's current values are older than theirs."""
        for name in names:
            if not shippable(name):
                continue
            if name not in user_ns:
                self._synced[name] = _MISSING
                continue
            value = user_ns[name]
            fingerprint = cheap_fingerprint(value)
            if fingerprint is None:
                fingerprint = _digest_or_identity(value)
            self._synced[name] = fingerprint


def cheap_fingerprint(value: Any) -> Optional[Hashable]:
    """A fingerprint that needs no pickling, or ``None`` when only a digest of the pickle will do."""
    if isinstance(value, types.ModuleType):
        return ("module", id(value))
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value), value._version, tuple(value.shape), str(value.dtype), str(value.device))
        if isinstance(value, torch.nn.Module):
            state = [(id(t), t._version) for t in _module_tensors(value)]
            return ("nn.Module", id(value), value.training, tuple(state))
    return None


def _module_tensors(module: Any) -> List[Any]:
    tensors = [p for p in module.parameters()]
    tensors += [b for b in module.buffers()]
    return tensors


def _digest_or_identity(value: Any) -> Hashable:
    import cloudpickle

    try:
        payload = cloudpickle.dumps(_without_globals(value) if _is_notebook_function(value) else value)
    except Exception:
        return ("unpicklable", id(value))
    return ("pickle", hashlib.blake2b(payload, digest_size=16).digest())


def _is_notebook_function(value: Any) -> bool:
    return isinstance(value, types.FunctionType) and getattr(value, "__module__", None) == "__main__"


def _without_globals(function: types.FunctionType) -> types.FunctionType:
    """A copy of a notebook function with empty globals: its globals travel on their own."""
    copy = types.FunctionType(function.__code__, {"__name__": "__main__"}, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__doc__ = function.__doc__
    copy.__dict__.update(function.__dict__)
    return copy
