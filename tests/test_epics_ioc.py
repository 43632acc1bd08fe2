"""The daemon's caproto IOC: what its PVs read after an answer, and what a value the PV's type
cannot hold becomes (conversion in :mod:`xasflow.adapters.epics_pvs`), read and monitored by
caproto's threading client on loopback (``ioc_env``: conftest, epics_support)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

pytest.importorskip("caproto")

from helpers import analysis_run_docs, wait_for
from helpers import read_pv as read

from xasflow.adapters.epics_pvs import MAX_REGIONS, REGIONS_ADVISED, UNDEFINED, values_from


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
