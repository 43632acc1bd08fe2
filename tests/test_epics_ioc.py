"""The daemon's caproto IOC, read and monitored by caproto's threading client on loopback.

The client is confined to 127.0.0.1 (EPICS_CA_AUTO_ADDR_LIST=NO), the IOC sends beacons only
to loopback, and the test checks that no caproto-repeater was started and that every thread
the IOC and the client started is gone afterwards.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("caproto")

from helpers import analysis_run_docs, free_port, processor_parts, wait_for
from helpers import read_pv as read

from xasflow.adapters.epics_ioc import XasIoc
from xasflow.adapters.epics_pvs import MAX_REGIONS, REGIONS_ADVISED, UNDEFINED, values_from
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.health import feedback_health


def _children() -> list[tuple[int, str]]:
    """(pid, command line) of this process's child processes (Linux /proc)."""
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == me:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out.append((int(entry.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.fixture
def ioc_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A running IOC and a loopback-only client context; both torn down, threads checked."""
    port, repeater = free_port(), free_port()
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1")
    monkeypatch.setenv("EPICS_CA_AUTO_ADDR_LIST", "NO")
    monkeypatch.setenv("EPICS_CA_SERVER_PORT", str(port))
    monkeypatch.setenv("EPICS_CA_REPEATER_PORT", str(repeater))
    import caproto

    # the client registers with a repeater at get_local_address(); keep that on loopback
    monkeypatch.setattr(caproto, "get_local_address", lambda: "127.0.0.1")
    from caproto.threading.client import Context

    threads_before = set(threading.enumerate())
    children_before = {pid for pid, _ in _children()}
    ioc = XasIoc("TST:XAS:", host="127.0.0.1", port=port, beacon_port=repeater).start()
    ctx = Context(timeout=5.0)
    try:
        yield {"ioc": ioc, "ctx": ctx, "port": port}
    finally:
        ctx.disconnect()
        ioc.stop()
    spawned = [(pid, cmd) for pid, cmd in _children() if pid not in children_before]
    assert not [c for c in spawned if "repeater" in c[1]], spawned
    assert not spawned, f"processes left behind: {spawned}"
    wait_for(
        lambda: not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()],
        timeout=15.0,
        what="IOC and client threads to stop",
    )
    assert not ioc.running


def test_values_from_each_source() -> None:
    pred = {
        "bundle_id": "cu-k-1",
        "e0": 8983.6,
        "tasks": {
            "cn": {"value": 4, "probabilities": {"2": 0.1, "4": 0.8, "6": 0.1}},
            "environment": {"value": "square co-planar", "ranking": [["square co-planar", 0.7]]},
            "distance": {"value": 1.96},
            "valence": {"value": 2, "probabilities": {"1": 0.1, "2": 0.9}},
        },
    }
    assert values_from(pred) == pytest.approx(
        {
            "cn": 4,
            "cn_uncertainty": 0.2,
            "cn_set": "",
            "ood": 0,
            "ood_score": math.nan,
            "motif": "square co-planar",
            "distance": 1.96,
            "valence": 2,
            "model_ok": 1,
            "status": "ok",
            "e0": 8983.6,
            "bundle_id": "cu-k-1",
        },
        nan_ok=True,
    )
    # uncertainty: the conformal set and the out-of-domain flag and score
    pred["tasks"]["cn"]["prediction_set"] = [4.0, 6.0]
    pred["flags"] = ["out_of_domain"]
    pred["ood_score"] = 3.5
    doubt = values_from(pred)
    assert (doubt["cn_set"], doubt["ood"], doubt["ood_score"]) == ("4,6", 1, 3.5)
    event = {
        "status": "ok",
        "cn": 6,
        "cn_probability": 0.75,
        "motif": "octahedral",
        "distance": 2.1,
        "valence": 2,
        "e0": 9002.2,
        "bundle_id": "b",
    }
    assert values_from(event)["cn_uncertainty"] == pytest.approx(0.25)
    assert values_from(event)["ood"] == 0 and values_from(event)["cn_set"] == ""
    event.update(cn_set="6", out_of_domain=True, ood_score=9.0)
    assert {k: values_from(event)[k] for k in ("cn_set", "ood", "ood_score")} == {
        "cn_set": "6",
        "ood": 1,
        "ood_score": 9.0,
    }
    assert values_from({"status": "rejected", "reason": "window"}) == {"model_ok": 0}
    partial = values_from({"status": "ok", "cn": 4})  # an answer without the other heads
    assert partial["cn"] == 4 and partial["model_ok"] == 1
    assert all(partial[k] is UNDEFINED for k in ("valence", "distance", "e0", "cn_uncertainty"))
    # CN 9 has no motif in the bundle: MOTIF is cleared, not left at the last spectrum's
    blank = {**event, "cn": 9, "motif": None}
    assert values_from(blank)["motif"] == "" and values_from(blank)["cn"] == 9
    pred["tasks"]["environment"] = {"value": None, "probabilities": {"CN6-octahedral": 0.6}}
    assert values_from(pred)["motif"] == ""
    rec = {"waveform": json.dumps([1, 2, 0.5, 1, 3, 4, 1, 2]), "stop_early": True}
    assert values_from(rec) == {
        "regions": [1, 2, 0.5, 1, 3, 4, 1, 2],
        "n_regions": 2,
        "stop_early": 1,
    }
    big = values_from({"waveform": [1.0] * (4 * MAX_REGIONS + 8)})
    assert big["n_regions"] == MAX_REGIONS and len(big["regions"]) == 4 * MAX_REGIONS
    assert big[REGIONS_ADVISED] == MAX_REGIONS + 2  # what the IOC says the cut left out


def test_pvs_update_after_publish(ioc_env: dict[str, Any]) -> None:
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    names = [
        "cn",
        "cn_uncertainty",
        "motif",
        "distance",
        "valence",
        "e0",
        "scan_uid",
        "regions",
        "n_regions",
        "heartbeat",
        "model_ok",
        "stop_early",
        "updates",
    ]
    pvs = dict(zip(names, ctx.get_pvs(*(ioc.pv(n) for n in names), timeout=5.0), strict=True))
    assert ioc.pv("cn") == "TST:XAS:CN"
    wait_for(lambda: all(pv.connected for pv in pvs.values()), what="PV connections")
    assert read(pvs["cn"]) == 0 and read(pvs["model_ok"]) == 0 and read(pvs["motif"]) == ""

    seen: list[int] = []

    def on_cn(sub: Any, response: Any) -> None:  # kept referenced: caproto holds weak refs
        seen.append(int(response.data[0]))

    sub = pvs["cn"].subscribe()
    sub.add_callback(on_cn)
    wait_for(lambda: seen == [0], what="the monitor's first value")

    ioc.publish(
        {
            "status": "ok",
            "cn": 4,
            "cn_probability": 0.82,
            "motif": "square co-planar",
            "distance": 1.955,
            "valence": 2,
            "e0": 8983.61,
            "bundle_id": "cu-k-test",
        },
        scan_uid="0b5e0a8e-raw-run-uid",
    )
    ioc.publish(
        {
            "waveform": json.dumps([8980.0, 8995.0, 0.5, 2.0, 9000.0, 9100.0, 2.0, 0.5]),
            "stop_early": False,
        }
    )
    wait_for(lambda: read(pvs["cn"]) == 4, what="CN to update")
    assert seen[-1] == 4
    assert read(pvs["cn_uncertainty"]) == pytest.approx(0.18)
    assert read(pvs["motif"]) == "square co-planar"
    assert read(pvs["distance"]) == pytest.approx(1.955)
    assert read(pvs["valence"]) == 2
    assert read(pvs["e0"]) == pytest.approx(8983.61)
    assert read(pvs["scan_uid"]) == "0b5e0a8e-raw-run-uid"
    assert read(pvs["model_ok"]) == 1 and read(pvs["updates"]) == 1
    wait_for(lambda: read(pvs["n_regions"]) == 2, what="regions")
    assert read(pvs["regions"]) == pytest.approx(
        [8980.0, 8995.0, 0.5, 2.0, 9000.0, 9100.0, 2.0, 0.5]
    )
    assert read(pvs["stop_early"]) == 0

    beat = read(pvs["heartbeat"])
    wait_for(lambda: read(pvs["heartbeat"]) > beat, timeout=5.0, what="the heartbeat")

    ioc.set_model_ok(False)
    wait_for(lambda: read(pvs["model_ok"]) == 0, what="MODEL_OK to drop")
    # client puts are refused: the PVs are the daemon's to write
    from caproto import AccessRights

    assert pvs["cn"].access_rights == AccessRights.READ  # no client writes: the daemon's PVs
    sub.clear()


def test_ioc_follows_analysis_documents(ioc_env: dict[str, Any]) -> None:
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    cn, uid, nreg, stop, ood, cn_set = ctx.get_pvs(
        ioc.pv("cn"),
        ioc.pv("scan_uid"),
        ioc.pv("n_regions"),
        ioc.pv("stop_early"),
        ioc.pv("ood"),
        ioc.pv("cn_set"),
        timeout=5.0,
    )
    docs = analysis_run_docs(
        [
            ("primary", {"status": "ok", "cn": 6, "cn_probability": 0.9, "e0": 9002.2}),
            ("recommendations", {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True}),
        ]
    )
    other = analysis_run_docs([("primary", {"status": "ok", "cn": 2})])
    foreign = dict(other[3][1], descriptor="unknown")
    for name, doc in [*docs[:-1], ("event", foreign)]:
        ioc(name, doc)
    wait_for(lambda: read(cn) == 6, what="CN from the primary event")
    wait_for(lambda: read(nreg) == 1 and read(stop) == 1, what="the recommendation")
    assert read(uid) == "raw-run-7"
    assert read(ood) == 0 and read(cn_set) == ""
    assert ioc.published == 1  # the unknown descriptor's event was ignored
    ioc(*docs[-1])  # the run ends: it can no longer stop early, its regions stay
    wait_for(lambda: read(stop) == 0, what="the run's end to withdraw STOP_EARLY")
    assert read(nreg) == 1
    ioc(*docs[3])  # its run is closed: the router no longer knows the descriptor
    ioc.flush()
    assert read(cn) == 6 and ioc.published == 1
    # an out-of-domain answer: OOD goes up with the CN and its conformal set
    doubt = {"status": "ok", "cn": 4, "cn_set": "2,4", "out_of_domain": True, "ood_score": 7.0}
    for name, doc in analysis_run_docs([("primary", doubt)]):
        ioc(name, doc)
    wait_for(lambda: read(ood) == 1, what="OOD to rise")
    assert read(cn) == 4 and read(cn_set) == "2,4"
    # a rejected spectrum: STATUS says so and why; the last answer and its run stay
    (status,) = ctx.get_pvs(ioc.pv("status"), timeout=5.0)
    assert read(status) == "out_of_domain"
    rejected = {"status": "rejected", "reason": "no_edge", "detail": "no data near the edge"}
    for name, doc in analysis_run_docs([("primary", rejected)], raw_uid="3e6d2331-aaaa"):
        ioc(name, doc)
    wait_for(lambda: read(status) == "rejected no_edge (3e6d2331)", what="STATUS to say why")
    assert read(cn) == 4 and read(uid) == "raw-run-7"


def test_an_answer_never_keeps_an_older_value_and_a_doubtful_one_is_in_alarm(
    ioc_env: dict[str, Any],
) -> None:
    """A value the answer lacks is its placeholder in INVALID alarm (not the last answer's);
    an out-of-domain answer puts every answer PV, CN_SET, OOD and OOD_SCORE in MAJOR alarm."""
    from caproto import AlarmSeverity

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    cn, valence, distance = ctx.get_pvs(
        ioc.pv("cn"), ioc.pv("valence"), ioc.pv("distance"), timeout=5.0
    )

    def severity(pv: Any) -> Any:
        return pv.read(data_type="time").metadata.severity

    full = {"status": "ok", "cn": 4, "valence": 2, "distance": 1.95, "e0": 8984.0}
    for name, doc in analysis_run_docs([("primary", full)], raw_uid="raw-A"):
        ioc(name, doc)
    wait_for(lambda: read(cn) == 4 and read(valence) == 2, what="the full answer")
    assert severity(valence) == AlarmSeverity.NO_ALARM
    headless = {"status": "ok", "cn": 6, "e0": 8984.0}  # a bundle without valence or distance
    for name, doc in analysis_run_docs([("primary", headless)], raw_uid="raw-B"):
        ioc(name, doc)
    wait_for(lambda: read(cn) == 6, what="the second answer")
    assert read(valence) == 0 and severity(valence) == AlarmSeverity.INVALID_ALARM
    assert math.isnan(read(distance)) and severity(distance) == AlarmSeverity.INVALID_ALARM
    assert severity(cn) == AlarmSeverity.NO_ALARM
    doubt = {**full, "cn": 2, "out_of_domain": True, "ood_score": 9.0}
    for name, doc in analysis_run_docs([("primary", doubt)], raw_uid="raw-C"):
        ioc(name, doc)
    wait_for(lambda: read(cn) == 2, what="the out-of-domain answer")
    assert severity(cn) == severity(valence) == AlarmSeverity.MAJOR_ALARM
    # the set and the out-of-domain PVs beside them too (a panel showed the set green beside a
    # red CN), and all back to no alarm with the next answer in domain
    cn_set, ood, score = ctx.get_pvs(
        ioc.pv("cn_set"), ioc.pv("ood"), ioc.pv("ood_score"), timeout=5.0
    )
    assert read(ood) == 1
    assert [severity(pv) for pv in (cn_set, ood, score)] == [AlarmSeverity.MAJOR_ALARM] * 3
    for name, doc in analysis_run_docs([("primary", {**full, "cn": 5})], raw_uid="raw-D"):
        ioc(name, doc)
    wait_for(lambda: read(cn) == 5, what="the answer in domain")
    assert read(ood) == 0
    assert [severity(pv) for pv in (cn, cn_set, ood, score)] == [AlarmSeverity.NO_ALARM] * 4


def test_advice_belongs_to_its_run_and_is_not_an_answer(ioc_env: dict[str, Any]) -> None:
    """A recommendation sets the advice PVs under its run's uid without counting as an answer
    or moving E0; the next run's start clears them, so its scan is not stopped on the last
    run's certainty."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    stop, nreg, advice, e0 = ctx.get_pvs(
        ioc.pv("stop_early"), ioc.pv("n_regions"), ioc.pv("advice_uid"), ioc.pv("e0"), timeout=5.0
    )
    before = ioc.published
    docs = analysis_run_docs(
        [
            ("primary", {"status": "ok", "cn": 4, "e0": 8984.0}),
            (
                "recommendations",
                {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True, "e0": 8990.0},
            ),
        ],
        raw_uid="raw-A",
    )
    for name, doc in docs[:-1]:  # run A still scanning
        ioc(name, doc)
    wait_for(lambda: read(stop) == 1 and read(advice) == "raw-A", what="run A's advice")
    assert read(nreg) == 1 and read(e0) == pytest.approx(8984.0)
    assert ioc.published == before + 1  # the answer, not the advice
    rejected = {"status": "rejected", "reason": "no_edge"}
    for name, doc in analysis_run_docs([("primary", rejected)], raw_uid="raw-B")[:3]:
        ioc(name, doc)  # run B open, nothing analysed yet
    wait_for(lambda: read(advice) == "raw-B", what="run B's start to clear the advice")
    assert read(stop) == 0 and read(nreg) == 0


def test_an_answer_to_another_search_is_not_taken_for_this_name() -> None:
    """served_by takes only an answer carrying its own search's id: a server that answers
    every search with the id of an earlier one (a late reply to another name's search,
    reaching a socket that got that search's source port again) does not make the name
    served. Before, every search used id 1, so such a reply named the running IOC as the
    server of a prefix it does not serve, and a second IOC refused to start (seen once in
    the full suite: "TST:OTHER:BUNDLE_ID is already served by" the TST:XAS: IOC)."""
    import socket

    import caproto as ca

    from xasflow.adapters.epics_network import served_by

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stale = ca.Broadcaster(our_role=ca.SERVER).send(
        ca.VersionResponse(ca.DEFAULT_PROTOCOL_VERSION),
        ca.SearchResponse(port, "127.0.0.1", 1, ca.DEFAULT_PROTOCOL_VERSION),
    )
    answered: list[int] = []

    def answer_every_search() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                _, address = server.recvfrom(4096)
            except OSError:
                continue
            server.sendto(stale, address)
            answered.append(1)

    stop = threading.Event()
    thread = threading.Thread(target=answer_every_search)
    thread.start()
    try:
        found = served_by("NOBODY:BUNDLE_ID", "127.0.0.1", port, timeout=0.5)
    finally:
        stop.set()
        thread.join(5)
        server.close()
    assert answered  # the searches reached it and were answered
    assert found is None


def test_a_second_ioc_with_the_same_prefix_is_refused(ioc_env: dict[str, Any]) -> None:
    """The running IOC answers the search for its own PVs; a second IOC on the same port and
    prefix refuses to start (clients would read either), one with another prefix starts."""
    from xasflow.adapters.epics_network import served_by

    ioc, port = ioc_env["ioc"], ioc_env["port"]
    found = served_by(ioc.pv("bundle_id"), "127.0.0.1", port)
    assert found is not None and found.endswith(f":{ioc.tcp_port}")
    assert served_by("NOBODY:BUNDLE_ID", "127.0.0.1", port) is None
    twin = XasIoc("TST:XAS:", host="127.0.0.1", port=port, beacon_port=free_port())
    with pytest.raises(RuntimeError, match=r"TST:XAS:BUNDLE_ID is already served by .*TST:XAS:"):
        twin.start()
    assert not twin.running
    other = XasIoc("TST:OTHER:", host="127.0.0.1", port=port, beacon_port=free_port()).start()
    try:
        assert other.running
        # two servers now share the UDP port, and the kernel hands each unicast search to one
        # of them: the search still finds either prefix every time (it goes out from many
        # source ports)
        for _ in range(5):
            assert served_by(ioc.pv("bundle_id"), "127.0.0.1", port) is not None
            assert served_by(other.pv("bundle_id"), "127.0.0.1", port) is not None
    finally:
        other.stop()


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
    for name, doc in run_a[:-1]:  # A's stop not out yet (its last batch in flight)
        ioc(name, doc)
    wait_for(lambda: read(stop) == 1 and read(advice) == "raw-A", what="run A's advice")
    parts = processor_parts(ioc)  # only the IOC matters here
    proc = build_processor(parts, DaemonConfig(), Counters(), [], lambda: None)  # type: ignore[arg-type]
    assert proc.on_raw_start is not None
    proc.on_raw_start({"uid": "raw-B", "time": 1.0, "scan_id": 8, "plan_name": "fly"})
    ioc.flush()
    wait_for(lambda: read(advice) == "raw-B" and read(stop) == 0, what="run A's advice cleared")


def test_loop_age_reads_the_analysis_loop_and_alarms_on_a_stall(
    ioc_env: dict[str, Any],
) -> None:
    """LOOP_AGE carries what the daemon's loop-age source says (HEARTBEAT counts in the IOC's
    own thread whatever the analysis does: from a review), in MAJOR alarm above 60 s and back
    to no alarm once the loop passes again. Before, no PV told a stalled analysis."""
    from caproto import AlarmSeverity

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    age = [0.3]
    ioc.group.loop_age_source = lambda: age[0]
    (pv,) = ctx.get_pvs(ioc.pv("loop_age"), timeout=5.0)

    def reading() -> tuple[float, Any]:
        got = pv.read(data_type="time")
        return float(got.data[0]), got.metadata.severity

    wait_for(lambda: reading() == (0.3, AlarmSeverity.NO_ALARM), what="an idle loop's age")
    age[0] = 75.04  # held 75 s inside one document
    wait_for(lambda: reading() == (75.0, AlarmSeverity.MAJOR_ALARM), what="a stall in alarm")
    age[0] = 0.03
    wait_for(lambda: reading() == (0.0, AlarmSeverity.NO_ALARM), what="the loop passing again")


def test_a_number_the_pv_type_cannot_hold_is_undefined_not_wrapped_or_unreadable(
    ioc_env: dict[str, Any],
) -> None:
    """CN and VALENCE are 32-bit longs: a class label past 2**31 (a bundle's odd label, a
    corrupt graph's output) wrapped silently (3e9 read as -1294967296, no alarm), and 1e300
    made every client read of CN fail on the server (OverflowError). A cn probability that is
    not finite gave CN_UNC NaN or -inf with no alarm. Each is now the placeholder in INVALID
    alarm, as for a value the answer lacks."""
    from caproto import AlarmSeverity

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    cn, valence, unc = ctx.get_pvs(
        ioc.pv("cn"), ioc.pv("valence"), ioc.pv("cn_uncertainty"), timeout=5.0
    )

    def reading(pv: Any) -> tuple[Any, Any]:
        got = pv.read(data_type="time", timeout=2.0)
        return got.data[0], got.metadata.severity

    good = {"status": "ok", "cn": 4, "cn_probability": 0.9, "valence": 2, "e0": 8984.0}
    ioc.publish(good, scan_uid="raw-A")
    wait_for(lambda: reading(valence) == (2, AlarmSeverity.NO_ALARM), what="the good answer")
    ioc.publish({**good, "cn": 1e300, "valence": 3e9, "cn_probability": math.nan}, "raw-B")
    ioc.flush()
    assert reading(cn) == (0, AlarmSeverity.INVALID_ALARM)
    assert reading(valence) == (0, AlarmSeverity.INVALID_ALARM)
    value, severity = reading(unc)
    assert math.isnan(value) and severity == AlarmSeverity.INVALID_ALARM
    assert values_from({**good, "cn_probability": math.inf})["cn_uncertainty"] is UNDEFINED
    assert values_from({**good, "valence": -(2**31) - 1})["valence"] is UNDEFINED
    assert values_from({**good, "valence": 2**31 - 1})["valence"] == 2**31 - 1
    probs = {"tasks": {"cn": {"value": 4, "probabilities": {"6": 0.1, "4": math.nan}}}}
    assert values_from(probs)["cn_uncertainty"] is UNDEFINED


def test_before_the_first_answer_the_answer_pvs_are_undefined_not_an_answer(
    ioc_env: dict[str, Any],
) -> None:
    """A daemon just (re)started has answered nothing: CN, VALENCE, DISTANCE, E0, CN_UNC,
    MOTIF and OOD, CN_SET, OOD_SCORE beside them are in INVALID alarm (UDF, as an EPICS
    record not yet processed) until the first answer. Before, a restarted daemon's panel read
    CN 0, DISTANCE 0.0, E0 0.0 and OOD 0 ("in domain") with no alarm, as if answered."""
    from caproto import AlarmSeverity, AlarmStatus

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    names = ["cn", "cn_uncertainty", "motif", "distance", "valence", "e0"]
    names += ["cn_set", "ood", "ood_score"]
    pvs = dict(zip(names, ctx.get_pvs(*(ioc.pv(n) for n in names), timeout=5.0), strict=True))

    def reading(name: str) -> tuple[Any, Any, Any]:
        got = pvs[name].read(data_type="time", timeout=5.0)
        value = got.data[0]
        value = value.decode() if isinstance(value, bytes) else value
        return value, got.metadata.status, got.metadata.severity

    fresh = {n: reading(n) for n in names}
    assert {n: r[1:] for n, r in fresh.items()} == dict.fromkeys(
        names, (AlarmStatus.UDF, AlarmSeverity.INVALID_ALARM)
    )
    assert [fresh[n][0] for n in ("cn", "valence", "ood", "motif", "cn_set")] == [0, 0, 0, "", ""]
    assert all(math.isnan(fresh[n][0]) for n in ("cn_uncertainty", "distance", "e0", "ood_score"))
    answer = {"status": "ok", "cn": 4, "cn_probability": 0.9, "motif": "CN4-tetrahedral"}
    ioc.publish({**answer, "distance": 1.95, "valence": 2, "e0": 8984.0}, scan_uid="raw-A")
    wait_for(lambda: reading("cn")[0] == 4, what="the first answer")
    assert {n: reading(n)[2] for n in names} == dict.fromkeys(names, AlarmSeverity.NO_ALARM)


def test_a_run_that_ends_withdraws_its_stop_early_and_keeps_its_regions(
    ioc_env: dict[str, Any],
) -> None:
    """A run that has ended (its stop, or closed as timed out) can no longer stop early, yet
    STOP_EARLY stayed 1 after it until the next raw start was read: to a step run D still
    scanning beside a fly run C that started later and ended first, STOP_EARLY read C's
    certainty for the rest of D's scan, and to the next scan for as long as its start took
    to reach the daemon. The end of the run the advice PVs belong to sets it to 0; the
    regions (the advice for the next scan) and ADVICE_UID stay, and the end of another run
    touches nothing."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    stop, nreg, advice = ctx.get_pvs(
        ioc.pv("stop_early"), ioc.pv("n_regions"), ioc.pv("advice_uid"), timeout=5.0
    )
    certain = ("recommendations", {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": True})
    answer = ("primary", {"status": "ok", "cn": 4, "e0": 8984.0})
    ioc.raw_run_started("raw-D")  # a step run, scanning on
    ioc.raw_run_started("raw-C")  # a fly run beside it: the advice PVs are its
    timed_out = {"exit_status": "fail", "raw_exit_status": "timeout"}  # as documents has it
    run_c = analysis_run_docs([answer, certain], raw_uid="raw-C", stop=timed_out)
    for name, doc in run_c[:-1]:
        ioc(name, doc)
    wait_for(lambda: (read(stop), read(advice)) == (1, "raw-C"), what="run C's certainty")
    ioc(*run_c[-1])  # closed as timed out: no document for run_timeout_s
    ioc.flush()
    assert (read(stop), read(nreg), read(advice)) == (0, 1, "raw-C")
    run_e = analysis_run_docs([answer, certain], raw_uid="raw-E")
    ioc.raw_run_started("raw-E")
    for name, doc in run_e[:-1]:
        ioc(name, doc)
    wait_for(lambda: (read(stop), read(advice)) == (1, "raw-E"), what="run E's certainty")
    for name, doc in analysis_run_docs([answer], raw_uid="raw-D"):  # D ends: not the advice's
        ioc(name, doc)
    ioc.flush()
    assert (read(stop), read(advice)) == (1, "raw-E")
    ioc(*run_e[-1])  # E's stop
    ioc.flush()
    assert (read(stop), read(nreg), read(advice)) == (0, 1, "raw-E")


def test_updates_wraps_as_heartbeat_does_never_negative(ioc_env: dict[str, Any]) -> None:
    """UPDATES is a 32-bit long: past 2**31 answers (25 days at 1,000 spectra/s) it read
    -2147483648 and on, a count gone negative (HEARTBEAT wraps at 2e9 for this). It wraps
    there too; ``published`` (in /health) keeps counting."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    (updates,) = ctx.get_pvs(ioc.pv("updates"), timeout=5.0)
    ioc.published = 2**31 - 1
    ioc.publish({"status": "ok", "cn": 4}, scan_uid="raw-A")
    ioc.flush()
    assert ioc.published == 2**31
    assert read(updates) == 2**31 % 2_000_000_000


def test_status_never_reads_ok_beside_an_out_of_domain_answer(ioc_env: dict[str, Any]) -> None:
    """STATUS read "ok", with no alarm, while OOD was 1 and every answer PV was in MAJOR alarm:
    an operator glancing at STATUS read "ok" beside an answer not to trust. It reads
    "out_of_domain" in MAJOR alarm (its own: HEARTBEAT and the other PVs of the group's shared
    alarm stay green); a rejection's STATUS is as before, with no alarm, and the next answer in
    domain reads "ok" again."""
    from caproto import AlarmSeverity, AlarmStatus

    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    status, ood, beat = ctx.get_pvs(
        ioc.pv("status"), ioc.pv("ood"), ioc.pv("heartbeat"), timeout=5.0
    )

    def reading(pv: Any) -> tuple[Any, Any, Any]:
        got = pv.read(data_type="time", timeout=5.0)
        value = got.data[0]
        value = value.decode() if isinstance(value, bytes) else value
        return value, got.metadata.status, got.metadata.severity

    answer = {"status": "ok", "cn": 4, "cn_probability": 0.9, "e0": 8984.0}
    doubt = {**answer, "cn_set": "2,4", "out_of_domain": True, "ood_score": 7.0}
    for name, doc in analysis_run_docs([("primary", doubt)], raw_uid="raw-A"):
        ioc(name, doc)
    wait_for(lambda: read(ood) == 1, what="the out-of-domain answer")
    major = (AlarmStatus.STATE, AlarmSeverity.MAJOR_ALARM)
    assert reading(status) == ("out_of_domain", *major)
    assert reading(beat)[2] == AlarmSeverity.NO_ALARM
    ioc.publish({"tasks": {"cn": {"value": 4}}, "flags": ["out_of_domain"]}, scan_uid="raw-P")
    ioc.flush()  # a Prediction.to_dict() out of domain says the same
    assert reading(status) == ("out_of_domain", *major)
    rejected = {"status": "rejected", "reason": "no_edge"}
    for name, doc in analysis_run_docs([("primary", rejected)], raw_uid="3e6d2331-bbbb"):
        ioc(name, doc)
    ioc.flush()
    none = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
    assert reading(status) == ("rejected no_edge (3e6d2331)", *none)
    for name, doc in analysis_run_docs([("primary", answer)], raw_uid="raw-B"):
        ioc(name, doc)
    ioc.flush()
    assert reading(status) == ("ok", *none) and read(ood) == 0


def test_a_string_cut_to_fit_its_pv_says_so(ioc_env: dict[str, Any]) -> None:
    """A string PV holds 39 characters: a longer MOTIF, BUNDLE_ID or CN_SET was cut there
    without a mark, so a cut motif or bundle read as a whole one and a set's last label could
    read as another ("16" cut to "1"). A cut value ends with "~" within the 39 (ASCII, as
    Channel Access strings are); CN_SET keeps whole labels; 39 characters are kept whole."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    motif, bundle, cn_set, cn = ctx.get_pvs(
        ioc.pv("motif"), ioc.pv("bundle_id"), ioc.pv("cn_set"), ioc.pv("cn"), timeout=5.0
    )
    answer = {
        "status": "ok",
        "cn": 8,
        "motif": "CN8-square antiprismatic, distorted towards dodecahedral",  # 56
        "bundle_id": "cu-k-20261129T045151Z-0123abcd-herfd-quantised",  # 46
        "cn_set": ",".join(str(k) for k in range(1, 21)),  # 1,2,...,20: 50
        "e0": 8984.0,
    }
    ioc.publish(answer, scan_uid="raw-A")
    wait_for(lambda: read(cn) == 8, what="the answer")
    assert read(motif) == "CN8-square antiprismatic, distorted to~"
    assert read(bundle) == "cu-k-20261129T045151Z-0123abcd-herfd-q~"
    assert read(cn_set) == "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,~"
    assert max(len(read(pv)) for pv in (motif, bundle, cn_set)) == 39
    whole = "x" * 38 + "z"  # 39: it fits, nothing is cut
    ioc.publish({**answer, "cn": 6, "motif": whole, "bundle_id": "cu-k-1", "cn_set": "6"}, "B")
    wait_for(lambda: read(cn) == 6, what="the next answer")
    assert (read(motif), read(bundle), read(cn_set)) == (whole, "cu-k-1", "6")


def test_advice_cut_to_the_regions_the_pv_holds_is_logged_once_per_run(
    ioc_env: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """REGIONS holds 64 regions: advice with more was cut to them without a word, so a plan
    following the PVs scanned part of what was advised and nobody knew. The first 64 are
    still written (N_REGIONS 64), each cut advice is counted, and the IOC logs a warning
    once per run saying how many regions were left out."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    nreg, regions, advice = ctx.get_pvs(
        ioc.pv("n_regions"), ioc.pv("regions"), ioc.pv("advice_uid"), timeout=5.0
    )
    many = [[8900.0 + 10 * k, 8905.0 + 10 * k, 0.5, 1.0] for k in range(MAX_REGIONS + 6)]
    flat = [v for region in many for v in region]
    rec = {"waveform": json.dumps(flat), "stop_early": False}
    with caplog.at_level("WARNING", logger="xasflow.adapters.epics_ioc"):
        for raw_uid in ("raw-A", "raw-B"):
            run = analysis_run_docs(
                [("recommendations", rec), ("recommendations", rec)], raw_uid=raw_uid
            )
            for name, doc in run:
                ioc(name, doc)
            ioc.flush()
            assert (read(advice), read(nreg)) == (raw_uid, MAX_REGIONS)
            assert read(regions) == pytest.approx(flat[: 4 * MAX_REGIONS])
    cut = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(cut) == 2, cut  # one per run, not one per advice
    assert "run raw-A has 70 regions; REGIONS holds the first 64, 6 left out" in cut[0]
    assert "run raw-B" in cut[1]
    assert ioc.regions_cut == 4
    config = DaemonConfig.model_validate({"epics": {"enabled": True}})
    epics = feedback_health(config, ioc, None)["epics"]  # what /health shows of it
    assert (epics["regions_cut"], epics["advice_dropped"]) == (4, 0)


def test_advice_bundle_names_the_advices_bundle_not_the_last_answers(
    ioc_env: dict[str, Any],
) -> None:
    """BUNDLE_ID names the bundle of the last answer, of whichever run: with a step run D
    scanning beside fly run C (whose advice the PVs hold), D's answer from another bundle
    made BUNDLE_ID name it, and no PV said which bundle C's regions came from. ADVICE_BUNDLE
    is written with the advice (withheld advice too) and cleared with it."""
    ioc, ctx = ioc_env["ioc"], ioc_env["ctx"]
    names = ("bundle_id", "advice_bundle", "advice_uid", "n_regions", "cn")
    pvs = dict(zip(names, ctx.get_pvs(*(ioc.pv(n) for n in names), timeout=5.0), strict=True))
    ioc.raw_run_started("raw-D")  # a step run of another element, scanning on
    ioc.raw_run_started("raw-C")  # a fly run beside it: the advice PVs are its
    rec = {"waveform": json.dumps([1, 2, 0.5, 1]), "stop_early": False}
    answer = {"status": "ok", "cn": 4, "e0": 8984.0, "bundle_id": "cu-k-v1"}
    run_c = analysis_run_docs(
        [("primary", answer), ("recommendations", {**rec, "bundle_id": "cu-k-v1"})],
        raw_uid="raw-C",
    )
    for name, doc in run_c[:-1]:
        ioc(name, doc)
    ioc.flush()
    assert [read(pvs[n]) for n in names] == ["cu-k-v1", "cu-k-v1", "raw-C", 1, 4]
    other = {**answer, "cn": 6, "e0": 8333.0, "bundle_id": "ni-k-v2"}
    run_d = analysis_run_docs(
        [("primary", other), ("recommendations", {**rec, "bundle_id": "ni-k-v2"})],
        raw_uid="raw-D",
    )
    for name, doc in run_d[:-1]:  # D's answer is written, its advice (not the PVs' run) not
        ioc(name, doc)
    ioc.flush()
    assert [read(pvs[n]) for n in names] == ["ni-k-v2", "cu-k-v1", "raw-C", 1, 6]
    ioc.raw_run_started("raw-E")  # the next scan: no advice, no advice bundle yet
    ioc.flush()
    assert [read(pvs[n]) for n in ("advice_bundle", "advice_uid", "n_regions")] == ["", "raw-E", 0]
    doubt = {**rec, "bundle_id": "cu-k-v1", "out_of_domain": True}
    for name, doc in analysis_run_docs([("recommendations", doubt)], raw_uid="raw-E")[:-1]:
        ioc(name, doc)
    ioc.flush()
    assert [read(pvs[n]) for n in ("advice_bundle", "advice_uid", "n_regions")] == [
        "cu-k-v1",
        "raw-E",
        0,
    ]
