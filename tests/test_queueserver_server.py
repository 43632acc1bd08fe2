"""Submitting recommended scans to a real bluesky-queueserver: an RE Manager (with its Redis)
started by the module's fixture receives the plans, refuses what it should, and keeps what
a restarted daemon must find (the no-server cases are in test_queueserver)."""

from __future__ import annotations

import contextlib
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
from helpers import free_port, wait_for
from queueserver_helpers import REC, ROWS, advice_run_docs

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerError, QueueServerSubmitter

BIN = Path(sys.executable).parent


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
            for name, doc in advice_run_docs(False, "raw-locked"):
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
            for name, doc in advice_run_docs(False, "raw-removed"):
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
        for name, doc in advice_run_docs(False, "raw-given-up"):
            sub(name, doc)
        assert sub.join(10.0) and sub.stats["gave_up"] == 1
    tried = []
    for _restart in range(2):
        with daemon(good) as sub:
            tried.append(sub.retry_given_up())
            assert sub.join(10.0)
    assert tried == [1, 0]
    assert len(_ours(api, "raw-given-up")) == 1
