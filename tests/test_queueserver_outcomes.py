"""The queueserver submitter's outcomes at its edges: a plan arriving while close drains is
remembered, a lost reply is its own outcome, a given-up run's replays are capped, the wake-up
marker takes no pending place, and the rate holds across a restart."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feedback_helpers import REC, FakeApi, HeldApi
from helpers import wait_for
from queueserver_helpers import (
    LostReplyApi,
    OutageApi,
    daemon,
    give_up_plan,
    queued_runs,
    quick_config,
)

from xasflow.adapters.queueserver import QueueServerError, QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns

# --------------------------------------------------------------------------- close


def test_a_plan_arriving_while_close_drains_is_remembered(tmp_path: Path) -> None:
    """close has begun (it waits for raw-1's request, with the server) when a run's plan
    comes (the daemon closes the submitter last): it is not sent, counted in
    ``dropped_closed`` and remembered as given up, like the plans close drops, so the next
    daemon tries it again."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = HeldApi()
    sub = daemon(quick_config(), fake, path)
    closing = threading.Thread(target=sub.close, kwargs={"timeout": 0.1})
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        closing.start()
        wait_for(lambda: sub._closing, what="close to begin")
        assert not sub.enqueue(REC, "raw-late")
        assert sub.stats["dropped_closed"] == 1
    finally:
        fake.release.set()
        closing.join(20.0)
    assert not closing.is_alive() and queued_runs(fake) == ["raw-1"]
    with SubmittedRuns(path) as memory:
        assert [plan.key for plan in memory.given_up()] == [("raw-late", "run_end")]
    sub = daemon(quick_config(), fake, path)
    try:
        assert sub.retry_given_up() == 1 and sub.join(10.0)
        assert queued_runs(fake) == ["raw-1", "raw-late"]
    finally:
        sub.close()


# --------------------------------------------------------------------------- a lost reply


def test_a_lost_reply_then_a_crash_is_not_queued_again_once_removed(
    tmp_path: Path, caplog: Any
) -> None:
    """The server took raw-1's plan but its reply was lost; the daemon dies before its retry
    and an operator removes the plan from the queue. The run's replay in the next daemon
    finds the plan in neither queue nor history: it may have been removed, so it is not
    queued again but given up for good (``abandoned_lost_reply``, logged, remembered: a
    later replay is a repeat)."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = LostReplyApi()
    sub = daemon(quick_config(retry_backoff_s=60.0), fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["failed"] == 1, what="raw-1's lost reply")
        assert sub.stats["lost_reply"] == 1 and queued_runs(fake) == ["raw-1"]
        sub._memory.close()  # the daemon dies: what is on disk is all the next one has
        fake.items.clear()  # the operator removes the plan from the queue
        fake.lost = False
        nxt = daemon(quick_config(), fake, path)
        try:
            with caplog.at_level("ERROR", logger="xasflow.adapters.queueserver"):
                assert nxt.enqueue(REC, "raw-1")  # Kafka replays the run
                assert nxt.join(10.0)
            assert queued_runs(fake) == [], "a plan an operator may have removed was queued again"
            assert nxt.stats["abandoned_lost_reply"] == 1 and nxt.stats["submitted"] == 0
            logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
            assert any("raw-1" in m and "given up for good" in m for m in logged), logged
        finally:
            nxt.close()
    finally:
        sub.close()
    sub = daemon(quick_config(), fake, path)
    try:
        assert sub.retry_given_up() == 0
        assert not sub.enqueue(REC, "raw-1") and sub.stats["skipped_repeat"] == 1
        assert sub.join(10.0) and queued_runs(fake) == []
    finally:
        sub.close()


# --------------------------------------------------------------------------- replays


class _Down(FakeApi):
    """An RE Manager that refuses every plan."""

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        return {"success": False, "msg": "RE Manager busy"}


def _replayed_until_spent(path: Path, replay: Callable[[QueueServerSubmitter], bool]) -> None:
    """raw-1's plan given up (its RE Manager refuses it), then ``replay`` again and again
    (True: the plan was tried): it is tried for ``given_up_replays`` (2) replays, then given
    up for good (``abandoned_replays``), and neither replayed nor revived by the next
    daemon."""
    sub = daemon(quick_config(retries=0), _Down(), path)
    try:
        assert sub.enqueue(REC, "raw-1") and sub.join(10.0) and sub.stats["gave_up"] == 1
        tries = 0
        for _ in range(6):
            if not replay(sub):
                break
            tries += 1
        assert tries == sub.config.given_up_replays == 2, f"{tries} replays tried it again"
        assert sub.stats["failed"] == 3 and sub.stats["abandoned_replays"] == 1
        assert not sub.enqueue(REC, "raw-1") and sub.stats["skipped_repeat"] == 1
    finally:
        sub.close()
    fake = FakeApi()
    sub = daemon(quick_config(), fake, path)
    try:
        assert sub.retry_given_up() == 0 and not replay(sub)
        assert sub.join(10.0) and fake.items == []
    finally:
        sub.close()


def test_the_replays_of_a_given_up_run_are_capped(tmp_path: Path) -> None:
    """A plan given up is tried again when its run is replayed, each time with its own
    retries, but only ``given_up_replays`` times (2 by default): at the next replay it is
    given up for good (``abandoned_replays``), remembered so, and neither tried for a later
    replay nor revived by the next daemon."""

    def redelivered(sub: QueueServerSubmitter) -> bool:  # Kafka redelivers the run
        if not sub.enqueue(REC, "raw-1"):
            return False
        assert sub.join(10.0)
        return True

    _replayed_until_spent(tmp_path / "store" / SUBMITTED_FILE, redelivered)


def test_submit_tries_a_given_up_plan_for_as_few_replays(tmp_path: Path) -> None:
    """``submit()`` called for a run whose plan was given up is a replay like an enqueue: it
    tries the plan again for at most ``given_up_replays`` calls, then gives it up for good
    (``abandoned_replays``), and neither path nor the next daemon sends it after that."""

    def submitted(sub: QueueServerSubmitter) -> bool:  # an operator's script submits it
        try:
            return sub.submit(REC, raw_uid="raw-1") is not None
        except QueueServerError:
            return True

    _replayed_until_spent(tmp_path / "store" / SUBMITTED_FILE, submitted)


# --------------------------------------------------------------------------- max_pending


def test_the_wake_up_marker_takes_no_pending_place(tmp_path: Path) -> None:
    """``max_pending: 1``: raw-1's request is with the server when the plans the last
    daemon gave up are revived, which wakes the worker with a marker in its queue. The next
    run's plan still finds its one place: the marker is not a plan."""
    path = tmp_path / "store" / SUBMITTED_FILE
    give_up_plan(quick_config(retries=0), path, REC, "raw-0")
    fake = HeldApi()
    sub = daemon(quick_config(max_pending=1), fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.retry_given_up() == 1
        assert sub.enqueue(REC, "raw-2"), "the wake-up marker took raw-2's place"
        assert sub.stats["gave_up_queue_full"] == 0
        fake.release.set()
        assert sub.join(10.0)
        assert sorted(queued_runs(fake)) == ["raw-0", "raw-1", "raw-2"]
    finally:
        fake.release.set()
        sub.close()


def test_a_plan_refused_at_a_full_queue_is_remembered_for_the_next_daemon(
    tmp_path: Path,
) -> None:
    """``max_pending: 1``, raw-1's request with the server and raw-2 queued: raw-3 finds the
    queue full and is refused at enqueue (``gave_up_queue_full``, counted apart from the
    other plans given up). Before, it was not remembered: lost unless its run was replayed,
    while a plan dropped at close is. Now it is remembered as given up, and the next daemon
    tries it again (``revived``)."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = HeldApi()
    sub = daemon(quick_config(max_pending=1), fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        assert not sub.enqueue(REC, "raw-3")
        fake.release.set()
        assert sub.join(10.0) and queued_runs(fake) == ["raw-1", "raw-2"]
        assert sub.stats["gave_up_queue_full"] == 1  # by the worker, once remembered
        assert sub.stats["gave_up_waiting_full"] == 0 and sub.stats["gave_up"] == 0
    finally:
        fake.release.set()
        sub.close()
    with SubmittedRuns(path) as memory:
        assert [plan.key for plan in memory.given_up()] == [("raw-3", "run_end")]
    sub = daemon(quick_config(), fake, path)
    try:
        assert sub.retry_given_up() == 1 and sub.join(10.0)
        assert queued_runs(fake) == ["raw-1", "raw-2", "raw-3"]
    finally:
        sub.close()


def test_a_plan_refused_at_a_full_queue_is_written_by_the_worker_then_counted(
    tmp_path: Path,
) -> None:
    """``enqueue`` runs on the daemon's processing thread, which must never wait on disk.
    ``max_pending: 1``, raw-1's request with the server and raw-2 queued: raw-3 is refused
    at a full queue. Before, its ``gave_up`` line was appended and fsync'd by ``enqueue``,
    on the calling thread, after it was counted. Now the worker thread writes it, and counts
    it (``gave_up_queue_full``) only once the line is on disk."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = HeldApi()
    sub = daemon(quick_config(max_pending=1), fake, path)
    append = sub._memory._append
    writes: list[tuple[str, int]] = []  # (thread, gave_up_queue_full then) per gave_up line

    def recorded(line: str, key: tuple[str, str] | None) -> None:
        append(line, key)
        if '"gave_up"' in line:
            writes.append((threading.current_thread().name, sub.stats["gave_up_queue_full"]))

    sub._memory._append = recorded  # type: ignore[method-assign]
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        assert not sub.enqueue(REC, "raw-3")
        fake.release.set()
        assert sub.join(10.0) and queued_runs(fake) == ["raw-1", "raw-2"]
        assert writes == [("xasflow-queueserver", 0)]
        assert sub.stats["gave_up_queue_full"] == 1
    finally:
        fake.release.set()
        sub.close()
    with SubmittedRuns(path) as memory:
        assert [plan.key for plan in memory.given_up()] == [("raw-3", "run_end")]


def test_a_plan_refused_at_a_full_queue_just_before_close_is_still_remembered(
    tmp_path: Path,
) -> None:
    """raw-3 is refused at a full queue (handed to the worker to give up) while raw-1's
    request is with the server, and close begins before the worker is free: raw-3 is still
    remembered as given up and counted (by the worker or by close), not lost with the
    hand-over."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = HeldApi()
    sub = daemon(quick_config(max_pending=1), fake, path)
    closing = threading.Thread(target=sub.close, kwargs={"timeout": 0.1})
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        assert not sub.enqueue(REC, "raw-3")
        closing.start()
        wait_for(lambda: sub._closed, what="close giving up on what is queued")
    finally:
        fake.release.set()
        closing.join(20.0)
    assert sub.stats["gave_up_queue_full"] == 1 and sub.stats["dropped_closed"] == 1
    with SubmittedRuns(path) as memory:
        assert {plan.key[0] for plan in memory.given_up()} == {"raw-2", "raw-3"}


def test_a_plan_given_up_behind_a_full_line_of_waiting_plans_is_counted_as_remembered(
    tmp_path: Path,
) -> None:
    """``max_pending: 1``: raw-1's retry went in and holds the rate slot (the clock stands
    still), so raw-2's new plan waits its turn behind it (``waited_rate``); raw-3's finds
    that line full and is given up and remembered (``gave_up_waiting_full``), the next daemon
    tries it again: counted apart from a plan refused at a full queue."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = OutageApi()
    cfg = quick_config(max_pending=1, min_interval_s=100.0, retries=5)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake, clock=lambda: 0.0, memory=path)
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["failed"] == 1, what="raw-1's first try")
        fake.up.set()
        wait_for(lambda: queued_runs(fake) == ["raw-1"], what="raw-1's retry in the queue")
        assert sub.enqueue(REC, "raw-2")
        wait_for(lambda: sub.stats["waited_rate"] == 1, what="raw-2 waiting for the rate")
        assert sub.enqueue(REC, "raw-3")  # accepted; given up when its turn finds the line full
        wait_for(lambda: sub.stats["gave_up_waiting_full"] == 1, what="raw-3 given up")
        assert sub.stats["gave_up_queue_full"] == 0 and sub.stats["gave_up"] == 0
    finally:
        sub.close()
    assert queued_runs(fake) == ["raw-1"]
    with SubmittedRuns(path) as memory:  # raw-2 dropped by close, raw-3 given up: both kept
        assert sorted(plan.key[0] for plan in memory.given_up()) == ["raw-2", "raw-3"]


