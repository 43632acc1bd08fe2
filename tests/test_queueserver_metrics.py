"""The queueserver submitter's outcomes on /metrics, for alerting on plans lost."""

from __future__ import annotations

import re
from pathlib import Path

from deploy_files import alert_rules
from feedback_helpers import REC, ZMQ_KEY, HeldApi

from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter
from xasflow.adapters.queueserver_memory import SUBMITTED_FILE
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.counters import Counters
from xasflow.daemon.parts import Parts
from xasflow.daemon.status import DaemonStatus


def _plans(text: str) -> dict[str, float]:
    """``xasflow_queueserver_plans_total`` by outcome, from a /metrics page."""
    pattern = r'^xasflow_queueserver_plans_total\{outcome="(\w+)"\} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


def test_the_queueserver_outcomes_reach_metrics_lost_plans_included(tmp_path: Path) -> None:
    """Before: the submitter's stats reached only /health, so a plan lost (given up for good)
    or given up (refused at a full queue) was invisible to Prometheus. Now /metrics counts
    the plans by outcome in ``xasflow_queueserver_plans_total{outcome}``, every outcome
    from 0."""
    from starlette.testclient import TestClient

    from xasflow.daemon.http import create_app

    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0)
    fake = HeldApi()
    sub = QueueServerSubmitter(
        cfg.model_copy(update={"max_pending": 1}),
        api_factory=lambda _: fake,
        memory=tmp_path / SUBMITTED_FILE,
    )
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    status = DaemonStatus(config, Counters(), Parts(submitter=sub))
    try:
        with TestClient(create_app(status)) as client:
            plans = _plans(client.get("/metrics").text)
            assert plans == dict.fromkeys(sub.stats, 0.0) and "gave_up_queue_full" in plans
            assert sub.enqueue(REC, "raw-1")
            assert fake.sending.wait(10.0), "raw-1's try never reached the server"
            assert sub.enqueue(REC, "raw-2")
            assert not sub.enqueue(REC, "raw-3")  # the queue is full: given up
            fake.release.set()
            assert sub.join(10.0)
            plans = _plans(client.get("/metrics").text)
        assert plans["submitted"] == 2 and plans["gave_up_queue_full"] == 1
        assert plans["gave_up"] == 0 and plans["abandoned_lost_reply"] == 0
        assert plans == {k: float(v) for k, v in sub.stats.items()}
    finally:
        fake.release.set()
        sub.close()


def test_every_outcome_the_alerts_name_is_one_the_submitter_counts() -> None:
    """The alert rules select ``xasflow_queueserver_plans_total`` by outcome: each outcome
    they name (a regex's plain alternatives; ``abandoned_.*`` matches some) is one the
    submitter counts, so a renamed outcome cannot leave an alert that never fires."""
    sub = QueueServerSubmitter(QueueServerConfig())
    pattern = r'xasflow_queueserver_plans_total\{[^}]*outcome=~?"([^"]+)"'
    named = [m for rule in alert_rules() for m in re.findall(pattern, rule["expr"])]
    assert named, "no alert selects the queueserver plans by outcome"
    for regex in named:
        for alternative in regex.split("|"):
            matches = [k for k in sub.stats if re.fullmatch(alternative, k)]
            assert matches, f"the alerts name the outcome {alternative!r}, never counted"


def test_every_plan_lost_is_one_the_plans_lost_alert_selects() -> None:
    """Each way a plan is given up for good (``abandoned_*``: a lost reply, its replays
    spent, too old for the running daemon to try again) is counted from 0 and selected by
    ``XasflowQueueserverPlansLost``. Before, a plan whose rounds or age ran out in the
    running daemon's retries was dropped without a count: the alert never fired."""
    sub = QueueServerSubmitter(QueueServerConfig())
    lost = [outcome for outcome in sub.stats if outcome.startswith("abandoned_")]
    assert {"abandoned_lost_reply", "abandoned_replays", "abandoned_expired"} <= set(lost)
    assert all(sub.stats[outcome] == 0 for outcome in lost)
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == "XasflowQueueserverPlansLost"]
    # one selector, in both branches (a count seen by increase(), or one made at start)
    (regex,) = set(re.findall(r'outcome=~"([^"]+)"', rule["expr"]))
    assert all(re.fullmatch(regex, outcome) for outcome in lost)


