"""Outcome counters shared by the whole daemon, and their Prometheus export.

``Counters`` is plain Python (a lock and dicts), so the science core can count without
depending on prometheus_client; :func:`register_prometheus` exposes the same numbers through
a custom collector at scrape time (:mod:`xasflow.daemon.counters_export`). Every counter
maps 1:1 to a Prometheus metric:

====================================  ==================================================
``spectra_received``                  ``xasflow_spectra_received_total``
``spectra_analysed``                  ``xasflow_spectra_analysed_total``
``out_of_domain``                     ``xasflow_spectra_out_of_domain_total``
``herfd_suspected``                   ``xasflow_spectra_herfd_suspected_total``
``events_lost[cause]``                ``xasflow_events_lost_total{cause}``
``drop_records_forgotten``            ``xasflow_drop_records_forgotten_total``
``superseded_advice``                 ``xasflow_advice_superseded_total``
``rejected[(stage, reason)]``         ``xasflow_spectra_rejected_total{stage, reason}``
``decode_errors[reason]``             ``xasflow_decode_errors_total{reason}``
``runs_opened``                       ``xasflow_runs_opened_total``
``runs_closed[exit_status]``          ``xasflow_runs_closed_total{exit_status}``
``model_swaps``                       ``xasflow_model_swaps_total``
``limit_refused[limit]``              ``xasflow_limit_refused_total{limit}`` (operator limits)
``model_refused[reason]``             ``xasflow_model_refused_total{reason}``
``models[(element, edge)]``           ``xasflow_model_info{element, edge, bundle_id} 1``
latency observations                  ``xasflow_latency_seconds`` (histogram)
``gauges[(name, labels)]``            ``xasflow_<name>{labels}`` (e.g. queue depth)
``kafka["rebalances"]``               ``xasflow_kafka_rebalances_total``
``kafka["commits"]``                  ``xasflow_kafka_commits_total`` (offset commits)
``kafka["commit_failures"]``          ``xasflow_kafka_commit_failures_total``
``kafka["commits_held"]``             ``xasflow_kafka_commits_held_total`` (store refused)
``kafka["consumer_errors"]``          ``xasflow_kafka_consumer_errors_total`` (broker down...)
``kafka_held``                        ``xasflow_kafka_commit_hold`` (1 while held)
``kafka_lag[(topic, partition)]``     ``xasflow_kafka_consumer_lag{topic, partition}``
``queueserver[outcome]``              ``xasflow_queueserver_plans_total{outcome}``
``queueserver_deferred_errors``       ``xasflow_queueserver_deferred_errors_total``
``internal_errors[what]``             ``xasflow_internal_errors_total{what}`` (bugs, see below)
====================================  ==================================================

The seven Kafka metrics are always exported (0, no lag samples, with the 0MQ input). So is
every known loss cause, bundle-refusal reason, decode-error reason, run exit status and
(stage, reason) of a rejection (``Counters(rejections=...)``), from 0: a series that first
appears at 1 never shows in ``increase()``, so the alert rules would miss the first one.

``stage`` is "assembly" (a document or run the assembler rejected) or "analysis" (a
spectrum the pipeline rejected). Every spectrum the pipeline receives is counted once in
``spectra_received`` and then exactly once in ``spectra_analysed`` or in
``rejected[("analysis", reason)]``. The snapshot (``/health``) gives ``spectra_rejected``, all
rejections of both stages, and ``spectra_rejected_by_stage``, each stage's (both from 0), so
``spectra_received == spectra_analysed + spectra_rejected_by_stage["analysis"]``.
``out_of_domain`` counts the analysed spectra whose prediction carries the out-of-domain
flag (a subset of ``spectra_analysed``); ``herfd_suspected`` those of them that look like
undeclared HERFD (a subset of that).
``events_lost`` counts raw events that never reached the analysis, once each, by cause:
``seq_gap`` (missing from a run's sequence or its stop's ``num_events``, except those the
input queue dropped), ``overflow`` (event rows dropped by a full input queue), ``interrupted``
(of a run a killed daemon left open, not stored; again except those the input queue dropped),
``on_close`` (event rows the 0MQ input could not queue under ``block`` once it closed: the
one it held for a full queue, and those still in its socket then that found no room; a Kafka
input's are not lost: uncommitted, they are delivered again).
``drop_records_forgotten`` counts no lost event: rows of ``overflow`` drops whose record the
assembler forgot past its bounds (descriptors, rows held) or gave up when their run's start
did not come within ``analysis.run_timeout_s`` (``RunAssembler.early_drops_forgotten``,
drops of runs not open there); if their run still comes, their holes count as ``seq_gap``
as well, so it bounds how far ``seq_gap`` may count ``overflow`` losses twice.
``superseded_advice`` counts no lost result either: throttled advice (``recommend.interval_s``)
that a newer advice of the same run, due in the same batch, replaced before either was
computed (:mod:`xasflow.daemon.advice`).
``internal_errors`` counts unexpected errors (bugs) by what they cost: ``processing``
(documents and batches the processing loop dropped), ``run_start`` (a raw run's start the
pipeline failed on: its analysis run opens at its first spectrum, without the start's
metadata), ``run_stop`` (a raw run's stop it failed on: its analysis run stops "fail").
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from xasflow.daemon.counters_export import register_prometheus

__all__ = [
    "INTERNAL_ERRORS",
    "KAFKA_COUNTERS",
    "LATENCY_BUCKETS",
    "REJECTION_STAGES",
    "Counters",
    "register_prometheus",
]

#: Where a rejection is counted: the assembler (documents, runs) or the analysis (spectra).
REJECTION_STAGES: tuple[str, ...] = ("assembly", "analysis")

#: What an unexpected error (a bug) cost, each exported from 0 (see the module docstring).
INTERNAL_ERRORS: tuple[str, ...] = ("processing", "run_start", "run_stop")

#: The Kafka input's counters exported as ``xasflow_kafka_<name>_total``.
KAFKA_COUNTERS: tuple[str, ...] = (
    "rebalances",
    "commits",
    "commit_failures",
    "commits_held",
    "consumer_errors",
)

#: Upper bounds (s) of the end-to-end latency histogram buckets (+Inf is implied).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)


class Counters:
    """Thread-safe outcome counters plus a bounded end-to-end latency record."""

    def __init__(
        self, latency_window: int = 10_000, rejections: Iterable[tuple[str, str]] = ()
    ) -> None:
        """``rejections``: the (stage, reason) pairs known to occur, exported from 0."""
        if latency_window < 1:
            raise ValueError("latency_window must be >= 1")
        self.known_rejections = tuple(sorted(set(rejections)))
        self._lock = threading.Lock()
        self.spectra_received = 0
        self.spectra_analysed = 0
        self.out_of_domain = 0
        self.herfd_suspected = 0
        self.events_lost: dict[str, int] = {}
        self.drop_records_forgotten = 0  # overflow rows whose cause may count twice
        self.superseded_advice = 0  # throttled advice replaced by a newer one of its run
        self.rejected: dict[tuple[str, str], int] = {}
        self.decode_errors: dict[str, int] = {}
        self.runs_opened = 0
        self.runs_closed: dict[str, int] = {}
        self.model_swaps = 0
        self.limit_refused: dict[str, int] = {}
        self.model_refused: dict[str, int] = {}
        self.models: dict[tuple[str, str], str] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.kafka: dict[str, int] = dict.fromkeys(KAFKA_COUNTERS, 0)
        self.kafka_lag: dict[tuple[str, str], int] = {}
        self.kafka_held = False  # the Kafka input holds its offset commits
        self.queueserver: dict[str, int] = {}  # the queueserver submitter's stats
        self.queueserver_deferred_errors = 0  # its failed looks at the plans given up
        self.internal_errors: dict[str, int] = dict.fromkeys(INTERNAL_ERRORS, 0)
        # latency: exact cumulative histogram since start, plus the recent window for quantiles
        self._bucket_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._recent: deque[float] = deque(maxlen=latency_window)

    # ------------------------------------------------------------------ counting

    def spectrum_received(self, n: int = 1) -> None:
        """Spectra handed to the pipeline."""
        with self._lock:
            self.spectra_received += n

    def spectrum_analysed(self, n: int = 1) -> None:
        """Spectra that got a prediction."""
        with self._lock:
            self.spectra_analysed += n

    def spectrum_out_of_domain(self, n: int = 1) -> None:
        """Analysed spectra the bundle flagged out of its domain (answers not to trust)."""
        with self._lock:
            self.out_of_domain += n

    def spectrum_herfd_suspected(self, n: int = 1) -> None:
        """Out-of-domain spectra that would be in domain declared HERFD (``herfd_suspected``)."""
        with self._lock:
            self.herfd_suspected += n

    def lost(self, cause: str, n: int = 1) -> None:
        """Raw events that never reached the analysis, by cause (see the module docstring)."""
        if n <= 0:
            return
        with self._lock:
            self.events_lost[cause] = self.events_lost.get(cause, 0) + n

    def sync_lost(self, cause: str, total: int) -> None:
        """Take a cumulative loss total kept elsewhere (e.g. the input queue's overflow count)."""
        with self._lock:
            if total > self.events_lost.get(cause, 0):
                self.events_lost[cause] = int(total)

    def sync_drop_records_forgotten(self, total: int) -> None:
        """Take the assembler's cumulative count of forgotten drop rows (never lowered)."""
        with self._lock:
            self.drop_records_forgotten = max(self.drop_records_forgotten, int(total))

    def advice_superseded(self, n: int = 1) -> None:
        """Throttled advice replaced by newer advice of its run before it was computed."""
        with self._lock:
            self.superseded_advice += n

    def reject(self, reason: str, stage: str = "analysis", n: int = 1) -> None:
        """Something rejected with a reason, at "assembly" or "analysis"."""
        with self._lock:
            key = (stage, reason)
            self.rejected[key] = self.rejected.get(key, 0) + n

    def internal_error(self, what: str, n: int = 1) -> None:
        """An unexpected error (a bug), by what it cost (:data:`INTERNAL_ERRORS`)."""
        with self._lock:
            self.internal_errors[what] = self.internal_errors.get(what, 0) + n

    def decode_error(self, reason: str, n: int = 1) -> None:
        """Wire messages that could not be decoded (counted by the input adapter)."""
        with self._lock:
            self.decode_errors[reason] = self.decode_errors.get(reason, 0) + n

    def sync_decode_errors(self, totals: Mapping[str, int]) -> None:
        """Take cumulative per-reason totals kept elsewhere (e.g. the 0MQ source's stats).

        Counts never go down: a total below the one held (a restarted source) is ignored.
        """
        with self._lock:
            for reason, n in totals.items():
                if n > self.decode_errors.get(reason, 0):
                    self.decode_errors[reason] = int(n)

    def run_opened(self) -> None:
        """A raw run whose analysis run was opened."""
        with self._lock:
            self.runs_opened += 1

    def run_closed(self, exit_status: str) -> None:
        """A raw run closed, by its stop's exit status or "timeout"."""
        with self._lock:
            self.runs_closed[exit_status] = self.runs_closed.get(exit_status, 0) + 1

    def model_swapped(self) -> None:
        """A serving bundle was replaced by a new one."""
        with self._lock:
            self.model_swaps += 1

    def model_refusal(self, reason: str = "invalid") -> None:
        """A bundle failed verification and was not loaded, by reason code (``digest_mismatch``...)."""
        with self._lock:
            self.model_refused[reason] = self.model_refused.get(reason, 0) + 1

    def refused_by_limit(self, limit: str, n: int = 1) -> None:
        """Requests refused by an operator limit (``sse_clients``: too many event streams)."""
        with self._lock:
            self.limit_refused[limit] = self.limit_refused.get(limit, 0) + n

    def set_model(self, element: str, edge: str, bundle_id: str | None) -> None:
        """Record the bundle serving ``element``/``edge`` (None: none any more)."""
        with self._lock:
            if bundle_id is None:
                self.models.pop((element, edge), None)
            else:
                self.models[(element, edge)] = bundle_id

    def sync_kafka(
        self, stats: Mapping[str, int], lag: Mapping[tuple[str, int], int], held: bool = False
    ) -> None:
        """Take the Kafka input's cumulative counters, its current lag per partition and
        whether its offset commits are held."""
        with self._lock:
            for name in KAFKA_COUNTERS:
                self.kafka[name] = max(self.kafka[name], int(stats.get(name, 0)))
            self.kafka_lag = {(t, str(p)): int(n) for (t, p), n in lag.items()}
            self.kafka_held = held

    def sync_queueserver(self, stats: Mapping[str, int], deferred_errors: int = 0) -> None:
        """Take the queueserver submitter's cumulative counts by outcome (its ``stats``:
        every outcome from 0 once it runs) and its failed looks at the plans given up
        (``deferred_errors``: no plan's outcome, so apart)."""
        with self._lock:
            for name, n in stats.items():
                self.queueserver[name] = max(self.queueserver.get(name, 0), int(n))
            self.queueserver_deferred_errors = max(
                self.queueserver_deferred_errors, int(deferred_errors)
            )

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge exported as ``xasflow_<name>{labels}`` (e.g. ``queue_depth``)."""
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            self.gauges[key] = float(value)

    def observe_latency(self, seconds: float) -> None:
        """One end-to-end latency (negative values, from clock skew, count as 0)."""
        s = max(0.0, float(seconds)) if math.isfinite(seconds) else LATENCY_BUCKETS[-1] * 10
        i = bisect.bisect_left(LATENCY_BUCKETS, s)
        with self._lock:
            self._bucket_counts[i] += 1
            self._latency_sum += s
            self._latency_count += 1
            self._recent.append(s)

    # ------------------------------------------------------------------ reading

    def latencies(self) -> list[float]:
        """The most recent end-to-end latencies (s), oldest first (bounded window)."""
        with self._lock:
            return list(self._recent)

    def histogram(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative ``[(upper bound, count)]`` including +Inf, the sum and the count."""
        with self._lock:
            counts = list(self._bucket_counts)
            total, n = self._latency_sum, self._latency_count
        cumulative, acc = [], 0
        for bound, c in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
            acc += c
            cumulative.append((bound, acc))
        return cumulative, total, n

    def register_prometheus(self, registry: Any = None) -> Any:
        """Expose these counters in a prometheus_client registry; see :func:`register_prometheus`."""
        return register_prometheus(self, registry)

    def rejected_per_stage(self) -> dict[str, int]:
        """Each stage's rejections (every stage from 0), so spectra and documents stay apart."""
        totals = dict.fromkeys(REJECTION_STAGES, 0)
        with self._lock:
            for (stage, _), n in self.rejected.items():
                totals[stage] = totals.get(stage, 0) + n
        return totals

    def summary(self) -> str:
        """One line for the log: the pipeline's spectra (received = analysed + rejected there),
        then what assembly rejected before them (by reason), then decode errors."""
        c = self.snapshot()
        stages = c["rejected_by_stage"]
        analysis, assembly = stages.get("analysis", {}), stages.get("assembly", {})
        return (
            f"{c['spectra_received']} spectra received by the analysis: "
            f"{c['spectra_analysed']} analysed, {sum(analysis.values())} rejected {analysis}; "
            f"rejected in assembly {sum(assembly.values())} {assembly}; "
            f"decode errors {c['decode_errors']}"
        )

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter (for health endpoints, logs and tests)."""
        with self._lock:
            recent = sorted(self._recent)
            by_stage: dict[str, dict[str, int]] = {}
            by_reason: dict[str, int] = {}
            stage_totals = dict.fromkeys(sorted(REJECTION_STAGES), 0)
            for (stage, reason), n in sorted(self.rejected.items()):
                by_stage.setdefault(stage, {})[reason] = n
                by_reason[reason] = by_reason.get(reason, 0) + n
                stage_totals[stage] = stage_totals.get(stage, 0) + n
            snap: dict[str, Any] = {
                "spectra_received": self.spectra_received,
                "spectra_analysed": self.spectra_analysed,
                "spectra_rejected": sum(self.rejected.values()),  # both stages
                "spectra_rejected_by_stage": stage_totals,
                "out_of_domain": self.out_of_domain,
                "herfd_suspected": self.herfd_suspected,
                "events_lost": dict(sorted(self.events_lost.items())),
                "events_lost_total": sum(self.events_lost.values()),
                "drop_records_forgotten": self.drop_records_forgotten,
                "advice_superseded": self.superseded_advice,
                "rejected": by_reason,
                "rejected_by_stage": by_stage,
                "decode_errors": dict(sorted(self.decode_errors.items())),
                "internal_errors": dict(self.internal_errors),
                "runs_opened": self.runs_opened,
                "runs_closed": dict(sorted(self.runs_closed.items())),
                "model_swaps": self.model_swaps,
                "limit_refused": dict(sorted(self.limit_refused.items())),
                "model_refused": sum(self.model_refused.values()),
                "model_refused_by_reason": dict(sorted(self.model_refused.items())),
                "models": {f"{el}-{ed}": bid for (el, ed), bid in sorted(self.models.items())},
                "gauges": {_gauge_label(k): v for k, v in sorted(self.gauges.items())},
                "kafka": dict(self.kafka),
                "latency": {
                    "count": self._latency_count,
                    "sum_s": self._latency_sum,
                    "window": len(recent),
                    "p50_ms": _quantile(recent, 0.50) * 1e3 if recent else None,
                    "p99_ms": _quantile(recent, 0.99) * 1e3 if recent else None,
                    "max_ms": recent[-1] * 1e3 if recent else None,
                },
            }
        return snap


def _gauge_label(key: tuple[str, tuple[tuple[str, str], ...]]) -> str:
    name, labels = key
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]
