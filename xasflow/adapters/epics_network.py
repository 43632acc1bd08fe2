"""Channel Access on the network, for the daemon's IOC: whether a server already answers for
a PV name (:func:`served_by`, asked before the daemon serves its prefix), and the caproto
server context with the IOC's port and its beacons sent only where configured (never to the
broadcast addresses caproto would pick from the environment).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

__all__ = ["ServerContext", "served_by"]

#: Searches sent from this many source ports: caproto's servers share the CA port with
#: SO_REUSEPORT, and Linux hands each unicast datagram to one of them by a hash of its source,
#: so one search finds one of k servers at random; 16 miss a given one with (1 - 1/k)^16.
_SEARCH_SOCKETS = 16


def served_by(pvname: str, host: str, port: int, timeout: float = 0.25) -> str | None:
    """The address of a Channel Access server that already answers a search for ``pvname``
    on ``host``:``port`` (UDP, this host's address only, never a broadcast), or None.

    Two IOCs serving one prefix make every client warn of duplicate PVs and read whichever
    answers first; the daemon asks before it serves. Best effort: the search goes out from
    :data:`_SEARCH_SOCKETS` source ports (see there), and a server on another host of the
    subnet is not asked.
    """
    import secrets
    import select
    import socket
    import time

    import caproto as ca

    target = "127.0.0.1" if host in ("", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    # a search id of this call's own: a late answer to an earlier search (another name),
    # reaching a socket that got that search's source port again, is not this name's
    cid = secrets.randbelow(2**31 - 1) + 1
    request = ca.Broadcaster(our_role=ca.CLIENT).send(
        ca.VersionRequest(0, ca.DEFAULT_PROTOCOL_VERSION),
        ca.SearchRequest(pvname, cid, ca.DEFAULT_PROTOCOL_VERSION),
    )
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(_SEARCH_SOCKETS)]
    try:
        for sock in socks:
            sock.setblocking(False)
            try:
                sock.sendto(request, (target, int(port)))
            except OSError:  # unreachable, or no such address here
                return None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(socks, [], [], left)
            for sock in ready:
                try:
                    data, address = sock.recvfrom(4096)
                    if data == request:  # our own search back (the kernel gave the free
                        continue  # target port to one of these sockets): no server
                    commands = ca.Broadcaster(our_role=ca.CLIENT).recv(data, address)
                except (OSError, ca.CaprotoError):  # refused, or not Channel Access: read on
                    continue
                for command in commands:
                    if isinstance(command, ca.SearchResponse) and command.cid == cid:
                        ip = command.ip if command.ip not in (None, "", "255.255.255.255") else None
                        return f"{ip or address[0]}:{command.port}"
        return None
    finally:
        for sock in socks:
            sock.close()


class _BeaconSocket:
    """An unconnected UDP socket for beacons: no ICMP 'refused' errors when nobody listens."""

    def __init__(self, address: tuple[str, int]) -> None:
        import socket

        self.address = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.sock.setblocking(False)

    async def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a beacon is best effort
            self.sock.sendto(data, self.address)

    def close(self) -> None:
        self.sock.close()


class ServerContext:
    """Factory for a caproto asyncio server Context with our port and beacon addresses."""

    @staticmethod
    def create(
        pvdb: dict[str, Any],
        host: str,
        port: int,
        beacons: Sequence[tuple[str, int]] | None,
    ) -> Any:
        from caproto.asyncio.server import Context

        class XasContext(Context):
            async def broadcast_beacon_loop(self) -> None:
                """Send beacons only where configured (the env default is broadcast)."""
                if beacons is not None:
                    for _, sock in list(self.beacon_socks.values()):
                        sock.close()
                    self.beacon_socks.clear()
                    for address in beacons:
                        self.beacon_socks[address] = (host, _BeaconSocket(address))
                await super().broadcast_beacon_loop()

        ctx = XasContext(pvdb, interfaces=[host])
        ctx.ca_server_port = int(port)
        return ctx
