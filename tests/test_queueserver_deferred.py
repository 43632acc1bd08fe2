"""Plans given up for now, tried again by the daemon that gave them up while it runs on
(``given_up_retry_s``), within the replay cap, the age limit, ``max_pending`` and the rate."""

from __future__ import annotations

from pathlib import Path

import pytest
from feedback_helpers import REC, HeldApi
from helpers import wait_for
from queueserver_helpers import OutageApi, daemon, give_up_plan, queued_runs, quick_config

from xasflow.adapters.queueserver import QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns
from xasflow.adapters.queueserver_pending import wake

K = ("raw-1", "run_end")


def test_a_running_daemon_tries_a_plan_given_up_in_an_outage_again(tmp_path: Path) -> None:
    """The RE Manager is down, and raw-1's plan is given up (its one retry failed). Before,
    the daemon running on never tried it again: only a replay of the run or a restart did,
    so in practice it was lost. Now, once ``given_up_retry_s`` (and the retry backoff's next
    step) has passed, the running daemon tries it again (``revived``, a replay of its run),
    and with the server back it goes in, once."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = OutageApi()
    sub = daemon(quick_config(given_up_retry_s=0.05), fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["gave_up"] == 1, what="raw-1 given up")
        fake.up.set()
        wait_for(lambda: queued_runs(fake) == ["raw-1"], what="raw-1 tried again")
        assert sub.join(10.0)
        assert sub.stats["revived"] == 1 and sub.stats["submitted"] == 1
        assert sub._memory.given_up() == [] and K in sub._memory
        assert not sub.enqueue(REC, "raw-1"), "the plan that went in was accepted again"
    finally:
        sub.close()
    assert queued_runs(fake) == ["raw-1"]


def test_a_down_server_gets_a_plan_given_up_only_given_up_replays_more_times(
    tmp_path: Path,
) -> None:
    """The RE Manager stays down: the running daemon tries raw-1's plan again after each
    give-up, each time as a replay of its run with its own retries, for
    ``given_up_replays`` (2) rounds only: then it stops (no loop on a down server). Before,
    the plan was then dropped from the daemon's retries without a count or a log (the
    alert on plans lost never fired); now it is given up for good (``abandoned_replays``,
    logged, remembered), as the next replay of its run would have."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = OutageApi()
    cfg = quick_config(given_up_retry_s=0.05)
    sub = daemon(cfg, fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["abandoned_replays"] == 1, what="raw-1 given up for good")
        assert sub.join(10.0) and len(sub._deferred) == 0
        tries = (1 + cfg.retries) * (1 + cfg.given_up_replays)
        assert sub.stats["failed"] == tries and sub.stats["gave_up"] == 3
        assert sub.stats["revived"] == cfg.given_up_replays
        assert sub._memory.given_up() == [] and K in sub._memory
    finally:
        sub.close()
    with SubmittedRuns(path) as memory:  # given up for good: neither revived nor replayed
        assert memory.given_up() == [] and K in memory


def test_a_plan_given_up_too_long_ago_is_not_tried_again_while_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan given up more than ``given_up_max_age_s`` ago is not tried again by the
    running daemon either: the sample in the beam has likely changed since. Before, it was
    dropped from the daemon's retries without a count or a log; now it is given up for good
    (``abandoned_expired``, logged at ERROR with its run: the alert on plans lost fires)."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = OutageApi()
    sub = daemon(quick_config(given_up_retry_s=0.05, given_up_max_age_s=0.01), fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["gave_up"] == 1, what="raw-1 given up")
        fake.up.set()
        # the count that follows the age check, not the wait's end: it fails if the check does
        wait_for(lambda: sub.stats["abandoned_expired"] == 1, what="raw-1 given up for good")
        assert sub.join(10.0) and sub.stats["revived"] == 0 and fake.items == []
        assert K in sub._memory and sub._memory.given_up() == []
    finally:
        sub.close()
    lost = [r for r in caplog.records if r.levelname == "ERROR" and "for good" in r.message]
    assert len(lost) == 1 and "raw-1" in lost[0].getMessage()


