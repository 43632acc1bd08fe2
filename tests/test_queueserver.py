"""Submitting recommended scans to bluesky-queueserver: off by default, credentials required,
and a real RE Manager (with its Redis) started by the fixture receives the plan."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import analysis_run_docs, free_port, wait_for
from pydantic import ValidationError

from xasflow.adapters.queueserver import (
    QueueServerConfig,
    QueueServerError,
    QueueServerSubmitter,
    plan_item,
    region_points,
)

BIN = Path(sys.executable).parent

REC = {
    "regions": [
        {
            "name": "pre-edge",
            "start": 8978.0,
            "stop": 8990.0,
            "step": 0.5,
            "dwell": 2.0,
            "reason": "importance 1.00, mostly for cn",
        },
        {
            "name": "beyond",
            "start": 9020.0,
            "stop": 9100.0,
            "step": 2.0,
            "dwell": 0.5,
            "reason": "importance 0.20",
        },
    ],
    "rescan": None,
    "stop_early": False,
    "e0": 8983.5,
    "uncertainty": 0.4,
    "bundle_id": "cu-k-test",
}
ROWS = [[8978.0, 8990.0, 0.5, 2.0], [9020.0, 9100.0, 2.0, 0.5]]


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
    cfg = QueueServerConfig(detectors=["det1"], motor="motor", extra_kwargs={"sample": "CuO"})
    item = plan_item(cfg, REC, raw_uid="raw-1")
    assert item["name"] == "xas_regions_scan" and item["item_type"] == "plan"
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


def _docs(
    stop_early: bool, raw_uid: str = "raw-1", exit_status: str = "success", rescan: str = ""
) -> list[tuple[str, dict[str, Any]]]:
    row = {
        "regions": json.dumps(REC["regions"]),
        "rescan": rescan,
        "stop_early": stop_early,
        "e0": 8983.5,
        "bundle_id": "cu-k-test",
    }
    return analysis_run_docs(
        [("primary", {"status": "ok"}), ("recommendations", row)],
        raw_uid,
        stop={"exit_status": exit_status},
    )


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
        for name, doc in _docs(stop_early=False):
            sub(name, doc)
        assert sub.join(5.0)
        assert len(fake.items) == 1
        added = fake.items[0]
        assert added["user"] == "xasflow" and added["user_group"] == "primary"
        assert added["item"]["kwargs"]["regions"] == ROWS
        assert added["item"]["kwargs"]["md"]["xasflow"]["raw_uid"] == "raw-1"
        for name, doc in _docs(False, "raw-2"):  # a second run within 30 s: rate-limited
            sub(name, doc)
        assert sub.join(5.0) and len(fake.items) == 1 and sub.stats["skipped_rate"] == 1
        now[0] += 31.0
        for name, doc in _docs(True, "raw-3"):  # certain answer: nothing to measure
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
            for name, doc in _docs(False, "raw-A", exit_status=status):
                sub(name, doc)
        assert sub.join(5.0) and fake.items == [] and sub.stats["skipped_not_success"] == 2
        for _ in range(2):  # the run's own stop, then its replay
            for name, doc in _docs(False, "raw-A"):
                sub(name, doc)
        assert sub.join(5.0) and len(fake.items) == 1 and sub.stats["skipped_repeat"] == 1
        sub.config.submit_on = "rescan"
        for _ in range(3):  # the same region advised for rescan by three spectra
            for name, doc in _docs(False, "raw-B", rescan=rescan):
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
        for name, doc in _docs(False, "raw-1"):
            sub(name, doc)
        wait_for(lambda: sub.stats["failed"] == 1, what="raw-1's refusal")
        for name, doc in _docs(False, "raw-2"):
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
        for name, doc in _docs(False, "raw-lost"):
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


# --------------------------------------------------------------------------- real server


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a process we started in its own session, and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    else:  # the leader is gone; its group may not be
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


STARTUP = """\
from ophyd.sim import det1, det2, motor
from bluesky import RunEngine
from xasflow.adapters.queueserver import xas_regions_scan

