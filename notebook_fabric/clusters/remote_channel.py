"""The pool's channel for ranks on other hosts: the loopback channel behind a TLS door on one address."""
from __future__ import annotations

from typing import Callable

from ..live.channel import EventListener
from .tls import PoolCertificate, TLSDoor


class TLSChannel(EventListener):
    """An :class:`EventListener` (HMAC challenge, loopback) reached through a :class:`TLSDoor` on ``host``.

    ``address`` is the door's: that is what ranks are given. ``on_closed(rank)`` is called when a
    rank's TLS connection ends (a host that vanished says so no other way)."""

    def __init__(self, host: str, certificate: PoolCertificate, backlog: int = 64,
                 on_closed: Callable[[int], None] = lambda rank: None) -> None:
        super().__init__(backlog=backlog)
        self.loopback_address = self.address
        self.door = TLSDoor(host, self.loopback_address, certificate, on_closed)
        self.address = self.door.address

    def close(self) -> None:
        self.door.close()
        super().close()
