"""Submitting recommended scans to bluesky-queueserver without a server: off by default,
credentials required, the plan item, the document callback, retries and close against a
test double (a real RE Manager receives the plans in test_queueserver_server)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for
from pydantic import ValidationError
from queueserver_helpers import REC, ROWS, advice_run_docs

from xasflow.adapters.queueserver import (
    QueueServerConfig,
    QueueServerSubmitter,
    plan_item,
    region_points,
)

# --------------------------------------------------------------------------- no server


def test_disabled_by_default_submits_nothing() -> None:
    def factory(_: QueueServerConfig) -> Any:
        raise AssertionError("a disabled submitter must not connect")

    sub = QueueServerSubmitter(api_factory=factory)
    assert not sub.enabled
    assert sub.submit(REC, raw_uid="r1") is None
    assert sub.enqueue(REC, "r1") is False
    sub("start", {"uid": "a1", "analysis": "xasflow", "raw_uid": "r1"})
    sub("stop", {"run_start": "a1"})
    assert sub.stats["skipped_disabled"] == 2 and sub.stats["submitted"] == 0
    sub.close()


def test_enabled_without_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="zmq_public_key"):
        QueueServerConfig(enabled=True, transport="zmq")
    with pytest.raises(ValidationError, match="api_key nor token"):
        QueueServerConfig(enabled=True, transport="http")
    with pytest.raises(ValidationError, match="not both"):
        QueueServerConfig(enabled=True, transport="http", api_key="k", token="t")
    cfg = QueueServerConfig(enabled=True, transport="http", api_key="secret-key")
    assert "secret-key" not in repr(cfg)  # credentials never end up in logs


def test_plan_item_and_points() -> None:
    cfg = QueueServerConfig(
        plan_name="sample_scan", detectors=["det1"], motor="motor", extra_kwargs={"sample": "CuO"}
    )
    item = plan_item(cfg, REC, raw_uid="raw-1")
    assert item["name"] == "sample_scan" and item["item_type"] == "plan"
    assert item["kwargs"]["regions"] == ROWS
    assert item["kwargs"]["detectors"] == ["det1"] and item["kwargs"]["motor"] == "motor"
    assert item["kwargs"]["sample"] == "CuO"
    assert item["kwargs"]["md"]["xasflow"]["raw_uid"] == "raw-1"
    assert item["kwargs"]["md"]["xasflow"]["kind"] == "scan"
    energies, dwells = region_points(ROWS)
    assert len(energies) == 25 + 41 and energies[0] == 8978.0 and energies[-1] == 9100.0
    assert dwells[0] == 2.0 and dwells[-1] == 0.5
    with pytest.raises(ValueError, match="no rescan"):
        plan_item(cfg, REC, rescan_only=True)
    rescan = dict(REC, rescan=dict(REC["regions"][0], dwell=6.0))
    # a stream row carries JSON strings; both shapes are accepted
    row = {k: json.dumps(v) if k in ("regions", "rescan") else v for k, v in rescan.items()}
    item = plan_item(cfg, row, rescan_only=True)
    assert item["kwargs"]["regions"] == [[8978.0, 8990.0, 0.5, 6.0]]
    with pytest.raises(ValueError, match="step > 0"):
        region_points([[1.0, 2.0, 0.0, 1.0]])


class FakeApi:
    """Records item_add calls like REManagerAPI."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.closed = False

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        self.items.append({"item": item, "user": user, "user_group": user_group})
        return {"success": True, "msg": "", "item": dict(item, item_uid=f"u{len(self.items)}")}

    def close(self) -> None:
        self.closed = True


def test_document_callback_submits_at_run_end_and_rate_limits() -> None:
    fake = FakeApi()
    now = [100.0]
    cfg = QueueServerConfig(
        enabled=True,
        zmq_public_key="x" * 40,
        detectors=["det1"],
        motor="motor",
        min_interval_s=30.0,
    )
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake, clock=lambda: now[0])
    try:
        for name, doc in advice_run_docs(stop_early=False):
            sub(name, doc)
        assert sub.join(5.0)
        assert len(fake.items) == 1
        added = fake.items[0]
        assert added["user"] == "xasflow" and added["user_group"] == "primary"
        assert added["item"]["kwargs"]["regions"] == ROWS
        assert added["item"]["kwargs"]["md"]["xasflow"]["raw_uid"] == "raw-1"
        for name, doc in advice_run_docs(False, "raw-2"):  # a second run within 30 s: rate-limited
            sub(name, doc)
        assert sub.join(5.0) and len(fake.items) == 1 and sub.stats["skipped_rate"] == 1
        now[0] += 31.0
        for name, doc in advice_run_docs(True, "raw-3"):  # certain answer: nothing to measure
            sub(name, doc)
        assert sub.join(5.0) and len(fake.items) == 1 and sub.stats["skipped_certain"] == 1
    finally:
        sub.close()
    assert fake.closed and sub._worker is None


