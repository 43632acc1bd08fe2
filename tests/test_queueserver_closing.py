"""The queueserver submitter's enqueue against a close on another thread, the replay count
of a plan given up, and which timeouts are lost replies."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from feedback_helpers import REC, ZMQ_KEY, FakeApi, HeldApi

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns
from xasflow.adapters.queueserver_plan import decode, submission_key


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


def test_a_replay_of_a_given_up_plan_counts_only_once_it_is_tried(tmp_path: Path) -> None:
    """raw-3's plan was given up by a previous daemon. Its run's replay is refused at a
    full queue (``dropped_queue_full``), and the next one's first try is held back by the
    rate (``skipped_rate``: raw-4 went in meanwhile, in another daemon): neither tried it, so neither uses up
    one of its ``given_up_replays`` (before, both did, at enqueue)."""
    key = submission_key("raw-3", decode(REC), False)
    paths = [tmp_path / str(i) / SUBMITTED_FILE for i in (1, 2)]
    for path in paths:  # a previous daemon gave raw-3's plan up
        with SubmittedRuns(path) as memory:
            memory.give_up(key, {"regions": REC["regions"]}, False)
    path = paths[0]
    fake = HeldApi()
    sub = QueueServerSubmitter(_config(max_pending=1), api_factory=lambda _: fake, memory=path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        assert not sub.enqueue(REC, "raw-3")  # the queue is full
        assert sub.stats["dropped_queue_full"] == 1
        assert sub._memory.replays(key) == 0
        fake.release.set()
        assert sub.join(10.0)
    finally:
        fake.release.set()
        sub.close()
    path = paths[1]  # a daemon whose rate is free
    fake = HeldApi("raw-4")
    sub = QueueServerSubmitter(
        _config(min_interval_s=3600.0), api_factory=lambda _: fake, memory=path
    )
    try:
        assert sub.enqueue(REC, "raw-4")
        assert fake.sending.wait(10.0), "raw-4's try never reached the server"
        assert sub.enqueue(REC, "raw-3")  # raw-4 is not in yet: the rate is free
        fake.release.set()
        assert sub.join(10.0)
        assert sub.stats["skipped_rate"] == 1 and sub.stats["submitted"] == 1
        assert sub._memory.replays(key) == 0
    finally:
        fake.release.set()
        sub.close()
    for path in paths:
        with SubmittedRuns(path) as memory:
            assert memory.replays(key) == 0
