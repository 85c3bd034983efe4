"""The pool settings a ``%%fabric`` cell asks for, and how they compare with the running pool's.

Settings a cell leaves out are those of the running pool (or the defaults for the first pool), so
``%%fabric`` alone always reuses the pool; a setting given with a different value restarts it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional

DEFAULT_DEVICES = 2


@dataclass(frozen=True)
class PoolSettings:
    """What a pool is built with: the Fabric arguments and the start method."""

    devices: int = DEFAULT_DEVICES
    accelerator: str = "auto"
    strategy: str = "ddp"
    precision: Optional[str] = None
    start_method: Optional[str] = None
    debug: bool = False
    log_dir: Optional[str] = None  # the pool's per-rank log folder (None: a temporary one)
    num_nodes: int = 1  # hosts, each with `devices` ranks (more than one needs a cluster)
    cluster: Optional[str] = None  # None: this machine; "slurm": hosts that Slurm allocates
    partition: Optional[str] = None  # the Slurm partition (cluster="slurm" only)

    def fabric_kwargs(self) -> Dict[str, Any]:
        """The ``Fabric(**kwargs)`` every rank builds."""
        kwargs: Dict[str, Any] = {"accelerator": self.accelerator, "strategy": self.strategy, "devices": self.devices}
        if self.precision is not None:
            kwargs["precision"] = self.precision
        if self.debug:
            kwargs["debug"] = True
        if self.num_nodes != 1:
            kwargs["num_nodes"] = self.num_nodes
        return kwargs

    def merged(self, requested: Dict[str, Any]) -> "PoolSettings":
        """These settings with the ones a cell gave explicitly (``None`` values are left out)."""
        given = {k: v for k, v in requested.items() if v is not None and k in _FIELD_NAMES}
        settings = replace(self, **given)
        if not isinstance(settings.devices, int) or settings.devices < 1:
            raise ValueError(f"--devices must be a positive integer (the number of ranks), got {settings.devices!r}")
        if not isinstance(settings.num_nodes, int) or settings.num_nodes < 1:
            raise ValueError(f"--num-nodes must be a positive integer (the number of hosts), got {settings.num_nodes!r}")
        if settings.num_nodes > 1 and settings.cluster is None:
            raise ValueError(f"--num-nodes {settings.num_nodes} needs hosts from a cluster: add --cluster slurm")
        if settings.partition is not None and settings.cluster is None:
            raise ValueError("--partition is a Slurm option: add --cluster slurm")
        if _ranks_from_torch_xla(settings.strategy):
            raise ValueError(
                f"--strategy {settings.strategy}: %%fabric runs cells on a pool of rank processes it starts and keeps,"
                " but XLA's ranks are started by torch_xla for one function at a time (one process per TPU chip; on"
                " XLA's CPU device, threads of one process). Run it with launch(train, strategy="
                f"{settings.strategy!r}, devices=N) or Fabric(strategy={settings.strategy!r}).launch(train) in a cell;"
                " %%fabric --devices 1 --strategy single_xla runs cells on one XLA device."
            )
        return settings

    def changes_from(self, old: "PoolSettings") -> List[str]:
        """``["devices 2 -> 3", "precision None -> 'bf16-mixed'"]``."""
        return [f"{f.name} {getattr(old, f.name)!r} -> {getattr(self, f.name)!r}"
                for f in fields(self) if getattr(old, f.name) != getattr(self, f.name)]

    def describe(self) -> str:
        """``"2 ranks, accelerator='cpu', strategy='ddp'"`` (the start method is the pool's to tell)."""
        parts = [f"{self.devices} rank{'s' if self.devices != 1 else ''}", f"accelerator={self.accelerator!r}",
                 f"strategy={self.strategy!r}"]
        if self.precision is not None:
            parts.append(f"precision={self.precision!r}")
        if self.debug:
            parts.append("debug=True")
        if self.cluster is not None:
            parts[0] = f"{self.devices * self.num_nodes} rank{'s' if self.devices * self.num_nodes != 1 else ''}"
            parts.append(f"on {self.num_nodes} {self.cluster} host{'s' if self.num_nodes != 1 else ''}"
                         f" ({self.devices} each)" + (f", partition {self.partition!r}" if self.partition else ""))
        return ", ".join(parts)


_FIELD_NAMES = {f.name for f in fields(PoolSettings)}


def _ranks_from_torch_xla(strategy: str) -> bool:
    """Whether ``strategy`` names a strategy whose ranks only torch_xla's launcher can start."""
    from notebook_fabric.strategies import STRATEGY_REGISTRY

    cls = STRATEGY_REGISTRY.get(strategy) if strategy in STRATEGY_REGISTRY else None
    return getattr(cls, "start_method", None) == "xla"


def parse_ranks(text: Optional[str], world_size: int) -> Optional[List[int]]:
    """``"0,2"`` / ``"1-3"`` / ``"all"`` -> sorted ranks (``None`` for every rank); checks the range."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    ranks = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                low, high = (int(p) for p in part.split("-", 1))
                ranks.update(range(low, high + 1))
            else:
                ranks.add(int(part))
        except ValueError:
            raise ValueError(f"cannot read rank list {text!r}: use numbers and ranges, e.g. 0,2 or 1-3") from None
    bad = sorted(r for r in ranks if not 0 <= r < world_size)
    if bad or not ranks:
        raise ValueError(f"ranks {bad or text!r} are not in this pool of {world_size} ranks (0..{world_size - 1})")
    ordered = sorted(ranks)
    return None if len(ordered) == world_size else ordered
