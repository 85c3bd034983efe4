"""Every ``init_process_group`` of a rank on the launcher's store meets in a namespace of its own.

The launcher hosts one ``TCPStore`` for the whole job (``rendezvous.py``) and its ranks connect to it
as clients (``TORCHELASTIC_USE_AGENT_STORE=True``). A rank that destroys the default group and
creates a new one would join the same store under the same keys: torch numbers groups from 0 again
after ``destroy_process_group()``, and gloo's address keys of the previous group are still there, so
the first rank to arrive reads its peer's *old* address and connects into a dead group (a hang).

In a rank whose environment carries :data:`HOSTED_STORE_VARIABLE` (our launchers, and
``notebook-fabric run`` for its torchrun ranks, which share the agent's store the same way), :func:`install`
replaces torch's ``env://`` rendezvous with one that counts, per rank and in the store, how many groups this rank
has joined, and hands torch the store under the prefix of that round
(``notebook_fabric/round/<n>/``). Ranks that re-create their group the same number of times meet
in a fresh namespace each time. Before returning, every rank waits (one blocking wait in the
store) until all ``world_size`` ranks reached its round: one that waits :data:`STALL_AFTER_SECONDS` says so on stderr (who is missing and
how many rounds each rank has joined), and once the rendezvous timeout passes it raises instead of
hanging in gloo's connect.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, List, Optional, Tuple

from torch.distributed import DistStoreError, PrefixStore, Store, TCPStore

from ..live.notices import write_notice

#: set (to "1") by the launchers that host the job's store; a rank with it set installs the handler
HOSTED_STORE_VARIABLE = "NOTEBOOK_FABRIC_HOSTED_STORE"
#: seconds a rank waits for the others in one rendezvous before it reports the wait
STALL_AFTER_SECONDS = float(os.environ.get("NOTEBOOK_FABRIC_RENDEZVOUS_STALL_AFTER", "30"))
_COMPLETE = "complete"  # the key the last rank of a round sets
_PREFIX = "notebook_fabric/round"  # under torchrun, per restart: see _prefix()


class RendezvousStalledError(RuntimeError):
    """The ranks did not all reach one rendezvous round within its timeout."""


def install() -> bool:
    """Use the round-counting ``env://`` handler in this process when the launcher hosts the store.

    Idempotent; ``False`` (nothing changed) outside such a launcher. torch offers no public way to
    replace a registered scheme, so the handler table of ``torch.distributed.rendezvous`` is edited.
    """
    if os.environ.get(HOSTED_STORE_VARIABLE) != "1":
        return False
    import importlib

    global _TORCH_ENV_HANDLER
    rendezvous_module = importlib.import_module("torch.distributed.rendezvous")
    handlers = rendezvous_module._rendezvous_handlers  # noqa: SLF001 - see the docstring
    if handlers.get("env") is not _round_rendezvous_handler:
        _TORCH_ENV_HANDLER = handlers.get("env")
        handlers["env"] = _round_rendezvous_handler
    return True


_TORCH_ENV_HANDLER: Any = None


def _round_rendezvous_handler(url: str, timeout: timedelta = timedelta(minutes=30), **_: Any
                              ) -> Iterator[Tuple[Store, int, int]]:
    """torch's ``env://`` handler (the same variables and query), with one namespace per round.

    Only where the ranks are clients of a store that outlives the groups (``TORCHELASTIC_USE_AGENT_STORE``,
    as our launchers and torchrun set it); otherwise rank 0 hosts a fresh store per group: torch's handler.
    """
    from urllib.parse import parse_qs, urlparse

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and _TORCH_ENV_HANDLER is not None:
        yield from _TORCH_ENV_HANDLER(url, timeout=timeout, **_)
        return

    query = {key: values[-1] for key, values in parse_qs(urlparse(url).query).items()}
    rank = int(query.get("rank", _required("RANK")))
    world_size = int(query.get("world_size", _required("WORLD_SIZE")))
    address, port = _required("MASTER_ADDR"), int(_required("MASTER_PORT"))
    def connect() -> TCPStore:
        return TCPStore(address, port, world_size=world_size, is_master=False, timeout=timeout)

    client = connect()
    round_number = client.add(f"{_prefix()}/joined/{rank}", 1)
    namespace = f"{_prefix()}/{round_number}/"
    if client.add(f"{namespace}arrived", 1) == world_size:  # the last rank in opens the round for all
        client.set(f"{namespace}{_COMPLETE}", "1")
    client = wait_for_round(client, namespace, round_number, rank, world_size, timeout, reconnect=connect)
    yield PrefixStore(namespace, client), rank, world_size
    raise RuntimeError("Unable to perform re-rendezvous using env:// method")


def wait_for_round(store: Store, namespace: str, round_number: int, rank: int, world_size: int,
                   timeout: timedelta, stall_after: float = -1.0,
                   reconnect: Optional[Callable[[], Store]] = None) -> Store:
    """Return once ``world_size`` ranks arrived in ``namespace`` (the last one sets its ``complete``
    key); report a stall after ``stall_after`` seconds, raise at ``timeout``. Returns the store to go
    on with.

    The wait is one blocking ``wait`` in the store's server, not a poll: at 8 ranks on 2 cores the
    early ranks' polls (every 0.5 ms) cost more CPU than the launch itself (issue 19). A wait that
    times out leaves its late answer on the connection, so after one the rank goes on with a fresh
    client (``reconnect()``).
    """
    stall_after = STALL_AFTER_SECONDS if stall_after < 0 else stall_after
    key = f"{namespace}{_COMPLETE}"
    start = time.monotonic()
    reported = False
    while True:
        waited = time.monotonic() - start
        remaining = timeout.total_seconds() - waited
        if remaining <= 0:
            raise RendezvousStalledError(
                f"init_process_group did not complete: {describe_round(store, round_number, rank, world_size)}"
                f" Waited {waited:.0f} s (the group's timeout). Every rank must create the process group"
                " the same number of times."
            )
        slice_seconds = remaining if reported else max(min(remaining, stall_after - waited), 0.001)
        try:
            store.wait([key], timedelta(seconds=slice_seconds))
            return store
        except DistStoreError:  # this slice timed out (a lost server raises DistNetworkError, and ends the rank)
            if reconnect is not None:
                store = reconnect()
        waited = time.monotonic() - start
        if not reported and waited >= stall_after and waited < timeout.total_seconds():
            reported = True
            write_notice([f"stall: {describe_round(store, round_number, rank, world_size)}"
                          f" (waiting {waited:.0f} s in init_process_group)"], level="warning")


def describe_round(store: Store, round_number: int, rank: int, world_size: int) -> str:
    """``"rank 0 waits in rendezvous round 2 for rank 1 (rank 1 has joined 1 round)."``"""
    joined = _rounds_joined(store, world_size)
    missing = [other for other, count in enumerate(joined) if count < round_number]
    behind = ", ".join(f"rank {other} has joined {joined[other]} round{'s' if joined[other] != 1 else ''}"
                       for other in missing)
    who = f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}" if missing else "the other ranks"
    return f"rank {rank} waits in rendezvous round {round_number} for {who}" + (f" ({behind})." if behind else ".")


def _rounds_joined(store: Store, world_size: int) -> List[int]:
    return [store.add(f"{_prefix()}/joined/{other}", 0) for other in range(world_size)]


def _prefix() -> str:
    """The keys of this attempt (torchrun restarts every rank together and counts the restarts)."""
    return f"{_PREFIX}/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"env:// rendezvous: environment variable {name} expected, but not set")
    return value
