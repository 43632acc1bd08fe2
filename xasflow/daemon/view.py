"""The narrow, read-only view of a running daemon that the web parts (``/metrics``,
``/health``, the dashboard) get instead of the daemon object.

:class:`~xasflow.daemon.status.DaemonStatus` (a daemon's ``view``) satisfies
:class:`DaemonView`; tests may pass any object with these members. Every member is safe to
call from another thread.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from xasflow.daemon.counters import Counters

__all__ = ["DaemonView", "StatsReading"]


class StatsReading(NamedTuple):
    """One read of the input's and the store's stats, shared by everything one report
    (``/health``, a ``/metrics`` scrape, a processing tick) says about them."""

    input: dict[str, int]
    store: dict[str, int]


class DaemonView(Protocol):
    """What HTTP and the dashboard may read: counters, adapter statistics, health."""

    @property
    def counters(self) -> Counters:
        """The outcome counters (thread-safe)."""
        ...

    @property
    def ready(self) -> bool:
        """True between a successful start and stop."""
        ...

    @property
    def uptime(self) -> float:
        """Seconds since start."""
        ...

    @property
    def echo_dropped(self) -> int:
        """Own analysis messages dropped at the input."""
        ...

    @property
    def internal_errors(self) -> int:
        """Unexpected errors (bugs): documents and batches the processing loop dropped, runs
        whose start or stop the pipeline failed on."""
        ...

    def last_turn_age(self) -> float | None:
        """Seconds since the processing loop's last pass (None before it is built)."""
        ...

    def last_document_age(self) -> float | None:
        """Seconds since the input last decoded a document (None before its first)."""
        ...

    def health(self) -> dict[str, Any]:
        """Readiness, counters, models and adapter state, JSON-ready."""
        ...

    def sync_stats(self) -> None:
        """Fold adapter statistics into the counters (before a scrape)."""
        ...

    def read_stats(self) -> StatsReading:
        """:meth:`sync_stats`, returning the input's and the store's stats it read."""
        ...

    def input_stats(self) -> dict[str, int]:
        """The input's counters and queue depth."""
        ...

    def output_stats(self) -> dict[str, int]:
        """The publisher's counters."""
        ...

    def store_stats(self) -> dict[str, int]:
        """The store's counters (empty when storage is off)."""
        ...

    def models_refused_now(self) -> dict[str, str]:
        """Bundle directories refused now, with their reason code."""
        ...