RE = RunEngine({})
"""

PERMISSIONS = """\
user_groups:
  root:
    allowed_plans: [null]
    forbidden_plans: [":^_"]
    allowed_devices: [null]
    forbidden_devices: [":^_:?.*"]
    allowed_functions: [null]
    forbidden_functions: [":^_"]
  primary:
    allowed_plans: [":.*"]
    forbidden_plans: [null]
    allowed_devices: [":?.*:depth=5"]
    forbidden_devices: [null]
    allowed_functions: [null]
    forbidden_functions: [null]
"""


@pytest.fixture(scope="module")
def re_manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis and an encrypted RE Manager on free loopback ports; both ended afterwards."""
    redis_server = shutil.which("redis-server")
    manager = BIN / "start-re-manager"
    lister = BIN / "qserver-list-plans-devices"
    if redis_server is None:
        pytest.skip("redis-server not installed (Debian: apt-get install redis-server)")
    if not manager.exists() or not lister.exists():
        pytest.skip("bluesky-queueserver not installed (pip install 'xasflow[queueserver]')")
    pytest.importorskip("bluesky_queueserver_api", reason="pip install 'xasflow[queueserver]'")
    from bluesky_queueserver import generate_zmq_keys

    root = tmp_path_factory.mktemp("qserver")
    startup = root / "startup"
    startup.mkdir()
    (startup / "00-startup.py").write_text(STARTUP)
    (startup / "user_group_permissions.yaml").write_text(PERMISSIONS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    listed = subprocess.run(
        [str(lister), "--startup-dir", str(startup), "--file-dir", str(startup)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "xas_regions_scan" in (startup / "existing_plans_and_devices.yaml").read_text()

    public, private = generate_zmq_keys()
    redis_port, control, info = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_proc = subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(redis_proc)
        import redis

        client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or redis_proc.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        log = open(root / "re-manager.log", "wb")  # noqa: SIM115 (closed below)
        manager_proc = subprocess.Popen(
            [
                str(manager),
                "--startup-dir",
                str(startup),
                "--existing-plans-devices",
                str(startup / "existing_plans_and_devices.yaml"),
                "--user-group-permissions",
                str(startup / "user_group_permissions.yaml"),
                "--update-existing-plans-devices",
                "NEVER",
                "--redis-addr",
                f"127.0.0.1:{redis_port}",
                "--redis-name-prefix",
                f"xasflow_test_{os.getpid()}",
                "--zmq-control-addr",
                f"tcp://127.0.0.1:{control}",
                "--zmq-info-addr",
                f"tcp://127.0.0.1:{info}",
                "--zmq-publish-console",
                "OFF",
            ],
            cwd=root,
            env={**env, "QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER": private},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(manager_proc)
        from bluesky_queueserver_api.zmq import REManagerAPI

        api = REManagerAPI(
            zmq_control_addr=f"tcp://127.0.0.1:{control}",
            zmq_public_key=public,
            timeout_recv=2.0,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    status = api.status()
                    if status.get("manager_state") == "idle":
                        break
                except Exception:
                    if manager_proc.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        raise AssertionError(
                            "RE Manager did not come up:\n"
                            + (root / "re-manager.log").read_text()[-3000:]
                        ) from None
                time.sleep(0.2)
            yield {
                "api": api,
                "control": f"tcp://127.0.0.1:{control}",
                "public": public,
            }
        finally:
            api.close()
            log.close()
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _real_queue(re_manager: dict[str, Any], detectors: list[str]) -> QueueServerConfig:
    """A submitter's settings for the test's RE Manager, over 0MQ."""
    return QueueServerConfig(
        enabled=True,
        zmq_control_addr=re_manager["control"],
        zmq_public_key=re_manager["public"],
        detectors=detectors,
        motor="motor",
        timeout_s=5.0,
    )


def test_plan_lands_in_a_real_queue(re_manager: dict[str, Any]) -> None:
    api = re_manager["api"]
    api.queue_clear()
    cfg = _real_queue(re_manager, ["det1", "det2"])
    with QueueServerSubmitter(cfg) as sub:
        reply = sub.submit(REC, raw_uid="raw-42")
    assert reply is not None and reply["success"] is True
    queue = api.queue_get()["items"]
    assert len(queue) == 1
    item = queue[0]
    assert item["name"] == "xas_regions_scan" and item["item_type"] == "plan"
    assert item["user"] == "xasflow" and item["user_group"] == "primary"
    kwargs = item["kwargs"]
    assert kwargs["detectors"] == ["det1", "det2"] and kwargs["motor"] == "motor"
    assert kwargs["regions"] == ROWS
    assert kwargs["md"]["xasflow"]["raw_uid"] == "raw-42"
    assert kwargs["md"]["xasflow"]["bundle_id"] == "cu-k-test"
    assert item["item_uid"] == reply["item"]["item_uid"]


def test_a_restarted_daemon_finds_the_runs_plan_in_the_real_queue(
    re_manager: dict[str, Any],
) -> None:
    """The memory of queued runs dies with the process: after a restart (a new submitter) the
    replayed run finds its plan in the server's queue by ``md.xasflow`` and queues nothing; a
    rescan of the same run is another submission and goes in."""
    api = re_manager["api"]
    api.queue_clear()
    cfg = _real_queue(re_manager, ["det1"])
    replies = []
    for _process in range(2):
        with QueueServerSubmitter(cfg) as sub:
            replies.append(sub.submit(REC, raw_uid="raw-43"))
    assert replies[0] is not None and replies[1] is None and sub.stats["skipped_repeat"] == 1
    rescan = dict(REC, rescan=dict(REC["regions"][0], dwell=6.0))
    with QueueServerSubmitter(cfg) as sub:
        assert sub.submit(rescan, raw_uid="raw-43", rescan_only=True) is not None
    kinds = [i["kwargs"]["md"]["xasflow"]["submission"] for i in api.queue_get()["items"]]
    assert kinds == ["run_end", "rescan pre-edge"]


def test_unknown_plan_is_refused_by_the_server(re_manager: dict[str, Any]) -> None:
    cfg = QueueServerConfig(
        enabled=True,
        zmq_control_addr=re_manager["control"],
        zmq_public_key=re_manager["public"],
        plan_name="no_such_plan",
        timeout_s=5.0,
    )
    with QueueServerSubmitter(cfg) as sub, pytest.raises(QueueServerError, match="no_such_plan"):
        sub.submit(REC)
    assert sub.stats["failed"] == 1


def test_wrong_key_gets_no_answer(re_manager: dict[str, Any]) -> None:
    from bluesky_queueserver import generate_zmq_keys

    wrong, _ = generate_zmq_keys()
    cfg = QueueServerConfig(
        enabled=True,
        zmq_control_addr=re_manager["control"],
        zmq_public_key=wrong,
        timeout_s=1.0,
    )
    before = len(re_manager["api"].queue_get()["items"])
    with QueueServerSubmitter(cfg) as sub, pytest.raises(QueueServerError):
        sub.submit(REC)
    assert len(re_manager["api"].queue_get()["items"]) == before


def _ours(api: Any, raw_uid: str) -> list[dict[str, Any]]:
    """The items of the real queue that xasflow queued for ``raw_uid``."""
    items = api.queue_get()["items"]
    return [
        i for i in items if i["kwargs"].get("md", {}).get("xasflow", {}).get("raw_uid") == raw_uid
    ]


def test_a_plan_the_server_refused_goes_in_once_it_accepts(re_manager: dict[str, Any]) -> None:
    """An operator locks the queue (the RE Manager refuses every item_add without the key):
    the run's plan is tried again after a backoff and goes in once the lock is lifted, once
    (the try that was refused counts in ``failed``, the one that went in in ``retried``)."""
    api = re_manager["api"]
    api.queue_clear()
    cfg = _real_queue(re_manager, ["det1"])
    lock_key = "xasflow-test-lock"
    api.lock_queue(lock_key, note="operator at work", user="operator")
    try:
        with QueueServerSubmitter(cfg) as sub:
            for name, doc in _docs(False, "raw-locked"):
                sub(name, doc)
            wait_for(lambda: sub.stats["failed"] == 1, what="the refusal of the locked queue")
            assert "lock" in sub.last_error.lower() and _ours(api, "raw-locked") == []
            api.unlock(lock_key)
            lock_key = ""
            wait_for(lambda: _ours(api, "raw-locked"), what="raw-locked's plan in the queue")
            assert sub.join(10.0)
            assert sub.stats["submitted"] == 1 and sub.stats["retried"] == 1
        assert len(_ours(api, "raw-locked")) == 1
    finally:
        if lock_key:
            api.unlock(lock_key)


def test_an_unreachable_server_is_given_up_after_the_retries(re_manager: dict[str, Any]) -> None:
    """Nothing answers at the configured address: the plan is tried 1 + ``retries`` times,
    then given up (``gave_up``), and the submitter is idle again."""
    cfg = _real_queue(re_manager, ["det1"]).model_copy(
        update={
            "zmq_control_addr": f"tcp://127.0.0.1:{free_port()}",
            "timeout_s": 0.3,
            "retries": 2,
            "retry_backoff_s": 0.05,
        }
    )
    with QueueServerSubmitter(cfg) as sub:
        assert sub.enqueue(REC, "raw-unreachable")
        assert sub.join(20.0)
        assert sub.stats["failed"] == 3 and sub.stats["retried"] == 2
        assert sub.stats["gave_up"] == 1 and sub.stats["submitted"] == 0
    assert _ours(re_manager["api"], "raw-unreachable") == []


def test_a_plan_an_operator_removed_is_not_queued_again_after_a_restart(
    re_manager: dict[str, Any], tmp_path: Path
) -> None:
    """The daemon queues a run's plan, an operator removes it from the queue (it is then in
    neither queue nor history), and the daemon restarts: Kafka replays the run, whose plan
    must not come back (the daemon remembers it beside its store)."""
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.parts import build_feedback

    api = re_manager["api"]
    api.queue_clear()
    cfg = DaemonConfig(
        storage={"directory": tmp_path / "store"},
        queueserver=_real_queue(re_manager, ["det1"]).model_dump(),
    )
    for process in ("the daemon", "the daemon restarted"):
        _, sub = build_feedback(cfg, None)  # type: ignore[arg-type]  # no IOC: no registry
        assert sub is not None
        with sub:
            for name, doc in _docs(False, "raw-removed"):
                sub(name, doc)
            assert sub.join(10.0)
        queued = _ours(api, "raw-removed")
        if process == "the daemon":
            assert len(queued) == 1
            assert api.item_remove(uid=queued[0]["item_uid"])["success"]  # the operator
    uids = [item["item_uid"] for item in queued]
    assert uids == [], f"raw-removed's plan was queued again after the restart: {uids}"


def test_a_plan_given_up_lands_in_the_real_queue_after_a_restart(
    re_manager: dict[str, Any], tmp_path: Path
) -> None:
    """The daemon cannot reach the RE Manager and gives the run's plan up (remembered beside
    its store); restarted with the server reachable, it tries the plan again once it runs and
    the plan lands in the queue; a third start tries nothing (the plan went in)."""
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.parts import build_feedback

    api = re_manager["api"]
    api.queue_clear()
    good = _real_queue(re_manager, ["det1"])
    down = good.model_copy(
        update={
            "zmq_control_addr": f"tcp://127.0.0.1:{free_port()}",
            "timeout_s": 0.3,
            "retries": 0,
        }
    )

    def daemon(settings: QueueServerConfig) -> QueueServerSubmitter:
        cfg = DaemonConfig(
            storage={"directory": tmp_path / "store"}, queueserver=settings.model_dump()
        )
        _, sub = build_feedback(cfg, None)  # type: ignore[arg-type]  # no IOC: no registry
        assert sub is not None
        return sub

    with daemon(down) as sub:
        for name, doc in _docs(False, "raw-given-up"):
            sub(name, doc)
        assert sub.join(10.0) and sub.stats["gave_up"] == 1
    tried = []
    for _restart in range(2):
        with daemon(good) as sub:
            tried.append(sub.retry_given_up())
            assert sub.join(10.0)
    assert tried == [1, 0]
    assert len(_ours(api, "raw-given-up")) == 1
