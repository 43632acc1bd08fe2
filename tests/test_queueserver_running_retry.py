"""The running daemon's retries of plans given up: a plan another path wanted while
``submit()`` held it is not lost when that ``submit()`` fails, and no plan is dropped
from those retries without a count."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
from feedback_helpers import REC
from helpers import wait_for
from queueserver_helpers import (
    OutageApi,
    daemon,
    give_up_plan,
    item_raw_uid,
    queued_runs,
    quick_config,
    submit_on_a_thread,
)

from xasflow.adapters.queueserver import QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE
from xasflow.adapters.queueserver_pending import Deferred, Job, wake

K = ("raw-1", "run_end")


class _HeldOutage(OutageApi):
    """An RE Manager that cannot be reached until ``up``; raw-1's try while it is down is
    held (``sending`` set) until ``release``, then fails like the others."""

    def __init__(self) -> None:
        super().__init__()
        self.sending = threading.Event()
        self.release = threading.Event()

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if not self.up.is_set() and item_raw_uid(item) == "raw-1":
            self.sending.set()
            assert self.release.wait(20.0)
        return super().item_add(item, user, user_group)


@pytest.mark.parametrize("wanted_by", ["run_stop", "retry_given_up"])
def test_a_plan_wanted_while_a_failing_submit_held_it_is_given_up_not_lost(
    tmp_path: Path, wanted_by: str
) -> None:
    """The RE Manager is down and ``submit()`` for raw-1 is with it when another path wants
    raw-1's plan: the run's stop (its enqueue is refused, ``skipped_repeat``) or, after a
    restart, ``retry_given_up`` (it leaves the plan to ``submit()``, its round used).
    ``submit()``'s try then fails. Before, it only let go of the plan: nothing gave it up
    or tried it again, and the running daemon never queued it. Now the plan another path
    wanted is given up (remembered, ``gave_up``) and the running daemon tries it again
    after ``given_up_retry_s``: with the server back, it goes in, once."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(retries=0, given_up_retry_s=0.05)
    if wanted_by == "retry_given_up":
        give_up_plan(cfg, path, REC)
    fake = _HeldOutage()
    sub = daemon(cfg, fake, path)
    sending, errors = submit_on_a_thread(sub, REC)
    try:
        sending.start()
        assert fake.sending.wait(10.0), "submit()'s try never reached the server"
        if wanted_by == "run_stop":
            assert not sub.enqueue(REC, "raw-1") and sub.stats["skipped_repeat"] == 1
        else:
            assert sub.retry_given_up() == 0
        gave_up = sub.stats["gave_up"]
        fake.release.set()
        sending.join(20.0)
        assert not sending.is_alive() and len(errors) == 1
        assert [plan.key for plan in sub._memory.given_up()] == [K], "raw-1's plan was lost"
        assert len(sub._deferred) == 1 and sub.stats["gave_up"] == gave_up + 1
        fake.up.set()
        wait_for(lambda: queued_runs(fake) == ["raw-1"], what="raw-1 tried again")
        assert sub.join(10.0) and sub._memory.given_up() == [] and K in sub._memory
    finally:
        fake.release.set()
        sending.join(20.0)
        sub.close()
    assert queued_runs(fake) == ["raw-1"]


def test_a_plan_given_up_comes_due_at_its_time_whatever_was_given_up_before_it() -> None:
    """A plan whose retries were spent waits ``max(given_up_retry_s, retry_backoff_s *
    2**retries)`` before it is tried again, one put back for room ``given_up_retry_s``:
    the waits differ, so a plan set later may come due first. Before, :class:`Deferred`
    kept them in the order they were set and stopped at the first not due: raw-2's plan,
    due at 10 s, waited behind raw-1's, due at 100 s. Now each comes due at its time, the
    earliest first."""
    now = [0.0]
    deferred = Deferred(lambda: now[0], most=8)
    job: Job = ({}, None, False)
    deferred.add(("raw-1", "run_end"), job, 100.0)
    deferred.add(("raw-2", "run_end"), job, 10.0)
    deferred.add(("raw-3", "run_end"), job, 5.0)
    deferred.add(("raw-1", "run_end"), job, 50.0)  # set again: its earlier time is gone
    assert deferred.due_in() == 5.0 and len(deferred) == 3
    now[0] = 10.0
    assert [key for key, _ in deferred.take_due()] == [("raw-3", "run_end"), ("raw-2", "run_end")]
    assert deferred.due_in() == 40.0 and deferred.take_due() == []
    now[0] = 50.0
    assert [key for key, _ in deferred.take_due()] == [("raw-1", "run_end")]
    assert deferred.due_in() is None and len(deferred) == 0


