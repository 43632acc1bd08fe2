"""The queueserver submitter's enqueue against a close on another thread, the replay count
of a plan given up, and which timeouts are lost replies."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from feedback_helpers import REC, ZMQ_KEY, FakeApi

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE


def _config(**knobs: Any) -> QueueServerConfig:
    """Enabled, no rate limit, quick retries."""
    settings: dict[str, Any] = {"min_interval_s": 0.0, "retries": 1, "retry_backoff_s": 0.05}
    return QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, **{**settings, **knobs})


def _jobs_left(sub: QueueServerSubmitter) -> list[Any]:
    """The run plans left in the submitter's queue (markers aside)."""
    left = []
    while True:
        try:
            job = sub._queue.get_nowait()
        except queue.Empty:
            return left
        if isinstance(job, tuple):
            left.append(job)


def test_a_plan_enqueued_while_close_runs_to_its_end_is_counted_dropped(
    tmp_path: Path, caplog: Any
) -> None:
    """enqueue has found the submitter open when close (the daemon's shutdown, on another
    thread) runs to its end: the plan is not accepted (False), counted ``dropped_closed``,
    and left in no queue for a worker started after close; close released the memory, so it
    is logged as not remembered rather than written to a file the next daemon may hold."""
    api = FakeApi()
    sub = QueueServerSubmitter(
        _config(), api_factory=lambda _: api, memory=tmp_path / SUBMITTED_FILE
    )
    assert sub.enqueue(REC, "raw-1") and sub.join(5.0)  # a worker exists
    limited = sub._rate.limited

    def close_then_limited() -> bool:  # runs after enqueue's first look at _closing
        sub._rate.limited = limited
        sub.close(timeout=1.0)
        return limited()

    sub._rate.limited = close_then_limited  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="xasflow.adapters.queueserver_memory"):
        assert not sub.enqueue(REC, "raw-2")
    assert sub.stats["dropped_closed"] == 1 and sub.stats["submitted"] == 1
    assert sub._worker is None, "a worker started after close"
    assert _jobs_left(sub) == []
    assert [item["kwargs"]["md"]["xasflow"]["raw_uid"] for _, item in api.items] == ["raw-1"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("not remembered" in m and "raw-2" in m for m in logged), logged