# --------------------------------------------------------------------------- the rate, restarted


def test_the_rate_holds_across_a_restart(tmp_path: Path) -> None:
    """A plan went in, and the daemon restarts at once: the restarted daemon keeps the rate
    the last one started (the memory records when the server last took a plan), so a run's
    new plan within ``min_interval_s`` is not sent (``skipped_rate``), by either path."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = FakeApi()
    cfg = quick_config(min_interval_s=3600.0)
    sub = daemon(cfg, fake, path)
    try:
        assert sub.enqueue(REC, "raw-1") and sub.join(10.0) and queued_runs(fake) == ["raw-1"]
    finally:
        sub.close()
    sub = daemon(cfg, fake, path)
    try:
        assert not sub.enqueue(REC, "raw-2"), "the restarted daemon burst past the rate"
        assert sub.submit(REC, raw_uid="raw-3") is None
        assert sub.join(10.0) and queued_runs(fake) == ["raw-1"]
        assert sub.stats["skipped_rate"] == 2
    finally:
        sub.close()
    sub = daemon(cfg.model_copy(update={"min_interval_s": 0.0}), fake, path)
    try:  # the rate is the configured one: a shorter interval has passed
        assert sub.enqueue(REC, "raw-2") and sub.join(10.0)
        assert queued_runs(fake) == ["raw-1", "raw-2"]
    finally:
        sub.close()
