"""0MQ document output, wire-compatible with bluesky's ``Publisher``: :class:`ZmqDocumentPublisher`
(also importable from :mod:`xasflow.adapters.zmq_bus`, beside the source it feeds in tests).
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from xasflow.adapters.wire import FORMATS, encode_message
from xasflow.adapters.zmq_config import LockedCounters, check_prefix, normalize_address

__all__ = ["ZmqDocumentPublisher"]


class ZmqDocumentPublisher:
    """Publish documents in bluesky's 0MQ wire format (readable by ``RemoteDispatcher``).

    Connect to a proxy's *in* side (default), or ``bind=True`` to be the PUB server.
    Thread-safe. Like any PUB socket it drops messages for subscribers that have not joined
    yet or whose high-water mark is reached.
    """

    def __init__(
        self,
        address: str,
        *,
        prefix: bytes = b"",
        fmt: str = "pickle",
        bind: bool = False,
        sndhwm: int = 100_000,
        linger_ms: int = 1000,
        context: zmq.Context | None = None,
    ) -> None:
        check_prefix(prefix)
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        self.prefix = prefix
        self.fmt = fmt
        self._lock = threading.Lock()
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._counters = LockedCounters(("sent", "bytes_sent"))
        try:
            self._socket.setsockopt(zmq.SNDHWM, sndhwm)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            addr = normalize_address(address)
            if bind:
                self._socket.bind(addr)
            else:
                self._socket.connect(addr)
            self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or addr
        except BaseException:
            self.close()
            raise

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Encode and send one document (RunEngine-callback signature)."""
        message = encode_message(name, doc, self.prefix, self.fmt)
        with self._lock:
            if self._socket.closed:
                raise RuntimeError("publisher is closed")
            self._socket.send(message)
        self._counters.inc("sent")
        self._counters.inc("bytes_sent", len(message))

    def send_raw(self, payload: bytes | list[bytes]) -> None:
        """Send pre-framed bytes unchanged (tests, relaying)."""
        with self._lock:
            if isinstance(payload, list):
                self._socket.send_multipart(payload)
            else:
                self._socket.send(payload)

    def stats(self) -> dict[str, int]:
        """Counters: ``sent`` and ``bytes_sent``."""
        return self._counters.snapshot()

    def close(self) -> None:
        """Close the socket (waiting up to ``linger_ms`` to flush) and an owned context."""
        with self._lock:
            if not self._socket.closed:
                self._socket.close()
            if self._own_context and not self._context.closed:
                self._context.term()

    def __enter__(self) -> ZmqDocumentPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
