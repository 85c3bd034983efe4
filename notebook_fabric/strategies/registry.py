"""Strategy names -> a class plus the arguments to build it with."""
from __future__ import annotations

from typing import Any, Optional

from .base import Strategy


class StrategyRegistry:
    """A mapping of strategy names to classes and their init arguments.

    >>> registry = StrategyRegistry()
    >>> registry.register("ddp_find_unused", DDPStrategy, find_unused_parameters=True)  # doctest: +SKIP
    >>> registry.create("ddp_find_unused")  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}

    def register(
        self,
        name: str,
        strategy_class: Optional[type] = None,
        description: Optional[str] = None,
        override: bool = False,
        **init_params: Any,
    ) -> Any:
        """Make ``Fabric(strategy=name)`` build ``strategy_class(**init_params)``.

        Without ``strategy_class`` it is a class decorator, as in Lightning::

            @STRATEGY_REGISTRY.register("quiet_ddp", description="DDP, no unused-parameter search")
            class QuietDDP(DDPStrategy): ...
        """
        if strategy_class is None:
            def decorate(cls: type) -> type:
                self.register(name, cls, description=description, override=override, **init_params)
                return cls

            return decorate
        if not isinstance(name, str) or not name:
            raise ValueError(f"A strategy name must be a non-empty string, got {name!r}")
        if not (isinstance(strategy_class, type) and issubclass(strategy_class, Strategy)):
            raise TypeError(f"{strategy_class!r} is not a Strategy subclass")
        if name in self._entries and not override:
            raise ValueError(f"A strategy named {name!r} is already registered; pass override=True to replace it")
        self._entries[name] = {
            "strategy": strategy_class,
            "description": description or (strategy_class.__doc__ or "").strip().split("\n")[0],
            "init_params": init_params,
        }
        return strategy_class

    def get(self, name: str, default: Optional[Any] = None) -> Any:
        """The class registered under ``name`` (``default`` when given and ``name`` is unknown).

        Lightning's ``get`` returns a new instance instead: use :meth:`create` for that."""
        if default is not None and name not in self._entries:
            return default
        return self._entry(name)["strategy"]

    def get_init_params(self, name: str) -> dict[str, Any]:
        return dict(self._entry(name)["init_params"])

    def get_description(self, name: str) -> str:
        return self._entry(name)["description"]

    def create(self, name: str, **overrides: Any) -> Strategy:
        """A new instance of the strategy registered under ``name``."""
        entry = self._entry(name)
        return entry["strategy"](**{**entry["init_params"], **overrides})

    def available_strategies(self) -> list[str]:
        return list(self._entries)

    def remove(self, name: str) -> None:
        self._entry(name)
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._entries:
            raise KeyError(f"No strategy named {name!r}. Registered: {sorted(self._entries)}")
        return self._entries[name]


STRATEGY_REGISTRY = StrategyRegistry()
