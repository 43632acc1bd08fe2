"""The queueserver submitter's rate limit and its memory of submitted plans: only a plan that
reached the queue counts against the rate; a plan given up is tried again after a restart;
the memory's record is durable before a submission counts as done; one daemon a memory."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from feedback_helpers import REC, ZMQ_KEY, FakeApi
from helpers import held_elsewhere
from queueserver_helpers import (
    LostReplyApi,
    OutageApi,
    daemon,
    give_up_plan,
    item_raw_uid,
    queued_runs,
    quick_config,
    submit_on_a_thread,
)

from xasflow.adapters.queueserver import (
    QueueServerConfig,
    QueueServerError,
    QueueServerSubmitter,
)
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE, SubmittedRuns

# --------------------------------------------------------------------------- the rate


class _Held(FakeApi):
    """Holds raw-1's item_add until ``release``, then refuses it or takes it (``outcome``)."""

    def __init__(self, outcome: str) -> None:
        super().__init__()
        self.outcome = outcome
        self.sending = threading.Event()
        self.release = threading.Event()

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        if item_raw_uid(item) == "raw-1":
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
        queued = queued_runs(fake)
        if outcome == "refused":
            assert queued == ["raw-2"], f"queued {queued}: raw-1's refused try held the slot"
            assert sub.stats["skipped_rate"] == 0 and sub.stats["gave_up"] == 1
        else:
            assert queued == ["raw-1"] and sub.stats["skipped_rate"] == 1
        skipped = sub.stats["skipped_rate"]
        assert not sub.enqueue(REC, "raw-3") and sub.stats["skipped_rate"] == skipped + 1
    finally:
        sub.close()


# --------------------------------------------------------------------------- plans given up


def test_a_plan_given_up_is_tried_again_after_a_restart(tmp_path: Path) -> None:
    """The RE Manager was down and the run's plan was given up; the daemon restarts with the
    server back, and no replay comes (Kafka committed the run). The restarted daemon tries
    the plan again and it goes in, once: a third daemon (the operator has removed the plan)
    neither revives it nor queues it for a replay of the run."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config()
    give_up_plan(cfg, path, REC)
    fake = FakeApi()
    sub = daemon(cfg, fake, path)
    try:
        assert sub.retry_given_up() == 1
        assert sub.join(10.0)
        assert queued_runs(fake) == ["raw-1"]
        assert sub.stats["revived"] == 1 and sub.stats["submitted"] == 1
    finally:
        sub.close()
    removed = FakeApi()  # the operator removed the plan: the server holds nothing
    sub = daemon(cfg, removed, path)
    try:
        assert sub.retry_given_up() == 0
        assert not sub.enqueue(REC, "raw-1") and sub.stats["skipped_repeat"] == 1
        assert sub.join(10.0) and removed.items == []
    finally:
        sub.close()


def test_a_plan_given_up_is_tried_again_in_a_bounded_number_of_restarts(tmp_path: Path) -> None:
    """``restart_retries: 1``: the first restart tries the plan again (the server still
    down: given up again), the second does not; ``restart_retries: 0`` never does."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(restart_retries=1)
    give_up_plan(cfg, path, REC)
    sub = daemon(cfg, OutageApi(), path)
    try:
        assert sub.retry_given_up() == 1
        assert sub.join(10.0) and sub.stats["gave_up"] == 1
    finally:
        sub.close()
    fake = FakeApi()
    sub = daemon(cfg, fake, path)
    try:
        assert sub.retry_given_up() == 0 and sub.join(10.0) and fake.items == []
    finally:
        sub.close()
    give_up_plan(cfg, path, REC, "raw-2")
    sub = daemon(cfg.model_copy(update={"restart_retries": 0}), fake, path)
    try:
        assert sub.retry_given_up() == 0 and sub.join(10.0) and fake.items == []
    finally:
        sub.close()


