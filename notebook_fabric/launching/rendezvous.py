"""A race-free rendezvous: the notebook hosts the ``TCPStore`` on a port the OS assigns.

The store listens on a loopback socket this process bound to port 0 and hands to
``TCPStore(master_listen_fd=...)``, so no other process can take the port between choosing and
binding it, and nothing off this machine can reach it. Ranks get ``MASTER_PORT`` plus
``TORCHELASTIC_USE_AGENT_STORE=True``, which makes ``init_process_group("env://")`` connect
every rank (rank 0 included) as a client (``torch.distributed.rendezvous._create_c10d_store``), and
``NOTEBOOK_FABRIC_HOSTED_STORE=1``, which gives each group a rank creates its own namespace in the
store (``strategies/rendezvous_rounds.py``: a group re-created after ``destroy_process_group()`` must not read
the previous group's keys).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Dict, Optional

import psutil
from torch.distributed import TCPStore

from ..strategies.rendezvous_rounds import HOSTED_STORE_VARIABLE

LOOPBACK = "127.0.0.1"


class RendezvousStore:
    """The rendezvous server of one pool; :meth:`close` releases the port."""

    def __init__(self, timeout: timedelta = timedelta(minutes=5), host: str = LOOPBACK) -> None:
        """``host``: the one address to listen on (ranks on other hosts need the one they reach)."""
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.host = host
        try:
            listening.bind((host, 0))
            listening.listen(256)
            self.port: int = listening.getsockname()[1]
        except BaseException:
            listening.close()
            raise
        #: the descriptor the store listens on (a forked rank closes its inherited copy)
        self.listening_fd: int = listening.fileno()
        # The store owns (and closes) the descriptor from here on.
        self._store: Optional[TCPStore] = TCPStore(
            host, self.port, is_master=True, wait_for_workers=False, timeout=timeout,
            master_listen_fd=listening.detach(),
        )

    def rank_environment(self, rank: int, world_size: int) -> Dict[str, str]:
        """The torchrun-style variables of ``rank`` on this (single) node."""
        env = {
            "MASTER_ADDR": LOOPBACK,
            "MASTER_PORT": str(self.port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "NODE_RANK": "0",
            "GROUP_RANK": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            HOSTED_STORE_VARIABLE: "1",
        }
        if "GLOO_SOCKET_IFNAME" not in os.environ and _has_loopback_interface("lo"):
            # Ranks of one machine talk over loopback: no hostname lookup, nothing exposed.
            env["GLOO_SOCKET_IFNAME"] = "lo"
        return env

    def close(self) -> None:
        """Stop the server (dropping the last reference stops its thread and closes the port)."""
        self._store = None


_LOOPBACK_NAMES: Dict[str, bool] = {}


def _has_loopback_interface(name: str) -> bool:
    if name not in _LOOPBACK_NAMES:
        try:
            addresses = psutil.net_if_addrs().get(name, [])
            _LOOPBACK_NAMES[name] = any(a.address == LOOPBACK for a in addresses)
        except (OSError, psutil.Error):
            _LOOPBACK_NAMES[name] = False
    return _LOOPBACK_NAMES[name]
