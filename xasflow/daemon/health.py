"""Pieces of the daemon's ``/health`` that read several parts: feedback and operator limits."""

from __future__ import annotations

from typing import Any

from xasflow.daemon.config import DaemonConfig

__all__ = ["feedback_health", "limits_health"]


def feedback_health(config: DaemonConfig, ioc: Any, submitter: Any) -> dict[str, Any]:
    """The IOC's and the queueserver submitter's state (None where disabled); the IOC's
    counts of advice it dropped or cut, which its log says only once per run."""
    return {
        "recommend": config.recommend.enabled,
        "epics": None
        if ioc is None
        else {
            "prefix": ioc.prefix,
            "port": ioc.tcp_port,
            "running": ioc.running,
            "published": ioc.published,
            # advice of a run a later start superseded, not written; advice cut to REGIONS
            "advice_dropped": ioc.advice_dropped,
            "regions_cut": ioc.regions_cut,
        },
        "queueserver": None
        if submitter is None
        else {
            "stats": dict(submitter.stats),
            "deferred_errors": submitter.deferred_errors,
            "last_error": submitter.last_error,
        },
    }


def limits_health(
    config: DaemonConfig, input_stats: dict[str, int], store_stats: dict[str, int], sse: Any
) -> dict[str, dict[str, Any]]:
    """Each operator limit (its config value as ``max``), its fill and what it dropped/refused.

    ``input_queue``: ``input.queue_size`` and ``input.overflow``; ``store_queue``:
    ``storage.max_queue`` (when storage is on); ``sse_clients``: ``http.max_sse_clients``
    (a :class:`~xasflow.daemon.limits.StreamLimit`, when the dashboard is served).
    """
    out: dict[str, dict[str, Any]] = {
        "input_queue": {
            "max": config.input.queue_size,
            "depth": input_stats.get("queue_depth", 0),
            "overflow": config.input.overflow,
            "dropped": input_stats.get("dropped_overflow", 0),
        }
    }
    if store_stats:
        out["store_queue"] = {
            "max": config.storage.max_queue,
            "depth": store_stats.get("queued", 0),
            "dropped": store_stats.get("dropped", 0),
            "full_wait_s": config.store_full_wait(),
            "full_waits": store_stats.get("full_waits", 0),
        }
    if sse is not None:
        out["sse_clients"] = sse.stats()
    return out


def input_health(
    config: DaemonConfig, source: Any, stats: dict[str, int], counters: dict[str, Any], echo: int
) -> dict[str, Any]:
    """The input section: kind, address, decode errors, queue; Kafka's group and lag when used."""
    kafka = None
    if config.input.kind == "kafka" and source is not None:
        kafka = {**source.health(), **counters["kafka"]}
    return {
        "kind": config.input.kind,
        "address": source.address if source else config.input.address,
        "prefix": config.input.prefix,
        "kafka": kafka,
        "last_decode_error": source.last_error if source else None,
        "own_output_dropped": echo,
        **stats,
    }