def test_a_plan_given_up_long_ago_is_not_tried_again(tmp_path: Path) -> None:
    """A plan given up more than ``given_up_max_age_s`` before the restart is forgotten: the
    sample in the beam has likely changed since."""
    path = tmp_path / SUBMITTED_FILE
    now = [1_000_000.0]
    memory = SubmittedRuns(path, wall=lambda: now[0])
    memory.give_up(("raw-1", "run_end"), {"regions": REC["regions"]}, False)
    memory.give_up(("raw-2", "run_end"), {"regions": REC["regions"]}, False)
    memory.close()
    now[0] += 600.0
    memory = SubmittedRuns(path, wall=lambda: now[0])
    assert [p.key for p in memory.revive(rounds=1, max_age_s=900.0, most=8)] == [
        ("raw-1", "run_end"),
        ("raw-2", "run_end"),
    ]
    memory.close()
    now[0] += 901.0  # the revived ones were not given up again: their date stands
    memory = SubmittedRuns(path, wall=lambda: now[0])
    assert memory.revive(rounds=5, max_age_s=900.0, most=8) == []
    memory.close()
    with SubmittedRuns(path, wall=lambda: now[0]) as forgotten:  # for good: not in the file
        assert forgotten.given_up() == [] and forgotten.revive(5, 1e9, 8) == []


def test_a_given_up_plan_the_server_took_is_not_queued_twice(tmp_path: Path) -> None:
    """The server took the plan but its reply never came, and the only try was given up: the
    restarted daemon finds the plan in the queue and queues nothing more."""

    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(retries=0)
    fake = LostReplyApi()
    sub = daemon(cfg, fake, path)
    try:
        assert sub.enqueue(REC, "raw-1")
        assert sub.join(10.0) and sub.stats["gave_up"] == 1 and len(fake.items) == 1
    finally:
        sub.close()
    fake.lost = False
    sub = daemon(cfg, fake, path)
    try:
        assert sub.retry_given_up() == 1
        assert sub.join(10.0) and sub.stats["skipped_repeat"] == 1
        assert len(fake.items) == 1, "the plan the server took was queued again"
    finally:
        sub.close()


@pytest.mark.parametrize("outcome", ["refused", "taken"])
def test_a_given_up_plan_submit_is_sending_is_not_revived_beside_it(
    tmp_path: Path, outcome: str
) -> None:
    """The last daemon gave raw-1's plan up; in this one, ``submit()`` for raw-1 (a replay)
    is with the server when the daemon asks for the given-up plans to be tried again.
    Before, ``retry_given_up`` held the plan a second time and pushed it as a retry: tried
    by both paths, and, once submit's refused try let go of the hold, by any replay
    beside them. Now a plan held as queued is left to the path holding it: revived 0, one
    try; refused, the plan is not held (a replay may try it again)."""
    path = tmp_path / "store" / SUBMITTED_FILE
    cfg = quick_config(retries=0)
    give_up_plan(cfg, path, REC)
    fake = _Held(outcome)
    sub = daemon(cfg, fake, path)
    sending, errors = submit_on_a_thread(sub, REC)
    try:
        sending.start()
        assert fake.sending.wait(10.0), "submit's try never reached the server"
        assert sub.retry_given_up() == 0, "a plan submit() is sending was revived beside it"
        fake.release.set()
        sending.join(10.0)
        assert not sending.is_alive() and sub.join(10.0)
        assert sub.stats["revived"] == 0 and sub.stats["failed"] == (outcome == "refused")
        assert len(errors) == (outcome == "refused")
        assert queued_runs(fake) == ([] if outcome == "refused" else ["raw-1"])
        replayed = sub.enqueue(REC, "raw-1")  # taken: a repeat; refused: tried again
        assert replayed == (outcome == "refused") and sub.join(10.0)
    finally:
        fake.release.set()
        sub.close()


