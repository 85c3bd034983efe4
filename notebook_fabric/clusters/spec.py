"""``cluster=``: where a pool's ranks run. ``None``/``"local"``: this machine; ``"slurm"`` or
:class:`Slurm`: hosts that Slurm allocates."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple, Union

CLUSTER_CHOICES = ("local", "slurm")


@dataclass(frozen=True)
class Slurm:
    """Ranks on Slurm's hosts. Inside an allocation (``SLURM_JOB_ID`` set, e.g. a Jupyter job of the
    cluster's portal) the ranks are job steps in it and these options are not used; otherwise the
    notebook asks for an allocation with them and holds it for the pool's life.

    ``partition``, ``time`` (``"02:00:00"``), ``account``, ``gpus_per_node``: as for ``salloc``;
    ``sbatch_args``: more ``salloc``/``sbatch`` options (``["--qos=debug"]``). ``interface``: the
    network interface of this machine the nodes reach (default: the one that routes to the first
    node). ``start_timeout``: seconds the allocation may stay pending before the launch gives up
    (quoting Slurm's pending reason) and cancels it.
    """

    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    gpus_per_node: Optional[int] = None
    sbatch_args: Tuple[str, ...] = field(default_factory=tuple)
    interface: Optional[str] = None
    start_timeout: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sbatch_args", tuple(self.sbatch_args))
        for name in ("partition", "time", "account", "interface"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"Slurm({name}=) must be a non-empty string or None, got {value!r}")
        if self.gpus_per_node is not None and (not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0):
            raise ValueError(f"Slurm(gpus_per_node=) must be a non-negative integer, got {self.gpus_per_node!r}")
        if not all(isinstance(a, str) for a in self.sbatch_args):
            raise ValueError(f"Slurm(sbatch_args=) must be strings such as ['--qos=debug'], got {self.sbatch_args!r}")
        if isinstance(self.start_timeout, bool) or not isinstance(self.start_timeout, (int, float)) or self.start_timeout <= 0:
            raise ValueError(f"Slurm(start_timeout=) must be a positive number of seconds, got {self.start_timeout!r}")

    def allocation_options(self) -> Tuple[str, ...]:
        """The ``salloc`` options these settings mean (nodes and tasks come from the launch)."""
        options = []
        for flag, value in (("--partition", self.partition), ("--time", self.time), ("--account", self.account),
                            ("--gpus-per-node", self.gpus_per_node)):
            if value is not None:
                options.append(f"{flag}={value}")
        return tuple(options) + self.sbatch_args


def resolve_cluster(cluster: Union[None, str, Slurm, Any]) -> Optional[Slurm]:
    """``cluster=`` as given -> ``None`` (this machine) or a :class:`Slurm`; ``ValueError`` otherwise."""
    if cluster is None or cluster == "local":
        return None
    if isinstance(cluster, Slurm):
        return cluster
    if isinstance(cluster, str) and cluster.strip().lower() == "slurm":
        return Slurm()
    raise ValueError(f"cluster={cluster!r} is not known: use one of {', '.join(map(repr, CLUSTER_CHOICES))}"
                     " or notebook_fabric.Slurm(partition=..., ...)")
