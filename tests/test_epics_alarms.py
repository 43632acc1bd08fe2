"""The IOC's alarms: a value the answer lacks or has not given yet, an out-of-domain answer,
STATUS beside it, and a stalled analysis loop (LOOP_AGE), read with their alarm status and
severity by caproto's client on loopback (``ioc_env``: conftest, epics_support)."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("caproto")

from epics_support import read_alarm
from helpers import analysis_run_docs, wait_for
from helpers import read_pv as read


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
        return read_alarm(pvs[name])

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

    answer = {"status": "ok", "cn": 4, "cn_probability": 0.9, "e0": 8984.0}
    doubt = {**answer, "cn_set": "2,4", "out_of_domain": True, "ood_score": 7.0}
    for name, doc in analysis_run_docs([("primary", doubt)], raw_uid="raw-A"):
        ioc(name, doc)
    wait_for(lambda: read(ood) == 1, what="the out-of-domain answer")
    major = (AlarmStatus.STATE, AlarmSeverity.MAJOR_ALARM)
    assert read_alarm(status) == ("out_of_domain", *major)
    assert read_alarm(beat)[2] == AlarmSeverity.NO_ALARM
    ioc.publish({"tasks": {"cn": {"value": 4}}, "flags": ["out_of_domain"]}, scan_uid="raw-P")
    ioc.flush()  # a Prediction.to_dict() out of domain says the same
    assert read_alarm(status) == ("out_of_domain", *major)
    rejected = {"status": "rejected", "reason": "no_edge"}
    for name, doc in analysis_run_docs([("primary", rejected)], raw_uid="3e6d2331-bbbb"):
        ioc(name, doc)
    ioc.flush()
    none = (AlarmStatus.NO_ALARM, AlarmSeverity.NO_ALARM)
    assert read_alarm(status) == ("rejected no_edge (3e6d2331)", *none)
    for name, doc in analysis_run_docs([("primary", answer)], raw_uid="raw-B"):
        ioc(name, doc)
    ioc.flush()
    assert read_alarm(status) == ("ok", *none) and read(ood) == 0
