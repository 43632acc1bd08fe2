"""The queueserver submitter's enqueue against a close on another thread, the replay count
of a plan given up, and which timeouts are lost replies."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from feedback_helpers import REC, FakeApi, HeldApi
from queueserver_helpers import quick_config

from xasflow.adapters.queueserver import QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns
from xasflow.adapters.queueserver_plan import decode, submission_key


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
        quick_config(), api_factory=lambda _: api, memory=tmp_path / SUBMITTED_FILE
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
    full queue (``gave_up_queue_full``), and the next one's first try is held back by the
    rate (``skipped_rate``: raw-4 went in meanwhile, in another daemon): neither tried it, so neither uses up
    one of its ``given_up_replays`` (before, both did, at enqueue)."""
    key = submission_key("raw-3", decode(REC), False)
    paths = [tmp_path / str(i) / SUBMITTED_FILE for i in (1, 2)]
    for path in paths:  # a previous daemon gave raw-3's plan up
        with SubmittedRuns(path) as memory:
            memory.give_up(key, {"regions": REC["regions"]}, False)
    path = paths[0]
    fake = HeldApi()
    sub = QueueServerSubmitter(quick_config(max_pending=1), api_factory=lambda _: fake, memory=path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        assert not sub.enqueue(REC, "raw-3")  # the queue is full
        fake.release.set()
        assert sub.join(10.0)  # raw-3 given up by the worker (counted once remembered)
        assert sub.stats["gave_up_queue_full"] == 1
        assert sub._memory.replays(key) == 0
    finally:
        fake.release.set()
        sub.close()
    path = paths[1]  # a daemon whose rate is free
    fake = HeldApi("raw-4")
    sub = QueueServerSubmitter(
        quick_config(min_interval_s=3600.0), api_factory=lambda _: fake, memory=path
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


_STATUS = {"success": True, "msg": "", "items": [], "running_item": {}}


def _http_api(item_add_raises: type[Exception]) -> Any:
    """bluesky-queueserver-api's HTTP client whose transport answers every request (empty
    queue and history) but ``item_add``, which raises ``item_add_raises`` (an httpx one)."""
    import httpx
    from bluesky_queueserver_api.http import REManagerAPI

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/queue/item/add"):
            raise item_add_raises("timed out", request=request)
        return httpx.Response(200, json={**_STATUS, "plan_queue_uid": "q", "plan_history_uid": "h"})

    api = REManagerAPI(http_server_uri="http://qs.test")
    api._client = httpx.Client(base_url="http://qs.test", transport=httpx.MockTransport(answer))
    return api


def _zmq_api(unsent: bool) -> Any:
    """bluesky-queueserver-api's 0MQ client (nothing listens at its address: a request times
    out waiting for the reply), its queue and history answered empty; ``unsent``: the socket
    does not take ``item_add``'s message (``zmq.Again``, as on a send timeout)."""
    import zmq
    from bluesky_queueserver_api.zmq import REManagerAPI
    from helpers import free_port

    api = REManagerAPI(
        zmq_control_addr=f"tcp://127.0.0.1:{free_port()}", timeout_recv=0.2, timeout_send=0.2
    )
    client = api._client
    communicate = client._zmq_communicate

    def talk(msg_out: dict[str, Any], *, cb: Any, timeout: Any) -> Any:
        if msg_out["method"] != "queue_item_add":
            return {**_STATUS, "plan_queue_uid": "q", "plan_history_uid": "h"}
        if unsent:
            raise zmq.Again()
        return communicate(msg_out, cb=cb, timeout=timeout)

    client._zmq_communicate = talk
    return api


def test_a_timeout_is_a_lost_reply_only_where_the_request_may_have_reached_the_server(
    tmp_path: Path,
) -> None:
    """The client raises ``RequestTimeoutError`` (a ``TimeoutError``) for every timeout.
    Connecting, or waiting for a pooled connection (httpx ``ConnectTimeout``,
    ``PoolTimeout``), or a 0MQ message the socket did not take (``zmq.Again``), never
    reached the server: a failed try, which the next daemon's replay sends. Waiting for the
    reply (httpx ``ReadTimeout``, a 0MQ receive timeout) may follow a plan the server took:
    a lost reply (before, all five were)."""
    import httpx
    import pytest

    from xasflow.adapters.queueserver import QueueServerError

    cases = [
        ("connect", lambda: _http_api(httpx.ConnectTimeout), False),
        ("pool", lambda: _http_api(httpx.PoolTimeout), False),
        ("read", lambda: _http_api(httpx.ReadTimeout), True),
        ("zmq_send", lambda: _zmq_api(unsent=True), False),
        ("zmq_receive", lambda: _zmq_api(unsent=False), True),
    ]
    for name, make, lost in cases:
        path = tmp_path / name / SUBMITTED_FILE
        api = make()
        sub = QueueServerSubmitter(quick_config(), api_factory=lambda _, api=api: api, memory=path)
        try:
            with pytest.raises(QueueServerError) as raised:
                sub.submit(REC, raw_uid="raw-1")
            assert isinstance(raised.value.__cause__, TimeoutError), name
            assert (sub.stats["failed"], sub.stats["lost_reply"]) == (1, int(lost)), name
        finally:
            sub.close()
        with SubmittedRuns(path) as memory:
            assert memory.lost_before(("raw-1", "run_end")) is lost, name


def test_plans_revived_while_close_runs_to_its_end_are_counted_dropped(tmp_path: Path) -> None:
    """retry_given_up has found the submitter open when close (the daemon's shutdown, on
    another thread) runs to its end: the plans it revived are not scheduled (0), counted
    ``dropped_closed`` rather than ``revived``, and left waiting in no retry queue nor for a
    worker started after close (before, they waited after close: neither sent nor counted)."""
    path = tmp_path / SUBMITTED_FILE
    keys = [submission_key(f"raw-{i}", decode(REC), False) for i in (1, 2)]
    with SubmittedRuns(path) as memory:  # a previous daemon gave both plans up
        for key in keys:
            memory.give_up(key, {"regions": REC["regions"]}, False)
    api = FakeApi()
    sub = QueueServerSubmitter(quick_config(), api_factory=lambda _: api, memory=path)
    revive = sub._memory.revive

    def revive_then_close(*args: Any) -> Any:  # runs after retry_given_up's look at _closing
        plans = revive(*args)
        sub.close(timeout=1.0)
        return plans

    sub._memory.revive = revive_then_close  # type: ignore[method-assign]
    assert sub.retry_given_up() == 0
    assert sub.stats["dropped_closed"] == 2 and sub.stats["revived"] == 0
    assert len(sub._retry) == 0 and sub._retry.unfinished == 0
    assert sub._worker is None, "a worker started after close"
    assert not sub._queued and api.items == []
