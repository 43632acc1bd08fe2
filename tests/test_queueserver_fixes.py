"""The queueserver submitter's rate limit and its memory of submitted plans: only a plan that
reached the queue counts against the rate; a plan given up is tried again after a restart;
the memory's record is durable before a submission counts as done; one daemon a memory."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_feedback_safety import REC, ZMQ_KEY, FakeApi

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter


def _raw_uid(item: dict[str, Any]) -> str:
    return str(item["kwargs"]["md"]["xasflow"]["raw_uid"])


# --------------------------------------------------------------------------- the rate


class _Held(FakeApi):
    """Holds raw-1's item_add until ``release``, then refuses it or takes it (``outcome``)."""

    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome
        self.sending = threading.Event()
        self.release = threading.Event()

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if _raw_uid(item) == "raw-1":
            self.sending.set()
            self.release.wait(10.0)
            if self.outcome == "refused":
                return {"success": False, "msg": "RE Manager busy"}
        return super().item_add(item, user, user_group)


@pytest.mark.parametrize("outcome", ["refused", "taken"])
def test_only_a_plan_that_reached_the_queue_counts_against_the_rate(outcome: str) -> None:
    """The next run's advice comes while raw-1's try is still with the server. Refused (and
    given up: no retries), raw-1 put nothing in the queue, so raw-2's plan goes in; taken,
    raw-1's plan holds the slot and raw-2's is rate-limited. Either way the slot is held
    after a plan went in (raw-3)."""
    fake = _Held(outcome)
    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=3600.0, retries=0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert fake.sending.wait(10.0), "raw-1's try never reached the server"
        sub.enqueue(REC, "raw-2")  # raw-1's outcome is not known yet
        fake.release.set()
        assert sub.join(10.0)
        queued = [_raw_uid(item) for _, item in fake.items]
        if outcome == "refused":
            assert queued == ["raw-2"], f"queued {queued}: raw-1's refused try held the slot"
            assert sub.stats["skipped_rate"] == 0 and sub.stats["gave_up"] == 1
        else:
            assert queued == ["raw-1"] and sub.stats["skipped_rate"] == 1
        skipped = sub.stats["skipped_rate"]
        assert not sub.enqueue(REC, "raw-3") and sub.stats["skipped_rate"] == skipped + 1
    finally:
        sub.close()
