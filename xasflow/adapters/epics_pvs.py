"""The IOC's PV database: each PV's name and type, and how an analysis answer maps onto them.

Under a configurable prefix (``XAS:`` below), served by
:class:`~xasflow.adapters.epics_ioc.XasIoc`:

=====================  ========  =====================================================
PV                     type      meaning
=====================  ========  =====================================================
``XAS:CN``             long      latest predicted dominant coordination number
``XAS:CN_UNC``         double    its uncertainty, 1 - top cn probability
``XAS:CN_SET``         string    90 % conformal set of CN, e.g. ``4,6`` ("" if none)
``XAS:OOD``            long      1: the spectrum is out of the bundle's domain, CN not to trust
``XAS:OOD_SCORE``      double    the bundle's out-of-domain score (NaN if none)
``XAS:MOTIF``          string    top-ranked coordination motif
``XAS:DISTANCE``       double    mean nearest-neighbour distance, angstrom
``XAS:VALENCE``        long      oxidation state
``XAS:E0``             double    edge energy E0, eV
``XAS:SCAN_UID``       string    uid of the raw run the answer belongs to
``XAS:BUNDLE_ID``      string    model bundle that made it
``XAS:STATUS``         string    the last spectrum: ``ok``, ``out_of_domain`` (MAJOR), or
                                 ``rejected <reason> (<raw run>)``
``XAS:REGIONS``        double[]  recommended regions, ``[start, stop, step, dwell] * n``
``XAS:N_REGIONS``      long      number of regions in ``XAS:REGIONS`` (at most 64)
``XAS:STOP_EARLY``     long      1: the recommender says the answer is already certain
``XAS:ADVICE_UID``     string    uid of the raw run the three advice PVs above belong to
``XAS:ADVICE_BUNDLE``  string    model bundle the advice came from ("" with no advice yet)
``XAS:HEARTBEAT``      long      +1 every ``HEARTBEAT_PERIOD`` s while the IOC runs
``XAS:LOOP_AGE``       double    s since the analysis loop's last pass (MAJOR over 60 s)
``XAS:MODEL_OK``       long      1: a bundle serves; 0 with none, or no_model/prediction_error
``XAS:UPDATES``        long      answers published (advice is not one), wrapping at 2e9
=====================  ========  =====================================================

A string PV holds 39 characters (:data:`STRING_MAX`, Channel Access's 40 bytes): a longer
value is cut to 38 and ends with ``~`` (:data:`CUT_MARK`), so a cut motif, bundle or uid never
reads as a whole one (``CN_SET`` keeps whole labels: ``1,2,...,11,~``). Characters outside
latin-1, which Channel Access strings are, read as ``?``.

``BUNDLE_ID`` names the bundle of the last answer, of whichever run; the advice may be
another's (a run scanning beside the advice's, or a bundle swapped in since the advice), so
``ADVICE_BUNDLE`` names the advice's own, written with it (withheld advice too).

The advice PVs are cleared (no regions, ``STOP_EARLY`` 0, ``ADVICE_UID`` the new run,
``ADVICE_BUNDLE`` "") as a
raw run's start arrives (the daemon's raw-start hook, before its first result), and again when
its analysis run starts, so a plan watching ``STOP_EARLY`` never stops a new scan on the last
one's certainty; advice of an earlier run that comes after (its last spectra analysed later)
is not written (:mod:`xasflow.adapters.epics_advice`). A rejected spectrum of the advice's run
withdraws ``STOP_EARLY`` (the spectra "in a row" start again), and so does the run's end (its
stop, or closed as timed out; its regions and ``ADVICE_UID`` stay). Advice that follows an
out-of-domain answer is withheld: no regions, ``STOP_EARLY`` 0, and the three advice PVs in
``MAJOR`` alarm until the next advice or run. ``REGIONS`` holds :data:`MAX_REGIONS` regions
(a recommendation has about 10): of advice with more, the first 64 are written, and the IOC
logs a warning, once per run, saying how many were left out (``XasIoc.regions_cut`` counts
each advice cut).

``MODEL_OK`` follows whether a bundle is served, and drops to 0 for the last spectrum's
fault too: one no bundle covers (``no_model``: another element, the wrong edge) or one the
graphs failed on (``prediction_error``), until the next analysed spectrum sets it back to 1.
So it answers "can the beamline's current spectra be analysed", not only "is a file loaded".

``HEARTBEAT`` counts in the IOC's own thread, whatever the analysis does. ``LOOP_AGE`` is
the analysis's own sign of life: the daemon's processing loop passes every 50 ms when idle,
so it reads near 0 on a quiet beamline and grows only while one document or batch holds
the loop (a hung store, a stuck call); above :data:`LOOP_STALLED_S` it is in ``MAJOR``
alarm (read every ``HEARTBEAT_PERIOD`` s from :attr:`XasPVGroup.loop_age_source`).

An answer's uncertainty PVs are written with its CN: a bundle without conformal sets or an
out-of-domain score clears ``CN_SET`` and ``OOD_SCORE`` rather than leaving an older answer's.

Every answer writes all the answer PVs (:data:`ANSWER_PVS`), with EPICS alarms a display shows:
a value the answer lacks (a bundle without that head, a regressor output or a cn probability
that is not finite, a label a 32-bit ``long`` cannot hold) is written as its placeholder (0 or
NaN) with an ``INVALID`` alarm, never left at an older answer's; an answer out of the bundle's
domain carries a ``MAJOR`` alarm on each of them, and on ``CN_SET``, ``OOD`` and ``OOD_SCORE``
(:data:`DOUBT_PVS`), so an operator's panel shows the whole answer red, never a green set
beside a red CN; ``STATUS`` then reads ``out_of_domain`` (:data:`OUT_OF_DOMAIN`), in ``MAJOR``
alarm too, never ``ok`` beside an answer not to trust (a rejection's ``STATUS`` has no
alarm). Before the first answer (a daemon just started) they all hold their placeholder in
``INVALID`` alarm (``UDF``), as an EPICS record not yet processed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

__all__ = [
    "ADVICE_KEYS",
    "ANSWER_PVS",
    "COUNT_WRAP",
    "CUT_MARK",
    "DOUBT_PVS",
    "HEARTBEAT_PERIOD",
    "LOOP_STALLED_S",
    "MAX_REGIONS",
    "NO_ADVICE",
    "OUT_OF_DOMAIN",
    "REGIONS_ADVISED",
    "STRING_MAX",
    "STRING_PVS",
    "UNDEFINED",
    "XasPVGroup",
    "string_value",
    "values_from",
]

#: Seconds between heartbeat increments.
HEARTBEAT_PERIOD = 1.0
#: Where the counting PVs (``HEARTBEAT``, ``UPDATES``) wrap to 0: a 32-bit long read past
#: 2**31 - 1 as a negative count.
COUNT_WRAP = 2_000_000_000
#: Seconds without a pass of the analysis loop after which ``LOOP_AGE`` is in MAJOR alarm
#: (as the XasflowProcessingStalled alert).
LOOP_STALLED_S = 60.0
#: Regions the waveform can hold (4 numbers each). A recommendation has about 10, some 20
#: with fine k pieces; 16 used to cut the support regions at the list's end.
MAX_REGIONS = 64
#: In :func:`values_from`'s result, not a PV: the regions advised when more than
#: :data:`MAX_REGIONS` (``REGIONS`` holds the first ones).
REGIONS_ADVISED = "_regions_advised"
#: Characters a string PV keeps (DBR_STRING holds 40 bytes with the terminator).
STRING_MAX = 39
#: The last character of a string PV's value cut to :data:`STRING_MAX` (ASCII, as CA strings).
CUT_MARK = "~"
#: The string PVs (their values go through :func:`string_value`).
STRING_PVS = frozenset(
    {"motif", "scan_uid", "bundle_id", "cn_set", "status", "advice_uid", "advice_bundle"}
)
#: The PVs a recommendation sets (its other fields, E0 and the bundle, are not an answer).
ADVICE_KEYS = ("regions", "n_regions", "stop_early")
#: PVs every answer writes, and the placeholder of each when the answer has no value for it.
ANSWER_PVS: dict[str, Any] = {
    "cn": 0,
    "cn_uncertainty": math.nan,
    "motif": "",
    "distance": math.nan,
    "valence": 0,
    "e0": math.nan,
}

#: ``STATUS`` of an answer out of the bundle's domain (in MAJOR alarm; an answer in it: "ok").
OUT_OF_DOMAIN = "out_of_domain"
#: PVs beside the answer that share its out-of-domain alarm (each written with every answer).
DOUBT_PVS = frozenset({"cn_set", "ood", "ood_score"})


class _Undefined:
    """The marker of an answer PV the answer has no value for."""

    def __repr__(self) -> str:
        return "UNDEFINED"


#: In :func:`values_from`'s result: the answer has no value for this PV.
UNDEFINED: Any = _Undefined()

#: The advice PVs at an analysis run's start: nothing advised yet.
NO_ADVICE: dict[str, Any] = {"regions": [], "n_regions": 0, "stop_early": 0}


class XasPVGroup(PVGroup):
    """The PVs (see the module docstring); values are written by :class:`XasIoc`."""

    # each answer PV has an alarm of its own (caproto shares one per group by default)
    cn = pvproperty(
        value=0, name="CN", read_only=True, alarm_group="cn", doc="dominant coordination number"
    )
    cn_uncertainty = pvproperty(
        value=1.0,
        name="CN_UNC",
        read_only=True,
        precision=3,
        alarm_group="cn_uncertainty",
        doc="1 - top cn probability",
    )
    cn_set = pvproperty(
        value="",
        name="CN_SET",
        dtype=ChannelType.STRING,
        read_only=True,
        alarm_group="cn_set",
        doc="90% CN set",
    )
    ood = pvproperty(
        value=0, name="OOD", read_only=True, alarm_group="ood", doc="1: out of domain, do not trust"
    )
    ood_score = pvproperty(
        value=math.nan, name="OOD_SCORE", read_only=True, precision=3, alarm_group="ood_score"
    )
    motif = pvproperty(
        value="",
        name="MOTIF",
        dtype=ChannelType.STRING,
        read_only=True,
        alarm_group="motif",
        doc="top motif",
    )
    distance = pvproperty(
        value=0.0,
        name="DISTANCE",
        read_only=True,
        precision=3,
        units="angstrom",
        alarm_group="distance",
    )
    valence = pvproperty(
        value=0, name="VALENCE", read_only=True, alarm_group="valence", doc="oxidation state"
    )
    e0 = pvproperty(value=0.0, name="E0", read_only=True, precision=2, units="eV", alarm_group="e0")
    scan_uid = pvproperty(value="", name="SCAN_UID", dtype=ChannelType.STRING, read_only=True)
    status = pvproperty(
        value="",
        name="STATUS",
        dtype=ChannelType.STRING,
        read_only=True,
        alarm_group="status",
        doc="the last spectrum: ok, out_of_domain, or rejected <reason> (<raw run>)",
    )
    bundle_id = pvproperty(value="", name="BUNDLE_ID", dtype=ChannelType.STRING, read_only=True)
    # the three advice PVs share one alarm (MAJOR while advice after an out-of-domain answer
    # is withheld), apart from the group's default one
    regions = pvproperty(
        value=[0.0] * 4,
        name="REGIONS",
        dtype=float,
        max_length=4 * MAX_REGIONS,
        read_only=True,
        alarm_group="advice",
        doc="[start, stop, step, dwell] * n_regions (eV, eV, eV, s)",
    )
    n_regions = pvproperty(value=0, name="N_REGIONS", read_only=True, alarm_group="advice")
    stop_early = pvproperty(value=0, name="STOP_EARLY", read_only=True, alarm_group="advice")
    advice_uid = pvproperty(value="", name="ADVICE_UID", dtype=ChannelType.STRING, read_only=True)
    advice_bundle = pvproperty(
        value="", name="ADVICE_BUNDLE", dtype=ChannelType.STRING, read_only=True
    )
    heartbeat = pvproperty(value=0, name="HEARTBEAT", read_only=True)
    model_ok = pvproperty(value=0, name="MODEL_OK", read_only=True)
    updates = pvproperty(value=0, name="UPDATES", read_only=True)
    loop_age = pvproperty(
        value=0.0,
        name="LOOP_AGE",
        read_only=True,
        precision=1,
        units="s",
        alarm_group="loop_age",
        doc="seconds since the analysis loop's last pass: a stall grows it",
    )
    #: The analysis loop's age in seconds (None: none runs), read by ``LOOP_AGE``'s scan; the
    #: daemon sets it once its processing loop is built.
    loop_age_source: Callable[[], float | None] | None = None

    @loop_age.scan(period=HEARTBEAT_PERIOD)  # type: ignore[no-redef]
    async def loop_age(self, instance: Any, async_lib: Any) -> None:
        """Write the loop's age, in MAJOR alarm above :data:`LOOP_STALLED_S`."""
        age = self.loop_age_source() if self.loop_age_source is not None else None
        if age is None:
            return
        stalled = age > LOOP_STALLED_S
        severity = AlarmSeverity.MAJOR_ALARM if stalled else AlarmSeverity.NO_ALARM
        if instance.alarm.severity != severity:  # first, unpublished: the value publishes it
            status = AlarmStatus.STATE if stalled else AlarmStatus.NO_ALARM
            await instance.alarm.write(status=status, severity=severity, publish=False)
        await instance.write(round(age, 1), verify_value=False)

    @heartbeat.scan(period=HEARTBEAT_PERIOD)  # type: ignore[no-redef]
    async def heartbeat(self, instance: Any, async_lib: Any) -> None:
        """Count up while the IOC's own loop is alive. It runs in the IOC's thread, so a
        stalled analysis or a silent input does not stop the count (``UPDATES`` counts
        answers)."""
        await instance.write((instance.value + 1) % COUNT_WRAP)


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


