"""The operator-facing surfaces at their edges: a raw uid Channel Access cannot carry, the
advice PVs between two runs, plans queued from out-of-domain answers.

Each test failed on aca8a8c (a read-only review). Where a docstring says what a surface
does wrong, it tells what it did then."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("caproto")

from helpers import analysis_run_docs, free_port, wait_for
from helpers import read_pv as read

from xasflow.adapters.epics_ioc import XasIoc
from xasflow.adapters.queueserver import QueueServerConfig, QueueServerSubmitter


@pytest.fixture
def ioc_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A running IOC and a loopback-only caproto client (as in test_epics_ioc)."""
    port, repeater = free_port(), free_port()
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
    monkeypatch.setenv("EPICS_CA_REPEATER_PORT", str(repeater))
    import caproto

    monkeypatch.setattr(caproto, "get_local_address", lambda: "127.0.0.1")
    from caproto.threading.client import Context

    ioc = XasIoc("REV:XAS:", host="127.0.0.1", port=port, beacon_port=repeater).start()
    ctx = Context(timeout=5.0)
    try:
        yield {"ioc": ioc, "ctx": ctx}
    finally:
        ctx.disconnect()
        ioc.stop()


# --------------------------------------------------------------------------- IOC


def test_a_raw_uid_outside_latin1_leaves_scan_uid_readable(ioc_env: dict[str, Any]) -> None:
    """A raw run uid is any non-empty string the bus sends (assembly only checks
    ``isinstance(uid, str)``). The IOC writes it to SCAN_UID (and ADVICE_UID, and 8
    characters of it into STATUS) as a Python str; caproto encodes STRING PVs as latin-1 when a
    client reads, so a uid with a character outside latin-1 makes every read of SCAN_UID fail
    on the server ("Server failed to process command ... UnicodeEncodeError") and time out on
    the client: the operator's panel loses the run identity of the answer it shows."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    raw_uid = "r\u2013" + "0" * 10  # an en dash, e.g. pasted from a document; not latin-1
    docs = analysis_run_docs(
        [("primary", {"status": "ok", "cn": 4, "cn_probability": 0.9, "e0": 8984.0})],
        raw_uid=raw_uid,
    )
    for name, doc in docs:
        ioc(name, doc)
    ioc.flush()
    cn, uid = ctx.get_pvs(ioc.pv("cn"), ioc.pv("scan_uid"), timeout=5.0)
    assert read(cn) == 4
    try:
        value = uid.read(timeout=2.0).data[0]
    except Exception as exc:  # CaprotoTimeoutError: the server failed to encode the value
        pytest.fail(f"SCAN_UID of run {raw_uid!r} cannot be read: {type(exc).__name__}: {exc}")
    assert value  # something readable that names the run


def test_the_next_runs_raw_start_clears_the_last_runs_stop_early(
    ioc_env: dict[str, Any], tmp_path: Path
) -> None:
    """epics_pvs: the advice PVs are cleared when a run starts, "so a plan watching
    STOP_EARLY never stops a new scan on the last one's certainty". The analysis start
    document only comes with the run's first result (a whole sweep of a quick-XAS run
    later), so the daemon's raw-start hook clears them as the raw start arrives: before,
    STOP_EARLY stayed 1 for run A through run B's first sweep."""
    from types import SimpleNamespace

    from xasflow.daemon.assembly import RunAssembler
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_processor

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    stop, advice = ctx.get_pvs(ioc.pv("stop_early"), ioc.pv("advice_uid"), timeout=5.0)
    run_a = analysis_run_docs(
        [
            ("primary", {"status": "ok", "cn": 4, "e0": 8984.0}),
            ("recommendations", {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True}),
        ],
        raw_uid="raw-A",
    )
    for name, doc in run_a:
        ioc(name, doc)
    wait_for(lambda: read(stop) == 1 and read(advice) == "raw-A", what="run A's advice")
    parts = SimpleNamespace(  # what the processor is built from; only the IOC matters here
        source=SimpleNamespace(get=lambda timeout: None),
        assembler=RunAssembler(),
        pipeline=SimpleNamespace(worker=None),
        probes=None,
        interrupted=None,
        writer=None,
        store=None,
        ioc=ioc,
        gate=None,
        publisher=None,
    )
    proc = build_processor(parts, DaemonConfig(), Counters(), [], lambda: None)  # type: ignore[arg-type]
    assert proc.on_raw_start is not None
    proc.on_raw_start({"uid": "raw-B", "time": 1.0, "scan_id": 8, "plan_name": "fly"})
    ioc.flush()
    wait_for(lambda: read(advice) == "raw-B" and read(stop) == 0, what="run A's advice cleared")


# --------------------------------------------------------------------------- queueserver


class _FakeApi:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def item_add(self, item: dict[str, Any], user: str, user_group: str) -> dict[str, Any]:
        self.items.append(item)
        return {"success": True, "msg": "", "item": dict(item, item_uid=f"u{len(self.items)}")}

    def close(self) -> None:
        pass


_REGIONS = [
    {"name": "edge", "start": 8978.0, "stop": 8990.0, "step": 0.5, "dwell": 2.0, "reason": "x"}
]


@pytest.mark.parametrize("submit_on", ["run_end", "rescan"])
def test_no_plan_is_queued_for_an_out_of_domain_answer(submit_on: str) -> None:
    """The recommender advises after every analysed spectrum, out-of-domain ones included
    (only stop_early is withheld for them), and the submitter looks at nothing but the
    ``recommendations`` stream: a run whose every answer the bundle flags "not to be trusted"
    gets its advice queued as a plan (run_end), and each of its rescans (rescan). Neither the
    queueserver module nor docs/architecture.md says out-of-domain advice is submitted."""
    fake = _FakeApi()
    cfg = QueueServerConfig(
        enabled=True, zmq_public_key="x" * 40, min_interval_s=0.0, submit_on=submit_on
    )
    sub = QueueServerSubmitter(cfg, api_factory=lambda _: fake)
    ood_row = {
        "status": "ok",
        "cn": 4,
        "flags": "out_of_domain",
        "out_of_domain": True,
        "ood_score": 9.0,
    }
    advice = {
        "regions": json.dumps(_REGIONS),
        "rescan": json.dumps(dict(_REGIONS[0], dwell=6.0)),
        "stop_early": False,  # never True for an out-of-domain spectrum
        "stop_reason": "out_of_domain: the answer is not to be trusted, keep measuring",
        "e0": 8983.5,
        "bundle_id": "cu-k-test",
        "out_of_domain": True,  # the pipeline marks advice that follows such an answer
    }
    docs = analysis_run_docs(
        [("primary", ood_row), ("recommendations", advice)],
        "raw-ood",
        stop={"exit_status": "success", "n_analysed": 1, "n_out_of_domain": 1},
    )
    try:
        for name, doc in docs:
            sub(name, doc)
        assert sub.join(5.0)
        assert fake.items == [], (
            f"{len(fake.items)} plan(s) queued for a run whose only answer is out of domain: "
            f"{[i['kwargs']['md']['xasflow']['kind'] for i in fake.items]}"
        )
        assert sub.stats["skipped_out_of_domain"] == 1
    finally:
        sub.close()