def test_the_daemon_tries_the_given_up_plans_again_once_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Daemon.start asks its submitter to try the last daemon's given-up plans, once, after
    every part has started (a daemon that fails to start submits nothing)."""
    from helpers import free_port

    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.service import Daemon

    calls: list[int] = []
    monkeypatch.setattr(QueueServerSubmitter, "retry_given_up", lambda self: calls.append(1) or 0)
    cfg = DaemonConfig(
        input={"address": f"tcp://127.0.0.1:{free_port()}"},
        http={"enabled": False},
        output={"enabled": False},
        storage={"enabled": False},  # quick: no store (a memory or not, start asks)
        models={"directory": str(tmp_path)},
        queueserver=quick_config().model_dump(),
    )
    daemon = Daemon(cfg)
    try:
        daemon.start(timeout=20)
        assert calls == [1]
    finally:
        daemon.stop(timeout=10)


# --------------------------------------------------------------------------- durable memory


class _Disk:
    """What a crash would leave of the files fsync'd so far: each file's text at its last
    fsync, and the directories fsync'd (a new file's name is durable once its directory is)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: dict[Path, str] = {}
        self.dirs: list[Path] = []
        fsync = os.fsync

        def recording(fd: int) -> None:
            fsync(fd)
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.is_dir():
                self.dirs.append(path)
            else:
                self.files[path] = path.read_text(encoding="utf-8")

        monkeypatch.setattr(os, "fsync", recording)

    def restart(self, path: Path, into: Path) -> set[tuple[str, str]]:
        """What a daemon holds as queued after a crash now (``path``'s durable text, copied
        into ``into``)."""
        into.mkdir(parents=True, exist_ok=True)
        durable = self.files.get(path, "") if path.parent in self.dirs else ""
        (into / path.name).write_text(durable, encoding="utf-8")
        with SubmittedRuns(into / path.name) as memory:
            return set(memory.keys())


def test_the_record_of_a_submission_is_durable_before_it_counts_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A crash while the server takes the plan leaves the intent on disk: the next daemon
    holds the plan as possibly queued and never queues it again (at most once), and says so;
    a crash once submit returned leaves it queued; a refused try leaves it not queued (a
    replay submits it)."""
    disk = _Disk(monkeypatch)
    path = tmp_path / "store" / SUBMITTED_FILE
    key = ("raw-1", "run_end")
    seen: dict[str, set[tuple[str, str]]] = {}

    class Crashing(FakeApi):
        """Records what a crash at the moment the server takes the plan would leave."""

        def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
            seen[item_raw_uid(item)] = disk.restart(path, tmp_path / f"crash-{len(seen)}")
            if item_raw_uid(item) == "raw-2":
                return {"success": False, "msg": "RE Manager busy"}
            return super().item_add(item, user, user_group)

    cfg = quick_config()
    sub = daemon(cfg, Crashing(), path)
    try:
        assert sub.submit(REC, raw_uid="raw-1") is not None
        done = disk.restart(path, tmp_path / "crash-after")
        with pytest.raises(QueueServerError):
            sub.submit(REC, raw_uid="raw-2")
        refused = disk.restart(path, tmp_path / "crash-refused")
    finally:
        sub.close()
    assert key in seen["raw-1"], "a crash while the server took the plan lost its record"
    assert key in done, "a crash after the submission returned lost its record"
    assert ("raw-2", "run_end") not in refused
    with caplog.at_level("WARNING", logger="xasflow.adapters.queueserver_memory"):
        SubmittedRuns(tmp_path / "crash-0" / SUBMITTED_FILE).close()
    assert "raw-1" in caplog.text and "not queued again" in caplog.text


# --------------------------------------------------------------------------- one daemon a memory


def test_a_second_daemon_on_the_same_memory_refuses_to_start(tmp_path: Path) -> None:
    """Two daemons on one store directory would both check the memory, find a run's plan
    missing and both queue it. The second refuses to start, naming the file and the first
    daemon's pid, before it reads or sends anything; once the first is gone (even killed),
    a daemon starts there again. In one process the same file is refused while open."""
    from xasflow.adapters.queueserver_memory import MemoryInUseError
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.parts import build_feedback

    store = tmp_path / "store"
    path = store / SUBMITTED_FILE
    setup = (
        "from xasflow.adapters.queueserver_memory import SubmittedRuns\n"
        f"memory = SubmittedRuns(Path({str(path)!r}))"
    )
    cfg = DaemonConfig(storage={"directory": store}, queueserver=quick_config().model_dump())
    with (
        held_elsewhere(setup) as holder,
        pytest.raises(MemoryInUseError, match=rf"{SUBMITTED_FILE}.*pid {holder.pid}"),
    ):
        build_feedback(cfg, None)  # type: ignore[arg-type]  # no IOC: no registry
    _, sub = build_feedback(cfg, None)  # type: ignore[arg-type]
    assert sub is not None
    with sub, pytest.raises(MemoryInUseError, match="already open in this process"):
        QueueServerSubmitter(quick_config(), memory=path)
    QueueServerSubmitter(quick_config(), memory=path).close()  # closed: free again