#: What a ``long`` PV holds (DBR_LONG is 32-bit): past it a value wrapped, or made the PV
#: unreadable (the server's conversion raised at every read).
_LONG_RANGE = (-(2**31), 2**31 - 1)


def _int(value: Any) -> int | None:
    """A finite number as an int a ``long`` PV holds, else None (the answer lacks it)."""
    f = _finite(value)
    if f is None or not _LONG_RANGE[0] <= round(f) <= _LONG_RANGE[1]:
        return None
    return round(f)


def _uncertainty(probability: Any) -> float | None:
    """1 - a finite cn probability, else None (NaN or inf made CN_UNC NaN or -inf, no alarm)."""
    p = _finite(probability)
    return None if p is None else 1.0 - p


def values_from(data: Mapping[str, Any]) -> dict[str, Any]:
    """PV values found in a prediction dict, an analysis event's data or a recommendation row.

    Keys that are absent or None leave their PV alone, except that an analysed spectrum with no
    motif (none known for its CN) clears ``MOTIF`` rather than leave the last one. A rejected
    analysis event gives only ``model_ok = 0``.
    """
    out: dict[str, Any] = {}
    if data.get("status") == "rejected":
        return {"model_ok": 0}
    tasks = data.get("tasks")
    if isinstance(tasks, Mapping):  # Prediction.to_dict()
        cn = tasks.get("cn") or {}
        probs = cn.get("probabilities") or {}
        if cn.get("value") is not None:
            out["cn"] = _int(cn["value"])
        if probs:
            # any not finite: none (max() over a NaN depends on where the NaN stands)
            finite = [f for f in map(_finite, probs.values()) if f is not None]
            out["cn_uncertainty"] = _uncertainty(max(finite)) if len(finite) == len(probs) else None
        cn_set = cn.get("prediction_set")
        out["cn_set"] = ",".join(_label(v) for v in cn_set) if cn_set else ""
        out["ood"] = int("out_of_domain" in (data.get("flags") or ()))
        out["ood_score"] = _finite(data.get("ood_score"))
        if "environment" in tasks:  # None: no motif of the CN answered, so the PV is cleared
            value = (tasks["environment"] or {}).get("value")
            out["motif"] = "" if value is None else str(value)
        for task, key in (("distance", "distance"), ("valence", "valence")):
            value = (tasks.get(task) or {}).get("value")
            if value is not None:
                out[key] = _finite(value) if key == "distance" else _int(value)
        out["model_ok"] = 1
        out["status"] = "ok"
    else:  # an analysis primary event's data (xasflow.daemon.analysis_rows.DATA_KEYS)
        if data.get("cn") is not None:
            out["cn"] = _int(data["cn"])
        if data.get("cn_probability") is not None:
            out["cn_uncertainty"] = _uncertainty(data["cn_probability"])
        if data.get("status") == "ok":
            out["cn_set"] = str(data.get("cn_set") or "")
            out["ood"] = int(bool(data.get("out_of_domain")))
            out["ood_score"] = _finite(data.get("ood_score"))
        if data.get("motif") is not None:
            out["motif"] = str(data["motif"])
        elif data.get("status") == "ok":  # analysed, no motif of its CN: never a stale one
            out["motif"] = ""
        if data.get("distance") is not None:
            out["distance"] = _finite(data["distance"])
        if data.get("valence") is not None:
            out["valence"] = _int(data["valence"])
        if data.get("status") == "ok":
            out["model_ok"] = 1
            out["status"] = "ok"
    if data.get("e0") is not None:
        out["e0"] = _finite(data["e0"])
    if data.get("bundle_id"):
        out["bundle_id"] = str(data["bundle_id"])
    waveform = data.get("waveform")
    if isinstance(waveform, str) and waveform:
        waveform = json.loads(waveform)
    if waveform is None and isinstance(data.get("regions"), list):  # Recommendation.to_dict()
        waveform = [
            float(r[k]) for r in data["regions"] for k in ("start", "stop", "step", "dwell")
        ]
    if waveform is not None:
        flat = [float(v) for v in waveform]
        out["regions"] = flat[: 4 * MAX_REGIONS]
        out["n_regions"] = len(out["regions"]) // 4
        if len(flat) > 4 * MAX_REGIONS:  # not a PV: the IOC says what the cut left out
            out[REGIONS_ADVISED] = len(flat) // 4
    if data.get("stop_early") is not None:
        out["stop_early"] = int(bool(data["stop_early"]))
    if "ood" in out and out.get("ood_score") is None:
        out["ood_score"] = math.nan  # an answer without a score clears the previous one
    if out.get("status") == "ok":  # an answer: each answer PV it has no value for is undefined
        if out.get("ood"):  # never "ok" beside an answer not to trust
            out["status"] = OUT_OF_DOMAIN
        for key in ANSWER_PVS:
            if out.get(key) is None:
                out[key] = UNDEFINED
    return {k: v for k, v in out.items() if v is not None}


def _label(value: Any) -> str:
    """A class label as text (4.0 -> "4")."""
    f = _finite(value) if not isinstance(value, str) else None
    return str(round(f)) if f is not None and f == round(f) else str(value)


def string_value(attr: str, value: Any) -> str:
    """What a string PV holds for ``value``: at most :data:`STRING_MAX` latin-1 characters.

    A longer value is cut and ends with :data:`CUT_MARK`, where before it was cut silently
    (``CN_SET`` to whole labels). Channel Access strings are latin-1: a uid with an en dash or
    an emoji made the PV unreadable (caproto encodes when a client reads), so such characters
    read as ``?``.
    """
    text = str(value)
    if len(text) > STRING_MAX:
        head = text[: STRING_MAX - len(CUT_MARK)]
        if attr == "cn_set" and "," in head:  # never a label cut to another: "12" to "1"
            head = head[: head.rindex(",") + 1]
        text = head + CUT_MARK
    return text.encode("latin-1", "replace").decode("latin-1")
