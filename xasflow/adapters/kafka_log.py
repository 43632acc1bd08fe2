"""librdkafka's own log, bounded during a broker outage.

A client whose broker is gone logs every failed reconnection at ERROR (``Connect to ...
failed: Connection refused``: about 20 lines a second on loopback, for as long as the outage
lasts). :class:`OutageLog` is what the Kafka clients get as their ``logger`` setting: the
first line at WARNING or above of an outage goes to the log as it is, the next ones are
counted and summed up in one line every :data:`SUMMARY_S` seconds (with the latest), and
once none has come for :data:`QUIET_S` seconds one line says they stopped (the broker
answers again; not after a lone line; the clients :meth:`OutageLog.tick` it: the consumer's
receive loop, the producer on each publish and on the daemon's stats tick, since librdkafka
hands its lines over only when polled). Lines under WARNING go through unchanged. What the outage costs is counted
apart from the log, by the clients' error callbacks (``xasflow_kafka_consumer_errors_total``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["QUIET_S", "RDKAFKA_LOG", "SUMMARY_S", "OutageLog"]

#: Where librdkafka's own log lines go (connection losses and the like).
RDKAFKA_LOG = logging.getLogger("xasflow.kafka.librdkafka")

#: Seconds between two summaries of the error lines held back during an outage.
SUMMARY_S = 60.0
#: Seconds without an error line after which an outage is over. librdkafka retries a lost
#: broker several times a second, but it may hold back an error identical to the last one
#: of the same connection for 30 s (``rd_kafka_broker_fail``), so a shorter quiet would
#: call a lasting outage over (seen in CI: "errors stopped" 3 s into an outage, then
#: "Connection refused (..., 585 identical error(s) suppressed)").
QUIET_S = 35.0


class OutageLog:
    """A ``logger`` for a confluent-kafka client that logs an outage's errors in a bounded
    number of lines; thread-safe (the clients log from whichever thread polls them)."""

    def __init__(
        self,
        target: logging.Logger = RDKAFKA_LOG,
        summary_s: float | None = None,
        quiet_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``summary_s``/``quiet_s``: :data:`SUMMARY_S`/:data:`QUIET_S` when None."""
        self.target = target
        self.summary_s = SUMMARY_S if summary_s is None else float(summary_s)
        self.quiet_s = QUIET_S if quiet_s is None else float(quiet_s)
        self.clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # when the outage's first error line came
        self._last = 0.0  # when its latest error line came
        self._next = 0.0  # when the next summary is due
        self._held = 0  # error lines held back since the last line logged
        self._total = 0  # error lines of this outage
        self._latest = ""  # the latest held back

    def log(self, level: int, msg: str, *args: Any) -> None:
        """What confluent-kafka calls for each librdkafka line (``logger.log`` signature)."""
        if level < logging.WARNING:
            self.target.log(level, msg, *args)
            return
        now = self.clock()
        with self._lock:
            self._tick(now)
            self._last, self._total = now, self._total + 1
            if self._since is None:  # the first of an outage goes out as it is
                self._since, self._next = now, now + self.summary_s
            else:
                self._held += 1
                self._latest = msg % args if args else msg
                if now < self._next:
                    return
                self._next = now + self.summary_s
                msg = (
                    "%d more librdkafka errors in the last %.0f s (%d since the outage began "
                    "%.0f s ago); the latest: %s"
                )
                args = (self._held, self.summary_s, self._total, now - self._since, self._latest)
                self._held = 0
        self.target.log(level, msg, *args)

    def tick(self) -> None:
        """Call now and then (the receive loop, each publish): ends an outage gone quiet."""
        with self._lock:
            self._tick(self.clock())

    def _tick(self, now: float) -> None:
        if self._since is None or now - self._last < self.quiet_s:
            return
        if self._total > 1:  # a lone warning (a setting ignored...) was logged as it is
            self.target.warning(
                "librdkafka errors stopped: %d in %.0f s (%d since the last line), none for %.0f s",
                self._total,
                self._last - self._since,
                self._held,
                now - self._last,
            )
        self._since, self._held, self._total = None, 0, 0
