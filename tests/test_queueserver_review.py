"""The queueserver submitter loses no plan it could not send and floods no queue: plans dropped
at close are given up for the next daemon to try again; one rate holds for every path that
queues a plan, retries and revived plans waiting for their slot; a plan given up does not
keep a later replay of its run from trying it again."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from feedback_helpers import REC, FakeApi
from helpers import wait_for
from queueserver_helpers import (
    OutageApi,
    daemon,
    give_up_plan,
    item_raw_uid,
    queued_runs,
    quick_config,
)

from xasflow.adapters.queueserver import QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns

# --------------------------------------------------------------------------- dropped at close


class _ShuttingDown(FakeApi):
    """raw-1 cannot reach the RE Manager; raw-2's request is held until ``release``, then the
    server takes the plan and its reply comes, or is lost (``outcome``); all goes in once
    ``up``."""

    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome
        self.up = False
        self.sending = threading.Event()
        self.release = threading.Event()

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if self.up:
            return super().item_add(item, user, user_group)
        if item_raw_uid(item) == "raw-1":
            raise ConnectionError("RE Manager unreachable")
        self.sending.set()
        assert self.release.wait(20.0)
        reply = super().item_add(item, user, user_group)
        if self.outcome == "lost":
            raise TimeoutError("no reply from the RE Manager")
        return reply


@pytest.mark.parametrize("outcome", ["taken", "lost"])
def test_plans_dropped_at_close_are_tried_again_by_the_next_daemon(
    tmp_path: Path, outcome: str
) -> None:
    """At shutdown raw-1's retry waits its backoff, raw-2's request is with the server and
    raw-3 is queued behind it: close gives up on raw-1 and raw-3 (``dropped_closed``), and
    on raw-2 too if its reply is lost. The next daemon tries each of those again once it
    runs, and queues none twice: raw-2 the server took, whether its reply came or not."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(retry_backoff_s=60.0)
    fake = _ShuttingDown(outcome)
    sub = daemon(cfg, fake, path)
    closing = threading.Thread(target=sub.close, kwargs={"timeout": 0.1})
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["failed"] == 1, what="raw-1's first try")
        assert sub.enqueue(REC, "raw-2")
        assert fake.sending.wait(10.0), "raw-2's try never reached the server"
        assert sub.enqueue(REC, "raw-3")
        closing.start()
        wait_for(lambda: sub._closed, what="close to give up on what is queued")
    finally:
        fake.release.set()
        closing.join(20.0)
    assert not closing.is_alive()
    assert queued_runs(fake) == ["raw-2"]
    dropped = 3 if outcome == "lost" else 2
    assert sub.stats["dropped_closed"] == dropped
    with SubmittedRuns(path) as memory:
        given_up = sorted(plan.key[0] for plan in memory.given_up())
        assert given_up == (
            ["raw-1", "raw-2", "raw-3"] if outcome == "lost" else ["raw-1", "raw-3"]
        )
    fake.up = True
    sub = daemon(cfg, fake, path)
    try:
        assert sub.retry_given_up() == dropped
        assert sub.join(10.0)
        assert sorted(queued_runs(fake)) == ["raw-1", "raw-2", "raw-3"]
        assert sub.stats["skipped_repeat"] == dropped - 2  # raw-2, found in the queue
    finally:
        sub.close()
    sub = daemon(cfg, fake, path)
    try:
        assert sub.retry_given_up() == 0 and sub.join(10.0)
        assert sorted(queued_runs(fake)) == ["raw-1", "raw-2", "raw-3"]
    finally:
        sub.close()


# --------------------------------------------------------------------------- one rate


