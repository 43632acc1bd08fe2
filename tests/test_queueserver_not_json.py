"""Recommendations whose values JSON cannot write (numpy scalars and arrays, from an
analysis run's event data): their plans reach the server and the memory as plain Python,
and one that stays unwritable is refused with a count and a log line, never forgotten
unseen."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from feedback_helpers import REC, FakeApi
from queueserver_helpers import OutageApi, daemon, queued_runs, quick_config

from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns


class JsonApi(FakeApi):
    """An RE Manager client that writes each request as JSON, as the real ones do (0MQ and
    HTTP): a value JSON cannot write raises ``TypeError`` before anything is sent."""

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        return super().item_add(json.loads(json.dumps(item)), user, user_group)


def _numpy_rec() -> dict[str, Any]:
    """REC as an analysis run's event data may hold it: numpy scalars and an array."""
    rec = copy.deepcopy(REC)
    for region in rec["regions"]:
        region["start"], region["dwell"] = np.float32(region["start"]), np.float32(0.5)
    rec["e0"] = np.float32(8983.5)
    rec["uncertainty"] = np.array([0.25, 0.75])  # an interval
    return rec


def test_a_plan_with_numpy_values_reaches_the_server_as_plain_python(tmp_path: Path) -> None:
    """Before, the plan item carried the numpy values: the client could not write it, each
    try failed and the plan was given up. Now they are plain Python: it goes in at once."""
    fake = JsonApi()
    sub = daemon(quick_config(), fake, tmp_path / "store" / SUBMITTED_FILE)
    try:
        assert sub.enqueue(_numpy_rec(), "raw-1") and sub.join(10.0)
        assert sub.stats["submitted"] == 1 and sub.stats["failed"] == 0
        assert queued_runs(fake) == ["raw-1"]
        md = fake.items[0][1]["kwargs"]["md"]["xasflow"]
        assert md["e0"] == 8983.5 and md["uncertainty"] == [0.25, 0.75]
    finally:
        sub.close()


def test_a_plan_with_numpy_values_given_up_is_remembered(tmp_path: Path) -> None:
    """The RE Manager is down: the plan is given up. Before, its ``gave_up`` line could not
    be written (a numpy array), only a warning said so, and it was counted ``gave_up`` all
    the same: neither a replay nor the next daemon knew of it. Now it is remembered, plain."""
    path = tmp_path / "store" / SUBMITTED_FILE
    sub = daemon(quick_config(retries=0, given_up_retry_s=0.0), OutageApi(), path)
    try:
        assert sub.enqueue(_numpy_rec(), "raw-1") and sub.join(10.0)
        assert sub.stats["gave_up"] == 1
    finally:
        sub.close()
    with SubmittedRuns(path) as memory:
        (plan,) = memory.given_up()
    assert plan.key == ("raw-1", "run_end")
    assert plan.rec["uncertainty"] == [0.25, 0.75] and plan.rec["e0"] == 8983.5
    assert plan.rec["regions"][0]["dwell"] == 0.5


def test_a_plan_json_cannot_write_is_refused_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value no conversion makes plain (here a set) in what the plan carries: no client
    could send it, nor the memory keep it. Before, it was accepted, failed each try, was
    counted ``gave_up`` and forgotten (a warning). Now it is refused at once, counted
    ``abandoned_not_json`` (a plan lost: the plans-lost alert sees it) and logged at ERROR
    with its run."""
    path = tmp_path / "store" / SUBMITTED_FILE
    rec = dict(REC, bundle_id={"cu-k"})
    fake = JsonApi()
    sub = daemon(quick_config(), fake, path)
    try:
        with caplog.at_level(logging.ERROR, logger="xasflow.adapters.queueserver"):
            assert not sub.enqueue(rec, "raw-1")
        assert sub.join(10.0) and fake.items == []
        assert sub.stats["abandoned_not_json"] == 1 and sub.stats["gave_up"] == 0
        assert sub.stats["failed"] == 0
    finally:
        sub.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("raw-1" in m and "JSON" in m for m in errors), errors


def test_a_plan_no_server_takes_is_counted_at_each_replay_and_sends_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan whose regions no beamline should run (more than ``max_points`` points) is
    refused before anything is sent, at each replay of its run: one local refusal a replay,
    no retry, no request, nothing remembered (a later ``max_points`` may take it). Before,
    that refusal was only a warning, counted nowhere. Now each is ``refused_invalid``."""
    rec = copy.deepcopy(REC)
    rec["regions"][0]["step"] = 1e-6
    path = tmp_path / "store" / SUBMITTED_FILE
    fake = FakeApi()
    sub = daemon(quick_config(), fake, path)
    try:
        with caplog.at_level(logging.WARNING, logger="xasflow.adapters.queueserver_worker"):
            for _ in range(3):  # the run's stop, then two replays
                assert sub.enqueue(rec, "raw-1") and sub.join(10.0)
        assert sub.stats["refused_invalid"] == 3 and fake.items == []
        assert sub.stats["retried"] == 0 and sub.stats["gave_up"] == 0
    finally:
        sub.close()
    assert sum("more than 5000 points" in r.getMessage() for r in caplog.records) == 3
    with SubmittedRuns(path) as memory:
        assert memory.given_up() == [] and memory.keys() == []
