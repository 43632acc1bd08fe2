"""What the queueserver tests with and without a server share: a two-region recommendation,
its plan rows, and an analysis run that carries it as a ``recommendations`` row; and, for
the submitter's tests, a quick configuration, a daemon's submitter, the runs a fake
queueserver took, fakes that are down, lose their reply or cannot be asked what they hold,
a plan given up, and a script's ``submit()`` on a thread of its own."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from feedback_helpers import ZMQ_KEY, FakeApi, HeldApi
from helpers import analysis_run_docs

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter
from xasflow.adapters.queueserver_client import QueueServerError

REC = {
    "regions": [
        {
            "name": "pre-edge",
            "start": 8978.0,
            "stop": 8990.0,
            "step": 0.5,
            "dwell": 2.0,
            "reason": "importance 1.00, mostly for cn",
        },
        {
            "name": "beyond",
            "start": 9020.0,
            "stop": 9100.0,
            "step": 2.0,
            "dwell": 0.5,
            "reason": "importance 0.20",
        },
    ],
    "rescan": None,
    "stop_early": False,
    "e0": 8983.5,
    "uncertainty": 0.4,
    "bundle_id": "cu-k-test",
}
ROWS = [[8978.0, 8990.0, 0.5, 2.0], [9020.0, 9100.0, 2.0, 0.5]]


def advice_run_docs(
    stop_early: bool, raw_uid: str = "raw-1", exit_status: str = "success", rescan: str = ""
) -> list[tuple[str, dict[str, Any]]]:
    row = {
        "regions": json.dumps(REC["regions"]),
        "rescan": rescan,
        "stop_early": stop_early,
        "e0": 8983.5,
        "bundle_id": "cu-k-test",
    }
    return analysis_run_docs(
        [("primary", {"status": "ok"}), ("recommendations", row)],
        raw_uid,
        stop={"exit_status": exit_status},
    )


def item_raw_uid(item: dict[str, Any]) -> str:
    """The raw run a plan item was made for."""
    return str(item["kwargs"]["md"]["xasflow"]["raw_uid"])


def quick_config(**knobs: Any) -> QueueServerConfig:
    """Enabled, no rate limit, quick retries: one retry after 50 ms, then given up."""
    settings: dict[str, Any] = {"min_interval_s": 0.0, "retries": 1, "retry_backoff_s": 0.05}
    return QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, **{**settings, **knobs})


def daemon(cfg: QueueServerConfig, api: FakeApi, path: Path) -> QueueServerSubmitter:
    """A daemon's submitter (its memory beside the store), as after a (re)start."""
    return QueueServerSubmitter(cfg, api_factory=lambda _: api, memory=path)


def queued_runs(api: FakeApi) -> list[str]:
    """The raw runs whose plans ``api`` took, in order."""
    return [item_raw_uid(item) for _, item in api.items]


class OutageApi(FakeApi):
    """An RE Manager that cannot be reached until ``up``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = threading.Event()

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if not self.up.is_set():
            raise ConnectionError("RE Manager unreachable")
        return super().item_add(item, user, user_group)


def give_up_plan(
    cfg: QueueServerConfig, path: Path, rec: dict[str, Any], raw_uid: str = "raw-1"
) -> None:
    """A daemon whose RE Manager is down gives the run's plan (``rec``) up, then stops."""
    sub = daemon(cfg, OutageApi(), path)
    try:
        assert sub.enqueue(rec, raw_uid)
        assert sub.join(10.0) and sub.stats["gave_up"] == 1
    finally:
        sub.close()


class LostReplyApi(FakeApi):
    """Takes each plan, but its reply never comes (a timeout) while ``lost``."""

    lost = True

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        reply = super().item_add(item, user, user_group)
        if self.lost:
            raise TimeoutError("Request timeout: no reply from the RE Manager")
        return reply


class UnaskedApi(HeldApi):
    """A :class:`HeldApi` that cannot say what its queue and history hold (no ``queue_get``
    nor ``history_get``: the submitter does not ask), so that only the submitter's own
    record can keep a run's plan from going in twice."""

    queue_get = None  # type: ignore[assignment]
    history_get = None  # type: ignore[assignment]


def submit_on_a_thread(
    sub: QueueServerSubmitter, rec: dict[str, Any], raw_uid: str = "raw-1"
) -> tuple[threading.Thread, list[QueueServerError]]:
    """An operator's script calling ``sub.submit(rec)`` for ``raw_uid`` on a thread of its
    own (not started), and the QueueServerError it raised, once it did."""
    errors: list[QueueServerError] = []

    def script() -> None:
        try:
            sub.submit(rec, raw_uid=raw_uid)
        except QueueServerError as exc:
            errors.append(exc)

    return threading.Thread(target=script), errors