def _spacing(api: FakeApi) -> list[float]:
    """Seconds between the plans the server took, in order."""
    times = [at for at, _ in api.items]
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_synchronous_submission_keeps_the_rate() -> None:
    """``submit`` puts a plan in the queue as the worker does, so it keeps the same rate: a
    second plan within ``min_interval_s`` of one the server took is not sent
    (``skipped_rate``), whichever path sent the first."""
    fake = FakeApi()
    sub = QueueServerSubmitter(quick_config(min_interval_s=3600.0), api_factory=lambda _: fake)
    try:
        assert sub.submit(REC, raw_uid="raw-1") is not None
        assert sub.submit(REC, raw_uid="raw-2") is None
        assert queued_runs(fake) == ["raw-1"] and sub.stats["skipped_rate"] == 1
    finally:
        sub.close()
    fake = FakeApi()
    sub = QueueServerSubmitter(quick_config(min_interval_s=3600.0), api_factory=lambda _: fake)
    try:
        assert sub.enqueue(REC, "raw-3") and sub.join(10.0)
        assert sub.submit(REC, raw_uid="raw-4") is None
        assert queued_runs(fake) == ["raw-3"] and sub.stats["skipped_rate"] == 1
    finally:
        sub.close()


@contextmanager
def _after_an_outage(
    interval: float, retry_backoff_s: float
) -> Iterator[tuple[OutageApi, QueueServerSubmitter]]:
    """Three runs' plans failed while the RE Manager was down, which is now back: their
    retries (5 each, one plan per ``interval``) are due; the submitter is closed after."""
    fake = OutageApi()
    cfg = quick_config(min_interval_s=interval, retries=5, retry_backoff_s=retry_backoff_s)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    try:
        for i in (1, 2, 3):
            assert sub.enqueue(REC, f"raw-{i}")
        wait_for(lambda: sub.stats["failed"] >= 3, what="the three first tries")
        fake.up.set()
        yield fake, sub
    finally:
        sub.close()


def test_retries_after_an_outage_wait_for_their_slot() -> None:
    """Three runs' plans fail while the RE Manager is down (a failed try holds no slot, so
    all three are accepted); once it is back their retries come due together. They go in
    one per ``min_interval_s``, none dropped by the rate, none given up."""
    interval = 0.4
    with _after_an_outage(interval, retry_backoff_s=0.1) as (fake, sub):
        assert sub.join(20.0)
        assert sorted(queued_runs(fake)) == ["raw-1", "raw-2", "raw-3"]
        assert sub.stats["gave_up"] == 0 and sub.stats["skipped_rate"] == 0
        assert min(_spacing(fake)) >= interval, f"a burst: {_spacing(fake)}"


def test_a_new_plan_waits_behind_the_retries_of_an_outage() -> None:
    """Three runs' plans fail while the RE Manager is down; once it is back their retries go
    in one per ``min_interval_s``. A new run's plan that comes while they hold the slot is
    not skipped for the rate (it is the plan of a run whose advice will not come again): it
    waits its turn behind them (``waited_rate``) and goes in, at the same rate."""
    interval = 0.8
    with _after_an_outage(interval, retry_backoff_s=0.05) as (fake, sub):
        wait_for(lambda: fake.items, what="the first retry in the queue")
        assert sub.enqueue(REC, "raw-new"), "the new run's plan was skipped for the rate"
        assert sub.join(20.0)
        assert sorted(queued_runs(fake)) == ["raw-1", "raw-2", "raw-3", "raw-new"]
        assert queued_runs(fake)[0] != "raw-new"
        assert sub.stats["skipped_rate"] == 0 and sub.stats["waited_rate"] == 1
        assert sub.stats["gave_up"] == 0 and sub.stats["submitted"] == 4
        assert min(_spacing(fake)) >= interval, f"a burst: {_spacing(fake)}"


def test_plans_revived_after_a_restart_keep_the_rate(tmp_path: Path) -> None:
    """A restart after an outage revives the plans the last daemon gave up: they go in one
    per ``min_interval_s``, not as a burst of up to ``max_pending``."""
    path = tmp_path / "store" / SUBMITTED_FILE
    down = OutageApi()
    sub = daemon(quick_config(retries=0), down, path)
    try:
        for i in (1, 2, 3):
            assert sub.enqueue(REC, f"raw-{i}")
        assert sub.join(10.0) and sub.stats["gave_up"] == 3
    finally:
        sub.close()
    interval = 0.4
    fake = FakeApi()
    sub = daemon(quick_config(min_interval_s=interval), fake, path)
    try:
        assert sub.retry_given_up() == 3
        assert sub.join(20.0)
        assert sorted(queued_runs(fake)) == ["raw-1", "raw-2", "raw-3"]
        assert min(_spacing(fake)) >= interval, f"a burst: {_spacing(fake)}"
    finally:
        sub.close()