def test_the_plans_given_up_past_most_forget_the_oldest_set() -> None:
    """Past ``most``, the plan set longest ago is forgotten here, whatever its time (it stays
    given up in the memory, for a replay or the next daemon)."""
    now = [0.0]
    deferred = Deferred(lambda: now[0], most=2)
    job: Job = ({}, None, False)
    deferred.add(("raw-1", "run_end"), job, 1.0)
    deferred.add(("raw-2", "run_end"), job, 30.0)
    deferred.add(("raw-3", "run_end"), job, 20.0)
    assert len(deferred) == 2 and deferred.due_in() == 20.0
    now[0] = 30.0
    assert [key for key, _ in deferred.take_due()] == [("raw-3", "run_end"), ("raw-2", "run_end")]


def test_an_error_while_looking_at_the_plans_given_up_leaves_the_worker_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submitter's clock moves only when the test moves it. raw-1's and raw-2's plans
    are given up in an outage (due again at 10 s and 15 s); the look at raw-1's raises.
    Before, the error ended the worker thread (the look runs in its wait for the next job),
    so nothing tried raw-2's plan again until a new run's plan came. Now the error is logged
    and counted (``deferred_errors``) and the worker goes on: raw-2's plan goes in."""
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = OutageApi()
    now = [0.0]
    cfg = quick_config(retries=0, given_up_retry_s=10.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake, clock=lambda: now[0], memory=path)
    spent = sub._memory.retry_spent
    looks: list[tuple[str, str]] = []

    def broken(key: tuple[str, str], replays: int, max_age_s: float) -> str | None:
        looks.append(key)
        if len(looks) == 1:
            raise RuntimeError("injected")
        return spent(key, replays, max_age_s)

    monkeypatch.setattr(sub._memory, "retry_spent", broken)
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: len(sub._deferred) == 1, what="raw-1 given up, to try again")
        now[0] = 5.0
        assert sub.enqueue(REC, "raw-2")
        wait_for(lambda: len(sub._deferred) == 2, what="raw-2 given up, to try again")
        fake.up.set()
        now[0] = 10.0
        wake(sub._queue)
        wait_for(lambda: sub.deferred_errors == 1, what="the look at raw-1's plan")
        assert looks == [K] and sub.stats["revived"] == 0
        now[0] = 15.0
        wake(sub._queue)
        wait_for(lambda: queued_runs(fake) == ["raw-2"], what="raw-2 tried again")
        assert sub.join(10.0) and sub.stats["revived"] == 1
        assert [plan.key for plan in sub._memory.given_up()] == [K]  # for a replay, a restart
    finally:
        sub.close()


def test_a_plan_whose_background_try_raised_is_not_held_as_sent() -> None:
    """raw-1's plan asks for more points than any beamline should run: its background try
    raises ``ValueError`` before anything is sent. Before, the run's plan was then held as
    queued, settled, so ``submit()`` for raw-1 answered ``skipped_repeat`` (None) for a
    plan that never reached the server. Now it is not held: ``submit()`` raises the
    ``ValueError`` that says why, and nothing is sent."""
    rec = copy.deepcopy(REC)
    rec["regions"][0]["step"] = 0.001  # 12 eV: 12,000 points
    fake = OutageApi()
    fake.up.set()
    sub = QueueServerSubmitter(quick_config(), api_factory=lambda _: fake)
    try:
        assert sub.enqueue(rec, "raw-1") and sub.join(10.0)
        assert K not in sub._queued
        with pytest.raises(ValueError, match="points"):
            sub.submit(rec, raw_uid="raw-1")
        assert sub.stats["skipped_repeat"] == 0 and fake.items == []
    finally:
        sub.close()