def test_a_raw_run_gets_its_plan_once_and_only_after_a_successful_stop() -> None:
    """A run aborted (a daemon's shutdown closes open runs so), failed or replayed (Kafka
    redelivers it after a restart) queues nothing more; a rescan goes once per region."""
    fake = FakeApi()
    cfg = QueueServerConfig(enabled=True, zmq_public_key="x" * 40, min_interval_s=0.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    rescan = json.dumps(dict(REC["regions"][0], dwell=6.0))
    try:
        for status in ("abort", "fail"):
            for name, doc in advice_run_docs(False, "raw-A", exit_status=status):
                sub(name, doc)
        assert sub.join(5.0) and fake.items == [] and sub.stats["skipped_not_success"] == 2
        for _ in range(2):  # the run's own stop, then its replay
            for name, doc in advice_run_docs(False, "raw-A"):
                sub(name, doc)
        assert sub.join(5.0) and len(fake.items) == 1 and sub.stats["skipped_repeat"] == 1
        sub.config.submit_on = "rescan"
        for _ in range(3):  # the same region advised for rescan by three spectra
            for name, doc in advice_run_docs(False, "raw-B", rescan=rescan):
                sub(name, doc)
        assert sub.join(5.0) and len(fake.items) == 2 and sub.stats["skipped_repeat"] == 3
        assert fake.items[1]["item"]["kwargs"]["md"]["xasflow"]["raw_uid"] == "raw-B"
    finally:
        sub.close()


def test_a_failed_submission_does_not_hold_back_the_next_run() -> None:
    """A refused try frees the rate slot: the next run's plan goes in while the refused one
    waits for its retry, which goes in after it once the slot is free again (a retry waits
    for its slot in the rate, it is not dropped)."""

    class Refusing(FakeApi):
        def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
            if not self.items and not getattr(self, "refused", False):
                self.refused = True
                return {"success": False, "msg": "RE Manager busy"}
            taken.append(time.monotonic())
            return super().item_add(item, user, user_group)

    taken: list[float] = []
    fake = Refusing()
    interval = 1.5
    cfg = QueueServerConfig(
        enabled=True, zmq_public_key="x" * 40, min_interval_s=interval, retry_backoff_s=1.0
    )
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    try:
        for name, doc in advice_run_docs(False, "raw-1"):
            sub(name, doc)
        wait_for(lambda: sub.stats["failed"] == 1, what="raw-1's refusal")
        for name, doc in advice_run_docs(False, "raw-2"):
            sub(name, doc)
        assert sub.join(10.0)
        assert sub.stats["skipped_rate"] == 0 and sub.stats["retried"] == 1
        queued = [i["item"]["kwargs"]["md"]["xasflow"]["raw_uid"] for i in fake.items]
        assert queued == ["raw-2", "raw-1"]
        assert taken[1] - taken[0] >= interval, "raw-1's retry did not wait for its slot"
    finally:
        sub.close()


def test_a_try_whose_reply_was_lost_is_not_queued_twice() -> None:
    """The server took the plan but its reply never came (a timeout): the retry finds the
    plan in the queue (by ``md.xasflow``) and queues nothing more."""

    class LostReply(FakeApi):
        def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
            super().item_add(item, user, user_group)
            if len(self.items) == 1:
                raise TimeoutError("no reply from the RE Manager")
            return {"success": True, "msg": "", "item": item}

        def queue_get(self, **kwargs: Any) -> dict[str, Any]:
            return {"success": True, "items": [i["item"] for i in self.items]}

        def history_get(self, **kwargs: Any) -> dict[str, Any]:
            return {"success": True, "items": []}

    fake = LostReply()
    cfg = QueueServerConfig(enabled=True, zmq_public_key="x" * 40, retry_backoff_s=0.05)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    try:
        for name, doc in advice_run_docs(False, "raw-lost"):
            sub(name, doc)
        assert sub.join(10.0)
        assert len(fake.items) == 1 and sub.stats["retried"] == 1
        assert sub.stats["skipped_repeat"] == 1 and sub.stats["gave_up"] == 0
    finally:
        sub.close()


def test_close_does_not_wait_for_a_retry() -> None:
    """A retry waiting its backoff when close() begins is dropped (counted), close returns
    without waiting for it, and the worker that would send it has ended."""

    class Down(FakeApi):
        def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
            self.items.append({"item": item, "user": user, "user_group": user_group})
            raise ConnectionError("RE Manager unreachable")

    fake = Down()
    cfg = QueueServerConfig(enabled=True, zmq_public_key="x" * 40, retry_backoff_s=60.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    assert sub.enqueue(REC, "raw-down")
    wait_for(lambda: sub.stats["failed"] == 1, what="the first try")
    worker = sub._worker
    assert worker is not None
    began = time.monotonic()
    sub.close(timeout=5.0)
    assert time.monotonic() - began < 4.0 and not worker.is_alive()
    assert len(fake.items) == 1 and sub.stats["retried"] == 0
    assert sub.stats["dropped_closed"] == 1 and sub.stats["gave_up"] == 0


def test_the_memory_of_queued_plans_is_bounded_and_reads_past_a_torn_line(
    tmp_path: Path,
) -> None:
    """The newest ``limit`` keys are kept; the file is rewritten at twice the limit; a line
    torn by a crash is skipped and the next one still reads back after a restart (each
    memory closed before the next opens the file: one holder at a time)."""
    from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns

    path = tmp_path / "store" / SUBMITTED_FILE
    memory = SubmittedRuns(path, limit=3)
    for i in range(6):
        memory.add((f"raw-{i}", "run_end"))
    newest = [(f"raw-{i}", "run_end") for i in (3, 4, 5)]
    assert memory.keys() == newest and len(path.read_text().splitlines()) == 3
    memory.close()
    with path.open("a") as f:
        f.write('["raw-torn", "run_e')  # the process died while writing
    again = SubmittedRuns(path, limit=3)
    assert again.keys() == newest
    again.add(("raw-6", "rescan edge"))
    again.close()
    with SubmittedRuns(path, limit=3) as last:
        assert last.keys() == [*newest[1:], ("raw-6", "rescan edge")]
