"""Settings of the 0MQ input (:class:`ZmqInputConfig`), how 0MQ addresses and publisher
prefixes are spelled and the counters both keep (:class:`LockedCounters`), shared by
:mod:`xasflow.adapters.zmq_bus`'s source and :mod:`xasflow.adapters.zmq_publisher`.

Kept apart from the receive thread so that configuration code (``xasflow.daemon.config``)
reads the settings without the source's machinery.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from xasflow.adapters.wire import FORMATS

__all__ = [
    "OVERFLOW_POLICIES",
    "LockedCounters",
    "ZmqInputConfig",
    "check_prefix",
    "normalize_address",
]

OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop_newest", "drop_oldest")


def normalize_address(address: str) -> str:
    """Add ``tcp://`` to a bare ``host:port`` (bluesky accepts both spellings)."""
    return address if "://" in address else f"tcp://{address}"


def check_prefix(prefix: bytes) -> None:
    """Refuse a publisher prefix that is not bytes or holds the frame's separator (b" ")."""
    if not isinstance(prefix, bytes) or b" " in prefix:
        raise ValueError(f"prefix must be bytes without b' ', got {prefix!r}")


@dataclass(frozen=True)
class ZmqInputConfig:
    """Settings of one SUB input; ``address`` is the proxy's *out* side (bluesky: 5578)."""

    address: str = "tcp://127.0.0.1:5578"
    prefix: bytes = b""  # b"" accepts every publisher, like RemoteDispatcher
    rcvhwm: int = 100_000  # messages 0MQ may buffer in our SUB socket
    queue_size: int = 10_000  # decoded documents waiting for the consumer
    overflow: str = "block"  # one of OVERFLOW_POLICIES
    formats: tuple[str, ...] = FORMATS  # body formats accepted (drop "pickle" to refuse it)
    max_message_bytes: int = -1  # ZMQ_MAXMSGSIZE; -1 = no limit
    poll_interval_s: float = 0.05  # upper bound on how long close() waits for the thread
    # Publisher prefixes whose messages are dropped before decoding (counted as "ignored"),
    # e.g. one's own output when subscribed to everything; each non-empty, not ``prefix``.
    ignore_prefixes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_prefix(self.prefix)
        if isinstance(self.ignore_prefixes, bytes | str):
            raise ValueError("ignore_prefixes must be a tuple of bytes prefixes")
        object.__setattr__(self, "ignore_prefixes", tuple(self.ignore_prefixes))
        for p in self.ignore_prefixes:
            check_prefix(p)
            if not p:
                raise ValueError("ignore_prefixes entries must be non-empty")
            if p == self.prefix:
                raise ValueError(f"prefix {p!r} is both subscribed to and ignored")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if self.queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if self.rcvhwm < 0:
            raise ValueError("rcvhwm must be >= 0 (0 = unlimited)")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")

    @property
    def topic(self) -> bytes:
        """0MQ SUBSCRIBE filter: ``prefix + b" "`` (exact prefix match), or b"" for all."""
        return self.prefix + b" " if self.prefix else b""

    @property
    def ignored_topics(self) -> tuple[bytes, ...]:
        """Frame starts that mark an ignored message: ``p + b" "`` per ignored prefix."""
        return tuple(p + b" " for p in self.ignore_prefixes)


class LockedCounters:
    """A lock-protected dict of integer counters (the source's and the publisher's)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)

    def inc(self, name: str, n: int = 1) -> None:
        self.add({name: n})

    def add(self, counts: dict[str, int]) -> None:
        """Several counters at once (one lock: the receive thread counts each message)."""
        with self._lock:
            values = self._values
            for name, n in counts.items():
                values[name] = values.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