@pytest.mark.parametrize("wanted_by", ["run_stop", "retry_given_up"])
def test_a_plan_the_rate_held_back_while_submit_held_it_waits_for_its_slot_not_given_up(
    tmp_path: Path, wanted_by: str
) -> None:
    """The submitter's clock moves only when the test moves it. raw-0's plan went in (the
    slot held for ``min_interval_s``); ``submit()`` for raw-1 holds raw-1's plan when another
    path wants it (the run's stop, or ``retry_given_up`` after a restart), and the rate holds
    ``submit()``'s try back: nothing was sent, nothing failed. Before, the plan was given up
    (``gave_up``, logged at ERROR, remembered) and tried again only after
    ``given_up_retry_s``, as one of its ``given_up_replays``. Now it waits for its slot
    (``waited_rate``), goes in once the interval has passed, and nothing is given up."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(min_interval_s=100.0, given_up_retry_s=1000.0)
    if wanted_by == "retry_given_up":
        give_up_plan(cfg, path, REC)
    fake = OutageApi()
    fake.up.set()
    now = [0.0]
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake, clock=lambda: now[0], memory=path)
    limited = sub._rate.limited
    wanted: list[object] = []

    def wanted_then_limited() -> bool:  # submit()'s look at the rate, raw-1 held
        if not wanted:
            if wanted_by == "run_stop":
                wanted.append(sub.enqueue(REC, "raw-1"))
            else:
                wanted.append(sub.retry_given_up())
        return limited()

    try:
        assert sub.submit(REC, raw_uid="raw-0") is not None  # the slot is held
        sub._rate.limited = wanted_then_limited  # type: ignore[method-assign]
        assert sub.submit(REC, raw_uid="raw-1") is None and sub.stats["skipped_rate"] == 1
        assert wanted == [False] if wanted_by == "run_stop" else wanted == [0]
        assert sub.stats["gave_up"] == 0 and sub.stats["waited_rate"] == 1
        given_up = [plan.key for plan in sub._memory.given_up()]  # the previous daemon's
        assert given_up == ([] if wanted_by == "run_stop" else [K])
        now[0] = 100.0
        wake(sub._queue)
        wait_for(lambda: queued_runs(fake) == ["raw-0", "raw-1"], what="raw-1 in its slot")
        assert sub.join(10.0) and sub.stats["gave_up"] == 0 and K in sub._memory
    finally:
        sub.close()


@pytest.mark.parametrize("wanted_by", ["run_stop", "retry_given_up"])
@pytest.mark.parametrize("comes_back", [False, True])
def test_a_plan_wanted_while_a_failing_submit_held_it_gets_its_retries(
    tmp_path: Path, wanted_by: str, comes_back: bool
) -> None:
    """As above, with ``retries`` 2: ``submit()``'s try of raw-1's plan fails while another
    path wants the plan. Before, that one try gave the plan up (``gave_up``, no retry): a
    server back a second later had to wait ``given_up_retry_s`` (here never) for it. Now
    ``submit()``'s try counts as the plan's first, and it is retried after the backoff
    (``retried``): with the server back it goes in at the first retry, nothing given up;
    with the server down, after both retries failed, it is given up once."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(retries=2, given_up_retry_s=0.0)
    if wanted_by == "retry_given_up":
        give_up_plan(cfg, path, REC)
    fake = _HeldOutage()
    sub = daemon(cfg, fake, path)
    sending, errors = submit_on_a_thread(sub, REC)
    try:
        sending.start()
        assert fake.sending.wait(10.0), "submit()'s try never reached the server"
        if wanted_by == "run_stop":
            assert not sub.enqueue(REC, "raw-1") and sub.stats["skipped_repeat"] == 1
        else:
            assert sub.retry_given_up() == 0
        fake.release.set()
        sending.join(20.0)
        assert not sending.is_alive() and len(errors) == 1
        if comes_back:
            fake.up.set()
            wait_for(lambda: queued_runs(fake) == ["raw-1"], what="raw-1 at its retry")
            assert sub.join(10.0) and K in sub._memory and sub._memory.given_up() == []
            assert sub.stats["gave_up"] == 0 and sub.stats["retried"] == 1
            assert sub.stats["failed"] == 1 and sub.stats["submitted"] == 1
        else:
            wait_for(lambda: sub.stats["gave_up"] == 1, what="raw-1 given up")
            assert sub.join(10.0) and sub.stats["retried"] == 2 and sub.stats["failed"] == 3
            assert [plan.key for plan in sub._memory.given_up()] == [K]
            assert K not in sub._queued, "a plan given up is still held as queued"
    finally:
        fake.release.set()
        sending.join(20.0)
        sub.close()
    assert queued_runs(fake) == (["raw-1"] if comes_back else [])
