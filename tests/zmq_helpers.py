"""What the 0MQ input tests share: bluesky's Proxy in a subprocess, a started source, a real
bluesky Publisher, the slow-joiner sync (probes, then a fence), collecting the next documents,
and the change of a source's counter."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from xasflow.adapters.zmq_bus import ZmqDocumentSource, ZmqInputConfig

DEADLINE_S = 15.0

PROXY_SCRIPT = """
from bluesky.callbacks.zmq import Proxy
proxy = Proxy("tcp://127.0.0.1", "tcp://127.0.0.1")
print(proxy.in_port, proxy.out_port, flush=True)
proxy.start()
"""


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("subprocess printed nothing")
    return proc.stdout.readline()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def bluesky_proxy() -> Iterator[tuple[str, str]]:
    """A real bluesky 0MQ Proxy: yields (address publishers connect to, address to subscribe)."""
    proc = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        in_address, out_address = _read_line(proc, DEADLINE_S).split()
        yield in_address, out_address
    finally:
        _stop(proc)
        assert proc.stdout is not None
        proc.stdout.close()


def start_source(closing: Callable[[Any], Any], **cfg: Any) -> ZmqDocumentSource:
    """Create, register and start a source."""
    src = closing(ZmqDocumentSource(ZmqInputConfig(**cfg)))
    src.start()
    assert src.ready.is_set()
    return src


def bluesky_publisher(closing: Callable[[Any], Any], address: str, **kw: Any) -> Any:
    """A real ``bluesky.callbacks.zmq.Publisher`` registered for teardown."""
    from bluesky.callbacks.zmq import Publisher

    return closing(Publisher(address, **kw))


def sync(source: ZmqDocumentSource, send: Callable[[str, dict[str, Any]], Any], **tag: Any) -> None:
    """Publish probes until one arrives, then a fence; return once the fence is consumed."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + DEADLINE_S
    i = 0
    while True:
        assert time.monotonic() < deadline, "no probe arrived: subscription never propagated"
        send("event", {"uid": f"probe-{token}-{i}", "probe": token, **tag})
        i += 1
        item = source.get(timeout=0.05)
        if item is not None and item[1].get("probe") == token:
            break
    send("event", {"uid": f"fence-{token}", "probe": token, "fence": True, **tag})
    while True:
        item = source.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, "fence did not arrive"
        if item[1].get("probe") == token and item[1].get("fence"):
            return


def collect(source: ZmqDocumentSource, n: int) -> list[tuple[str, dict[str, Any]]]:
    """Exactly the next ``n`` documents (skipping nothing)."""
    out = []
    deadline = time.monotonic() + DEADLINE_S
    while len(out) < n:
        item = source.get(timeout=max(0.0, deadline - time.monotonic()))
        assert item is not None, f"only {len(out)} of {n} documents arrived"
        out.append(item)
    return out


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after[key] - before[key]