# --------------------------------------------------------------------------- a replay


class _LostThenDown(FakeApi):
    """Takes the first plan but its reply is lost, then cannot be reached until ``up``."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if not self.items:
            super().item_add(item, user, user_group)
            raise TimeoutError("no reply from the RE Manager")
        return super().item_add(item, user, user_group)

    def queue_get(self, **kwargs: Any) -> dict[str, Any]:
        if self.items and not self.up:
            raise ConnectionError("RE Manager unreachable")
        return super().queue_get(**kwargs)


def test_a_replay_tries_a_plan_given_up_in_this_process_again(tmp_path: Path) -> None:
    """raw-1's plan is given up while the RE Manager is down; Kafka redelivers the run in the
    same process. The replay tries the plan again with its own bounded tries (given up again
    while the server is still down), and it goes in once the server is back; later replays
    queue nothing more, nor does the next daemon."""
    path = tmp_path / "store" / SUBMITTED_FILE
    down = OutageApi()
    sub = daemon(quick_config(retries=1), down, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert sub.join(10.0) and sub.stats["gave_up"] == 1 and sub.stats["failed"] == 2
        assert sub.enqueue(REC, "raw-1"), "the replay was skipped as a repeat"
        assert sub.join(10.0) and sub.stats["gave_up"] == 2 and sub.stats["failed"] == 4
        down.up.set()
        assert sub.enqueue(REC, "raw-1") and sub.join(10.0)
        assert queued_runs(down) == ["raw-1"] and sub.stats["submitted"] == 1
        assert not sub.enqueue(REC, "raw-1") and sub.join(10.0)
        assert queued_runs(down) == ["raw-1"] and sub.stats["skipped_repeat"] == 1
    finally:
        sub.close()
    sub = daemon(quick_config(), down, path)
    try:
        assert sub.retry_given_up() == 0 and not sub.enqueue(REC, "raw-1")
        assert sub.join(10.0) and queued_runs(down) == ["raw-1"]
    finally:
        sub.close()


def test_a_replay_never_queues_twice_a_given_up_plan_the_server_took() -> None:
    """The server took raw-1's plan but its reply was lost, and the retry could not reach it:
    given up. A replay of the run, once the server is back, finds the plan in the queue and
    queues nothing more."""
    fake = _LostThenDown()
    sub = QueueServerSubmitter(quick_config(retries=1), api_factory=lambda _: fake)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert sub.join(10.0) and sub.stats["gave_up"] == 1
        fake.up = True
        assert sub.enqueue(REC, "raw-1"), "the replay was skipped as a repeat"
        assert sub.join(10.0) and sub.stats["skipped_repeat"] == 1
        assert queued_runs(fake) == ["raw-1"], "the plan the server took was queued twice"
    finally:
        sub.close()


def test_plans_revived_while_the_worker_idles_are_sent(tmp_path: Path) -> None:
    """A replayed run's plan can go in before the daemon calls ``retry_given_up`` (its input
    starts first): the worker then idles, waiting for the next run's plan. The revived plans
    wake it and go in without waiting for that."""
    path = tmp_path / "store" / SUBMITTED_FILE
    give_up_plan(quick_config(retries=0), path, REC)
    fake = FakeApi()
    sub = daemon(quick_config(), fake, path)
    try:
        assert sub.enqueue(REC, "raw-2") and sub.join(10.0)
        assert sub.retry_given_up() == 1
        assert sub.join(10.0), "the revived plan waits for the next run's plan"
        assert queued_runs(fake) == ["raw-2", "raw-1"]
    finally:
        sub.close()
