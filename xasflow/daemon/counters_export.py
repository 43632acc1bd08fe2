"""The Prometheus export of :class:`~xasflow.daemon.counters.Counters`: a custom collector
read at scrape time, and the label values exported from 0.

It imports prometheus_client only when it collects, so the counters (and the science core
that counts) do not depend on it. ``Counters`` is read under its own lock (this module is
its exporter, not a client of its public API), so one scrape sees one consistent state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from xasflow.adapters.wire import DECODE_ERROR_REASONS
from xasflow.models.integrity import REASONS as INTEGRITY_REASONS

if TYPE_CHECKING:
    from xasflow.daemon.counters import Counters

__all__ = ["EXIT_STATUSES", "GAUGE_HELP", "LOSS_CAUSES", "REFUSAL_REASONS", "register_prometheus"]

#: What each gauge the daemon sets means, for its ``# HELP`` line (others: their name).
GAUGE_HELP: dict[str, str] = {
    "queue_depth": "Documents received and waiting for the processing thread",
    "open_runs": "Raw runs being analysed (started, not yet stopped)",
    "store_queued": "Result rows waiting to be written to the analysis catalog",
    "limit": "An operator limit's maximum (label: limit)",
    "limit_used": "How much of an operator limit is in use (label: limit)",
}

#: Why raw events can be lost (``Counters.lost``), each exported from 0.
LOSS_CAUSES: tuple[str, ...] = ("seq_gap", "overflow", "interrupted", "on_close")
#: How a raw run can close (the stop's, the run timeout's, a killed predecessor's), from 0.
EXIT_STATUSES: tuple[str, ...] = ("success", "abort", "fail", "timeout", "interrupted")
#: Why a bundle can be refused, each exported from 0.
REFUSAL_REASONS: tuple[str, ...] = tuple(INTEGRITY_REASONS)


def _by_label(
    family: Any, name: str, help_text: str, labels: list[str], values: Mapping[Any, float]
) -> Any:
    """A metric family ``xasflow_<name>`` with one sample per key of ``values`` (a label value,
    or a tuple of them), in key order."""
    fam = family(f"xasflow_{name}", help_text, labels=labels)
    for key, n in sorted(values.items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return fam


class _Collector:
    """prometheus_client custom collector reading a ``Counters`` at scrape time."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families are produced at collect time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        c = self.counters
        with c._lock:
            received, analysed = c.spectra_received, c.spectra_analysed
            ood, lost = c.out_of_domain, dict(c.events_lost)
            forgotten, superseded = c.drop_records_forgotten, c.superseded_advice
            herfd = c.herfd_suspected
            rejected = dict(c.rejected)
            decode = dict(c.decode_errors)
            internal = dict(c.internal_errors)  # every kind from 0 (Counters.__init__)
            opened, closed = c.runs_opened, dict(c.runs_closed)
            swaps, refused = c.model_swaps, dict(c.model_refused)
            over_limit = dict(c.limit_refused)
            models = dict(c.models)
            gauges = dict(c.gauges)
            kafka, kafka_lag, kafka_held = dict(c.kafka), dict(c.kafka_lag), c.kafka_held
            queueserver = dict(c.queueserver)
            deferred_errors = c.queueserver_deferred_errors
        # known causes and reasons start at 0 (see the module docstring)
        lost = {**dict.fromkeys(LOSS_CAUSES, 0), **lost}
        refused = {**dict.fromkeys(REFUSAL_REASONS, 0), **refused}
        rejected = {**dict.fromkeys(c.known_rejections, 0), **rejected}
        decode = {**dict.fromkeys(DECODE_ERROR_REASONS, 0), **decode}
        closed = {**dict.fromkeys(EXIT_STATUSES, 0), **closed}  # timeout: XasflowRunsTimingOut
        yield CounterMetricFamily(
            "xasflow_spectra_received", "Spectra handed to the analysis pipeline", value=received
        )
        yield CounterMetricFamily(
            "xasflow_spectra_analysed", "Spectra analysed with a prediction", value=analysed
        )
        yield CounterMetricFamily(
            "xasflow_spectra_out_of_domain",
            "Analysed spectra outside the bundle's training domain (answers not to trust)",
            value=ood,
        )
        yield CounterMetricFamily(
            "xasflow_spectra_herfd_suspected",
            "Out-of-domain spectra that would be in domain if declared HERFD (analysis.herfd)",
            value=herfd,
        )
        count = CounterMetricFamily
        yield _by_label(
            count, "events_lost", "Raw events that never reached the analysis", ["cause"], lost
        )
        yield CounterMetricFamily(
            "xasflow_drop_records_forgotten",
            "Event rows dropped by a full input queue (in events_lost cause overflow) whose "
            "drop record the assembler forgot past its bound, or gave up when their run's "
            "start did not come within the run timeout: no event lost by it, but if their "
            "run still comes they count as seq_gap too",
            value=forgotten,
        )
        yield CounterMetricFamily(
            "xasflow_advice_superseded",
            "Throttled recommendations replaced by a newer one of the same run due in the same "
            "batch (not computed; each stop-early turn and a run's first and last still go out)",
            value=superseded,
        )
        yield _by_label(
            count,
            "spectra_rejected",
            "Spectra or documents rejected, by stage and reason",
            ["stage", "reason"],
            rejected,
        )
        yield _by_label(
            count, "decode_errors", "Wire messages that could not be decoded", ["reason"], decode
        )
        yield _by_label(  # a bug that drops documents or a run's start or stop
            count,
            "internal_errors",
            "Unexpected errors (bugs), by what they cost: processing (documents and batches "
            "the processing loop dropped), run_start (a run analysed without its start's "
            "metadata), run_stop (a run's analysis stopped fail)",
            ["what"],
            internal,
        )
        yield CounterMetricFamily("xasflow_runs_opened", "Raw runs opened", value=opened)
        yield _by_label(
            count, "runs_closed", "Raw runs closed, by exit status", ["exit_status"], closed
        )
        yield CounterMetricFamily(
            "xasflow_model_swaps", "Serving model bundles replaced by new ones", value=swaps
        )
        yield _by_label(
            count,
            "model_refused",
            "Model bundles refused (failed verification), by reason",
            ["reason"],
            refused,
        )
        yield _by_label(
            count, "limit_refused", "Requests refused by an operator limit", ["limit"], over_limit
        )
        info = GaugeMetricFamily(
            "xasflow_model_info",
            "Model bundle serving each element and edge",
            labels=["element", "edge", "bundle_id"],
        )
        for (element, edge), bundle_id in sorted(models.items()):
            info.add_metric([element, edge, bundle_id], 1.0)
        yield info
        buckets, total, _n = c.histogram()
        yield HistogramMetricFamily(
            "xasflow_latency_seconds",
            "End-to-end latency: raw event time to analysis result",
            buckets=[("+Inf" if math.isinf(b) else repr(b), n) for b, n in buckets],
            sum_value=total,
        )
        families: dict[str, Any] = {}
        for (name, labels), value in sorted(gauges.items()):
            names = [k for k, _ in labels]
            gauge = families.get(name)
            if gauge is None:
                text = GAUGE_HELP.get(name, name)
                gauge = families[name] = GaugeMetricFamily(f"xasflow_{name}", text, labels=names)
            gauge.add_metric([v for _, v in labels], value)
        yield from families.values()
        helps = {
            "rebalances": "Kafka consumer-group rebalances this daemon took part in",
            "commits": "Kafka offset commits (each after the results it covers were durable)",
            "commit_failures": "Kafka offset commits the broker refused or that failed",
            "commits_held": "Kafka offset commits held back: the store refused or lost results, so "
            "only a restart (redelivery) can bring them",
            "consumer_errors": "Kafka consumer errors: a broker unreachable (librdkafka's "
            "client errors, while it reconnects), a fetch error, the receive loop's own",
        }
        for name, text in helps.items():  # every name of KAFKA_COUNTERS
            yield CounterMetricFamily(f"xasflow_kafka_{name}", text, value=kafka.get(name, 0))
        yield GaugeMetricFamily(
            "xasflow_kafka_commit_hold",
            "1 while no Kafka offset may be committed (the store refused or lost results; restart)",
            value=int(kafka_held),
        )
        yield _by_label(
            GaugeMetricFamily,
            "kafka_consumer_lag",
            "Messages on the broker not yet processed by this daemon, per assigned partition",
            ["topic", "partition"],
            kafka_lag,
        )
        yield _by_label(
            count,
            "queueserver_plans",
            "Queueserver plans by outcome (the submitter's counts; failed, lost_reply and "
            "retried count tries, gave_up* give-ups: a plan tried again counts once a round, "
            "revived counts rounds): abandoned_* are plans lost, refused_invalid tries of "
            "plans no server takes (not sent, not remembered)",
            ["outcome"],
            queueserver,
        )
        yield CounterMetricFamily(
            "xasflow_queueserver_deferred_errors",
            "Errors while the queueserver submitter looked at the plans given up to try them "
            "again (logged; those plans stay remembered, for a replay or a restart): no plan",
            value=deferred_errors,
        )


def register_prometheus(counters: Counters, registry: Any = None) -> Any:
    """Expose ``counters`` in a prometheus_client registry (default: the global REGISTRY).

    Returns the collector, so it can be unregistered again.
    """
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    collector = _Collector(counters)
    registry.register(collector)
    return collector