def test_errors_looking_at_plans_given_up_are_their_own_metric_not_a_plan_outcome(
    tmp_path: Path,
) -> None:
    """An error while the worker looks at the plans given up (to try them again) counts no
    plan. Before, it was exported as ``xasflow_queueserver_plans_total{outcome=
    "deferred_errors"}`` beside the plans' outcomes, and /health listed it among the plans'
    stats. Now it is ``xasflow_queueserver_deferred_errors_total`` and /health's
    ``feedback.queueserver.deferred_errors``, and no plan outcome."""
    from starlette.testclient import TestClient

    from xasflow.daemon.http import create_app

    cfg = QueueServerConfig(enabled=True, zmq_public_key=ZMQ_KEY, min_interval_s=0.0)
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: HeldApi())

    def broken() -> float | None:
        raise RuntimeError("injected")

    sub._try_deferred = broken  # type: ignore[method-assign]
    config = DaemonConfig(storage={"directory": str(tmp_path / "store")})  # type: ignore[arg-type]
    status = DaemonStatus(config, Counters(), Parts(submitter=sub))
    try:
        with TestClient(create_app(status)) as client:
            text = client.get("/metrics").text
            assert re.search(r"^xasflow_queueserver_deferred_errors_total 0\.0$", text, re.M)
            sub._look()
            sub._look()
            text = client.get("/metrics").text
            health = client.get("/health").json()["feedback"]["queueserver"]
        assert re.search(r"^xasflow_queueserver_deferred_errors_total 2\.0$", text, re.M), text
        assert "deferred_errors" not in _plans(text)
        assert health["deferred_errors"] == 2 and "deferred_errors" not in health["stats"]
    finally:
        sub.close()


def test_the_plans_deferred_alert_says_give_ups_as_gave_up_counts_them(tmp_path: Path) -> None:
    """One plan, the RE Manager down (the submitter's clock moves only when the test moves
    it): given up, tried again by the running daemon after ``given_up_retry_s``, given up
    again. ``gave_up`` is 2 for that one plan (it counts give-up rounds). Before,
    ``XasflowQueueserverPlansDeferred``'s summary read "2 queueserver plans not queued";
    now it says give-ups, and its description that a plan counts once a round."""
    from helpers import wait_for
    from queueserver_helpers import OutageApi, quick_config

    from xasflow.adapters.queueserver_pending import wake

    path = tmp_path / "store" / SUBMITTED_FILE
    now = [0.0]
    cfg = quick_config(retries=0, given_up_retry_s=5.0)
    sub = QueueServerSubmitter(
        cfg, api_factory=lambda _: OutageApi(), clock=lambda: now[0], memory=path
    )
    try:
        assert sub.enqueue(REC, "raw-1")
        wait_for(lambda: sub.stats["gave_up"] == 1, what="raw-1 given up")
        now[0] = 5.0
        wake(sub._queue)
        wait_for(lambda: sub.stats["gave_up"] == 2, what="raw-1 given up again")
        assert sub.join(10.0)
        plans = {plan.key[0] for plan in sub._memory.given_up()}
    finally:
        sub.close()
    assert plans == {"raw-1"} and sub.stats["revived"] == 1
    (rule,) = [r for r in alert_rules() if r["alert"] == "XasflowQueueserverPlansDeferred"]
    labels = {"{{ $labels.outcome }}": "gave_up", "{{ $labels.instance }}": "d2:8620"}
    summary = rule["annotations"]["summary"].replace("{{ $value }}", str(sub.stats["gave_up"]))
    for field, value in labels.items():
        summary = summary.replace(field, value)
    assert summary == "2 queueserver plan give-ups (gave_up) on d2:8620"
    assert "once a round" in rule["annotations"]["description"]


def test_a_plan_no_server_takes_fires_its_own_alert() -> None:
    """A run's plan whose regions no beamline should run is refused before it is sent
    (``refused_invalid``, exported as ``xasflow_queueserver_plans_total{outcome=
    "refused_invalid"}``): not retried, not remembered, so that scan is not queued. Before,
    no alert rule selected that outcome (only ``abandoned_*`` and ``gave_up*``): a bundle
    whose advice no server takes went unseen. Now ``XasflowQueueserverPlansRefused`` does,
    and only it."""
    sub = QueueServerSubmitter(QueueServerConfig())
    assert sub.stats["refused_invalid"] == 0
    pattern = r'xasflow_queueserver_plans_total\{[^}]*outcome=~?"([^"]+)"'
    selecting = [
        rule["alert"]
        for rule in alert_rules()
        for regex in re.findall(pattern, rule["expr"])
        if any(re.fullmatch(alternative, "refused_invalid") for alternative in regex.split("|"))
    ]
    assert selecting == ["XasflowQueueserverPlansRefused"]
    (rule,) = [r for r in alert_rules() if r["alert"] == "XasflowQueueserverPlansRefused"]
    assert rule["labels"]["severity"] == "warning"
    assert "{{ $labels.instance }}" in rule["annotations"]["summary"]
