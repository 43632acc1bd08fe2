"""What the EPICS tests share (the ``ca_loopback`` and ``ioc_env`` fixtures in conftest): Channel
Access confined to loopback, the daemon's caproto IOC with a client context beside it, torn
down with a check that nothing it started is left behind, and a PV read with its alarm.

The client is confined to 127.0.0.1 (EPICS_CA_AUTO_ADDR_LIST=NO), the IOC sends beacons only
to loopback, and the teardown checks that no caproto-repeater was started and that every
thread the IOC and the client started is gone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from helpers import wait_for


class CaPorts(NamedTuple):
    """The loopback Channel Access ports of one test: the server's and the repeater's."""

    port: int
    repeater: int


def loopback_ca(monkeypatch: pytest.MonkeyPatch, ports: CaPorts) -> CaPorts:
    """Point this process's Channel Access servers and clients at ``ports`` on 127.0.0.1 only
    (no address list from the interfaces, the client's repeater registration on loopback)."""
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(ports.port))
    monkeypatch.setenv("EPICS_CA_REPEATER_PORT", str(ports.repeater))
    import caproto

    # the client registers with a repeater at get_local_address(); keep that on loopback
    monkeypatch.setattr(caproto, "get_local_address", lambda: "127.0.0.1")
    return ports


def child_processes() -> list[tuple[int, str]]:
    """(pid, command line) of this process's child processes (Linux /proc)."""
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(entry.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return out


@contextmanager
def running_ioc(ports: CaPorts) -> Iterator[dict[str, Any]]:
    """A started ``TST:XAS:`` IOC on ``ports`` and a client context (``ioc``, ``ctx``,
    ``port``); on exit both are stopped, and no process and no thread they started may stay."""
    from caproto.threading.client import Context

    from xasflow.adapters.epics_ioc import XasIoc

    threads_before = set(threading.enumerate())
    children_before = {pid for pid, _ in child_processes()}
    ioc = XasIoc("TST:XAS:", host="127.0.0.1", port=ports.port, beacon_port=ports.repeater)
    ioc.start()
    ctx = Context(timeout=5.0)
    try:
        yield {"ioc": ioc, "ctx": ctx, "port": ports.port}
    finally:
        ctx.disconnect()
        ioc.stop()
    spawned = [(pid, cmd) for pid, cmd in child_processes() if pid not in children_before]
    assert not [c for c in spawned if "repeater" in c[1]], spawned
    assert not spawned, f"processes left behind: {spawned}"
    wait_for(
        lambda: not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()],
        timeout=15.0,
        what="IOC and client threads to stop",
    )
    assert not ioc.running


def read_alarm(pv: Any, timeout: float = 5.0) -> tuple[Any, Any, Any]:
    """A caproto client PV's first value (a string decoded), its alarm status and severity."""
    got = pv.read(data_type="time", timeout=timeout)
    value = got.data[0]
    value = value.decode() if isinstance(value, bytes) else value
    return value, got.metadata.status, got.metadata.severity
