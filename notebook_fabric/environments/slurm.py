"""Ranks started by SLURM's ``srun``: one task per rank, the job shape in ``SLURM_*`` variables."""
from __future__ import annotations

import os
import re
from typing import Optional

from ._variables import check_rank, first_set, port_from_job_id, read_int, read_port, read_str
from .scheduled import SchedulerEnvironment

_WHO = "SLURMEnvironment"
_HINT = (
    "srun sets it for every task: start one task per device with `srun python train.py` inside"
    " the allocation (#SBATCH --ntasks-per-node=<devices>), or pass another ClusterEnvironment"
    " in Fabric(plugins=[...])."
)
#: job names SLURM gives an interactive shell (``srun --pty bash``, ``salloc``): not a multi-rank job
INTERACTIVE_JOB_NAMES = ("bash", "interactive")
_NODE_LIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
_TASKS_PER_NODE_VARIABLES = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def parse_node_list(text: str) -> list[str]:
    """Expand a SLURM host list into host names, in order.

    ``"node[001-004,007]"`` -> ``node001 .. node004, node007`` (zero padding kept),
    ``"a[1-2],b3"`` -> ``a1, a2, b3``, ``"r[1-2]-n[1-2]"`` -> ``r1-n1, r1-n2, r2-n1, r2-n2``.
    Raises ``ValueError`` on unbalanced brackets, descending ranges or an empty list.
    """
    hosts = [host for item in _split_top_level(text) for host in _expand(item, text)]
    if not hosts:
        raise ValueError(f"SLURM node list {text!r} names no hosts.")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside ``[...]``."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {text!r} has unbalanced or nested brackets.")
    if depth != 0:
        raise ValueError(f"SLURM node list {text!r} has an unclosed '['.")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand(item: str, whole: str) -> list[str]:
    """Expand every ``[...]`` group of one host pattern (the cartesian product, left to right)."""
    opening = item.find("[")
    if opening == -1:
        return [item]
    closing = item.find("]", opening)
    prefix, group, rest = item[:opening], item[opening + 1 : closing], item[closing + 1 :]
    tails = _expand(rest, whole)
    return [prefix + value + tail for value in _expand_group(group, whole) for tail in tails]


def _expand_group(group: str, whole: str) -> list[str]:
    """``"001-003,7"`` -> ``["001", "002", "003", "7"]``; the padding is the width of the lower bound."""
    values: list[str] = []
    for part in group.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"SLURM node list {whole!r}: {part!r} inside [...] is not a number or a range.")
        low, high = match.group(1), match.group(2)
        if high is None:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"SLURM node list {whole!r}: range {part!r} runs backwards.")
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


def parse_tasks_per_node(text: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE``: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r}: {part!r} is not 'N' or 'N(xM)'.")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


class SLURMEnvironment(SchedulerEnvironment):
    """The job shape SLURM exported to this task.

    World size ``SLURM_NTASKS``, rank ``SLURM_PROCID``, local rank ``SLURM_LOCALID``, node rank
    ``SLURM_NODEID``; the main address is the first host of the node list (``MASTER_ADDR``
    overrides it) and the main port comes from ``MASTER_PORT`` or, when unset, from the job id,
    so every node derives the same one. Values are read once, when constructed.

    Interactive shells (``srun --pty bash``, ``salloc``; job name ``bash`` or ``interactive``) are
    not detected as a multi-rank job, so notebook-fabric starts the ranks itself there. Pass
    ``Fabric(plugins=[SLURMEnvironment()])`` to use SLURM's ranks anyway.
    """

    def __init__(self) -> None:
        self._world_size = read_int(["SLURM_NTASKS"], _WHO, _HINT, minimum=1)
        self._global_rank = read_int(["SLURM_PROCID"], _WHO, _HINT)
        check_rank("SLURM_PROCID", self._global_rank, "SLURM_NTASKS", self._world_size)
        self._local_rank = read_int(["SLURM_LOCALID"], _WHO, _HINT)
        self._node_rank = read_int(["SLURM_NODEID"], _WHO, _HINT)
        self._node_list_variable = first_set(_NODE_LIST_VARIABLES) or _NODE_LIST_VARIABLES[1]
        self._hosts = parse_node_list(read_str(_NODE_LIST_VARIABLES, _WHO, _HINT))
        check_rank("SLURM_NODEID", self._node_rank, f"the host count of {self._node_list_variable}", len(self._hosts))
        self._local_world_size = self._read_local_world_size()
        if self._local_world_size is not None:
            check_rank("SLURM_LOCALID", self._local_rank, "this node's SLURM_TASKS_PER_NODE", self._local_world_size)
        port = read_port("MASTER_PORT")
        if port is None:
            port = port_from_job_id(read_str(["SLURM_JOB_ID", "SLURM_JOBID"], _WHO, _HINT))
        self._main_port = port

    def _read_local_world_size(self) -> Optional[int]:
        name = first_set(_TASKS_PER_NODE_VARIABLES)
        if name is None:
            return None
        counts = parse_tasks_per_node(os.environ[name])
        return counts[self._node_rank] if self._node_rank < len(counts) else None

    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", self._hosts[0])

    @property
    def main_port(self) -> int:
        return self._main_port

    @staticmethod
    def detect() -> bool:
        """True in a SLURM task (``SLURM_NTASKS`` set) that is not an interactive shell."""
        return "SLURM_NTASKS" in os.environ and not SLURMEnvironment.is_interactive()

    @staticmethod
    def is_interactive() -> bool:
        """Whether this is an interactive ``srun``/``salloc`` shell rather than a batch job's task."""
        return os.environ.get("SLURM_JOB_NAME", "") in INTERACTIVE_JOB_NAMES

    @property
    def hosts(self) -> list[str]:
        """The job's hosts, expanded from the node list."""
        return list(self._hosts)

    def local_world_size(self) -> int:
        """Tasks on this node (``SLURM_TASKS_PER_NODE``; else the tasks spread evenly over the hosts)."""
        if self._local_world_size is not None:
            return self._local_world_size
        return max(1, self._world_size // len(self._hosts))

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        """``ValueError`` when Fabric's devices/num_nodes differ from what the SLURM job allocated."""
        if num_nodes != len(self._hosts):
            raise ValueError(
                f"Fabric(num_nodes={num_nodes}) but the SLURM job runs on {len(self._hosts)} node(s)"
                f" ({self._node_list_variable}={os.environ.get(self._node_list_variable)!r})."
                f" Set num_nodes={len(self._hosts)} or request #SBATCH --nodes={num_nodes}."
            )
        per_node = self._local_world_size
        if per_node is not None and per_node != num_devices:
            raise ValueError(
                f"Fabric(devices={num_devices}) but SLURM started {per_node} task(s) on this node."
                f" Request #SBATCH --ntasks-per-node={num_devices}, or set devices={per_node}."
            )
        if num_devices * num_nodes != self._world_size:
            raise ValueError(
                f"Fabric(devices={num_devices}, num_nodes={num_nodes}) asks for {num_devices * num_nodes}"
                f" ranks but SLURM_NTASKS={self._world_size}. Request"
                f" #SBATCH --ntasks-per-node={num_devices} --nodes={num_nodes}."
            )

