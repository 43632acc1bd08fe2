"""The document side of the queueserver submitter: which analysis runs' advice is queued.

:class:`RunFollower` follows one analysis run for
:class:`~xasflow.adapters.queueserver.QueueServerSubmitter` and hands it the advice to queue:
the run's last advice at a successful stop, or each rescan as it comes, never advice that
follows an out-of-domain answer. Rescans come with the advice the daemon publishes: a
spectrum throttled, or its advice superseded by a newer one of the run in the same batch
(:mod:`xasflow.daemon.advice`), is not looked at for one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from xasflow.adapters.routing import SinkRouter

if TYPE_CHECKING:
    from xasflow.adapters.queueserver import QueueServerSubmitter

__all__ = ["RunFollower"]


class RunFollower(SinkRouter):
    """One analysis run: keeps its latest advice and the index of its latest out-of-domain
    answer, and submits the advice at the run's stop (``submit_on: run_end``) or each rescan
    as it comes (``submit_on: rescan``).

    Advice is throttled, and a batch's documents come paged per stream (its answers before
    its advice), so out-of-domain answers are compared with the advice by spectrum index: a
    run with an answer out of domain after its last advice gets no plan, whatever that
    advice says (an index missing from either counts as after).
    """

    def __init__(self, submitter: QueueServerSubmitter, start: Mapping[str, Any]) -> None:
        super().__init__()
        self.submitter = submitter
        self.raw_uid = str(start.get("raw_uid") or "")
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name
        self.latest: dict[str, Any] | None = None
        self.latest_index = -math.inf
        self.last_ood = -math.inf  # index of the latest out-of-domain answer

    def descriptor(self, doc: Any) -> Any:
        self.streams[str(doc.get("uid"))] = str(doc.get("name"))

    def event(self, doc: Any) -> Any:
        stream = self.streams.get(str(doc.get("descriptor")))
        data = dict(doc.get("data") or {})
        if stream == "primary":
            if data.get("status") == "ok" and data.get("out_of_domain"):
                self.last_ood = max(self.last_ood, _index(data, math.inf))
            return
        if stream != "recommendations":
            return
        self.latest, self.latest_index = data, _index(data, -math.inf)
        if self.submitter.config.submit_on == "rescan" and data.get("rescan"):
            if data.get("out_of_domain"):
                self.submitter.stats["skipped_out_of_domain"] += 1
                return
            self.submitter.enqueue(data, self.raw_uid, rescan_only=True)

    def stop(self, doc: Any) -> Any:
        if self.latest is None or self.submitter.config.submit_on != "run_end":
            return
        if doc.get("exit_status") != "success":  # aborted, failed, or ended by a shutdown
            self.submitter.stats["skipped_not_success"] += 1
            return
        if self.latest.get("out_of_domain") or self.last_ood > self.latest_index:
            self.submitter.stats["skipped_out_of_domain"] += 1  # an answer not to be trusted
            return
        self.submitter.enqueue(self.latest, self.raw_uid)


def _index(data: Mapping[str, Any], missing: float) -> float:
    """The spectrum index of an event's data (``missing`` when it has none)."""
    value = data.get("index")
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else missing
