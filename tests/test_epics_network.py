"""Who serves a prefix (:mod:`xasflow.adapters.epics_network`): a search answered with another
search's id, and a second IOC on the same port and prefix refused, on loopback only."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("caproto")

from helpers import free_port

from xasflow.adapters.epics_ioc import XasIoc


def _searched_at(reply: Callable[[bytes], bytes]) -> tuple[str | None, int]:
    """``served_by``'s answer for a name nobody serves, searched at a loopback UDP socket
    that sends ``reply(datagram)`` back for each datagram it gets; and how many it got."""
    import socket

    from xasflow.adapters.epics_network import served_by

    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    answered: list[int] = []

    def answer() -> None:
        peer.settimeout(0.1)
        while not stop.is_set():
            try:
                data, address = peer.recvfrom(4096)
            except OSError:
                continue
            peer.sendto(reply(data), address)
            answered.append(1)

    stop = threading.Event()
    thread = threading.Thread(target=answer)
    thread.start()
    try:
        return served_by("NOBODY:BUNDLE_ID", "127.0.0.1", peer.getsockname()[1], 0.5), len(answered)
    finally:
        stop.set()
        thread.join(5)
        peer.close()


def test_an_answer_to_another_search_is_not_taken_for_this_name() -> None:
    """served_by takes only an answer carrying its own search's id: a server that answers
    every search with the id of an earlier one (a late reply to another name's search,
    reaching a socket that got that search's source port again) does not make the name
    served. Before, every search used id 1, so such a reply named the running IOC as the
    server of a prefix it does not serve, and a second IOC refused to start (seen once in
    the full suite: "TST:OTHER:BUNDLE_ID is already served by" the TST:XAS: IOC)."""
    import caproto as ca

    stale = ca.Broadcaster(our_role=ca.SERVER).send(  # the port does not matter here
        ca.VersionResponse(ca.DEFAULT_PROTOCOL_VERSION),
        ca.SearchResponse(5064, "127.0.0.1", 1, ca.DEFAULT_PROTOCOL_VERSION),
    )
    found, answered = _searched_at(lambda _: stale)
    assert answered  # the searches reached it and were answered
    assert found is None


def test_its_own_search_coming_back_is_not_an_answer() -> None:
    """A search that comes back as it went (the target port was free, and the kernel gave
    it to another of the search's own sockets; here a socket that sends back what it gets)
    is no server: read as a client's reply, the request's flag is the 'port' and its id the
    'address'. Before, it named one (seen once in the full suite: "TST:XAS:BUNDLE_ID is
    already served by 44.23.100.13:5", 5 being CA's DONT_REPLY flag), and the IOC refused
    to start."""
    found, echoed = _searched_at(lambda data: data)
    assert echoed  # the searches came back
    assert found is None


def test_a_second_ioc_with_the_same_prefix_is_refused(ioc_env: dict[str, Any]) -> None:
    """The running IOC answers the search for its own PVs; a second IOC on the same port and
    prefix refuses to start (clients would read either), one with another prefix starts."""
    from xasflow.adapters.epics_network import served_by

    ioc, port = ioc_env["ioc"], ioc_env["port"]
    found = served_by(ioc.pv("bundle_id"), "127.0.0.1", port)
    assert found is not None and found.endswith(f":{ioc.tcp_port}")
    assert served_by("NOBODY:BUNDLE_ID", "127.0.0.1", port) is None
    twin = XasIoc("TST:XAS:", host="127.0.0.1", port=port, beacon_port=free_port())
    with pytest.raises(RuntimeError, match=r"TST:XAS:BUNDLE_ID is already served by .*TST:XAS:"):
        twin.start()
    assert not twin.running
    other = XasIoc("TST:OTHER:", host="127.0.0.1", port=port, beacon_port=free_port()).start()
    try:
        assert other.running
        # two servers now share the UDP port, and the kernel hands each unicast search to one
        # of them: the search still finds either prefix every time (it goes out from many
        # source ports)
        for _ in range(5):
            assert served_by(ioc.pv("bundle_id"), "127.0.0.1", port) is not None
            assert served_by(other.pv("bundle_id"), "127.0.0.1", port) is not None
    finally:
        other.stop()
