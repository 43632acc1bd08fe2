"""A run's plan this process holds queued, under way or waiting for a retry is not sent again
by another path, nor by a replay once many newer runs came: ``submit()`` and the background
queue see each other's plans, without the server's record (a fake that cannot be asked)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from feedback_helpers import REC
from queueserver_helpers import UnaskedApi, queued_runs, quick_config

from xasflow.adapters import queueserver_worker
from xasflow.adapters.queueserver import QueueServerSubmitter


def test_submit_skips_a_run_whose_plan_is_queued_in_the_background() -> None:
    """raw-1's background plan is with the server and raw-2's is queued behind it when an
    operator's script calls ``submit()`` for each run. Before, ``submit()`` looked only at
    the server (and waited for raw-1's request to ask it): a server that does not say what
    it holds took both plans twice. Now each call returns None at once (``skipped_repeat``)
    and each plan goes in once."""
    fake = UnaskedApi()
    sub = QueueServerSubmitter(quick_config(), api_factory=lambda _: fake)
    replies: list[Any] = []
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2")
        script = threading.Thread(
            target=lambda: replies.extend(sub.submit(REC, raw_uid=r) for r in ("raw-1", "raw-2"))
        )
        script.start()
        fake.release.set()
        script.join(20.0)
        assert not script.is_alive() and sub.join(10.0)
        assert replies == [None, None] and sub.stats["skipped_repeat"] == 2
        assert queued_runs(fake) == ["raw-1", "raw-2"]
    finally:
        fake.release.set()
        sub.close()


def test_a_run_whose_plan_submit_is_sending_is_not_queued_in_the_background() -> None:
    """``submit()`` is sending raw-1's plan when the run's stop would queue it in the
    background: the enqueue is refused (``skipped_repeat``). Before, it was accepted, and its
    try, waiting for ``submit()``'s request to end, sent the plan a second time."""
    fake = UnaskedApi()
    sub = QueueServerSubmitter(quick_config(), api_factory=lambda _: fake)
    replies: list[Any] = []
    script = threading.Thread(target=lambda: replies.append(sub.submit(REC, raw_uid="raw-1")))
    try:
        script.start()
        assert fake.sending.wait(10.0), "submit()'s request never reached the server"
        assert not sub.enqueue(REC, "raw-1")
        assert sub.stats["skipped_repeat"] == 1
        fake.release.set()
        script.join(20.0)
        assert not script.is_alive() and sub.join(10.0)
        assert replies[0]["success"] is True and queued_runs(fake) == ["raw-1"]
    finally:
        fake.release.set()
        script.join(20.0)
        sub.close()


def test_a_run_whose_plan_is_under_way_stays_held_past_the_count_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runs held as queued are trimmed to the newest ``_REMEMBERED`` (here 2). raw-1's
    plan is with the server when raw-2's and raw-3's are queued behind it. Before, the
    trim dropped raw-1 while it was under way, and its run's replay was queued again and
    sent twice. Now only settled runs are trimmed: the replay is skipped."""
    monkeypatch.setattr(queueserver_worker, "_REMEMBERED", 2)
    fake = UnaskedApi()
    sub = QueueServerSubmitter(quick_config(), api_factory=lambda _: fake)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        assert sub.enqueue(REC, "raw-2") and sub.enqueue(REC, "raw-3")
        assert not sub.enqueue(REC, "raw-1"), "raw-1's replay was queued while it was sent"
        assert not sub.enqueue(REC, "raw-2"), "raw-2's replay was queued while it waited"
        fake.release.set()
        assert sub.join(10.0) and queued_runs(fake) == ["raw-1", "raw-2", "raw-3"]
        assert sub.enqueue(REC, "raw-4") and sub.join(10.0)
        assert len(sub._queued) == 2, "settled runs are trimmed as before"
    finally:
        fake.release.set()
        sub.close()