def test_a_plan_refused_at_a_full_queue_is_tried_again_once_there_is_room(
    tmp_path: Path,
) -> None:
    """``max_pending: 1``: raw-3's plan finds the queue full and is given up
    (``gave_up_queue_full``). Once raw-1 and raw-2 went in and ``given_up_retry_s`` passed,
    the running daemon tries raw-3's plan again, without a replay of its run or a restart."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = HeldApi()
    sub = daemon(quick_config(max_pending=1, given_up_retry_s=0.05), fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        assert not sub.enqueue(REC, "raw-3")
        fake.release.set()  # the worker gives raw-3 up (counted once remembered)
        wait_for(lambda: len(fake.items) == 3, what="raw-3 tried again")
        assert sub.stats["gave_up_queue_full"] == 1
        assert sub.join(10.0)
        assert queued_runs(fake) == ["raw-1", "raw-2", "raw-3"]
        assert sub.stats["revived"] == 1 and sub._memory.given_up() == []
    finally:
        fake.release.set()
        sub.close()


def test_a_plan_tried_again_while_running_waits_for_its_slot_in_the_rate(tmp_path: Path) -> None:
    """The submitter's clock (the rate's, and the wait before a plan given up is tried
    again) moves only when the test moves it. raw-1's plan is given up in an outage; the
    server is back and raw-2's plan goes in (the slot held for ``min_interval_s``). When
    raw-1's plan is tried again, it waits for its slot like a retry, and goes in once the
    interval has passed: one rate, whichever path queues a plan."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = OutageApi()
    now = [0.0]
    cfg = quick_config(min_interval_s=100.0, given_up_retry_s=10.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake, clock=lambda: now[0], memory=path)
    try:
        assert sub.enqueue(REC, "raw-1")
        # the count comes before the plan is remembered and set to wait: wait for the wait
        wait_for(lambda: len(sub._deferred) == 1, what="raw-1 given up, to try again")
        assert sub.stats["gave_up"] == 1
        fake.up.set()
        assert sub.submit(REC, raw_uid="raw-2") is not None
        now[0] = 50.0  # raw-1's wait is over, raw-2's slot is not
        wake(sub._queue)
        wait_for(lambda: sub.stats["revived"] == 1, what="raw-1 tried again")
        assert queued_runs(fake) == ["raw-2"], "raw-1's plan went in past the rate"
        now[0] = 101.0
        wake(sub._queue)
        wait_for(lambda: queued_runs(fake) == ["raw-2", "raw-1"], what="raw-1 in its slot")
        assert sub.join(10.0) and sub.stats["submitted"] == 2
    finally:
        sub.close()


@pytest.mark.parametrize(
    ("knobs", "outcome"),
    [
        ({"given_up_max_age_s": 1e-3}, "abandoned_expired"),
        ({"restart_retries": 0}, "abandoned_restarts"),
    ],
)
def test_a_plan_a_restart_will_not_try_again_is_counted_lost(
    tmp_path: Path, knobs: dict[str, float], outcome: str
) -> None:
    """The last daemon gave raw-1's plan up; this one finds it too old, or tried in its
    restarts already. Before, the plan was forgotten with a warning in the log only: no
    count, so the plans-lost alert never saw it. Now it is counted given up for good."""
    path = tmp_path / "store" / SUBMITTED_FILE
    give_up_plan(quick_config(), path, REC)
    sub = daemon(quick_config(**knobs), OutageApi(), path)
    try:
        assert sub.retry_given_up() == 0
        assert sub.stats[outcome] == 1 and sub.stats["revived"] == 0
    finally:
        sub.close()
    with SubmittedRuns(path) as nxt:
        assert nxt.given_up() == []
