"""What ``xasflow demo`` prints: each analysis result on the bus as one line, each run's end.

:class:`Printer` follows the analysis runs (an event-model ``RunRouter``, one
:class:`_RunPrinter` per run) from a 0MQ source in a thread of its own.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, TextIO

from xasflow.adapters.routing import SafeRouter, SinkRouter, stream_factory

__all__ = ["LastDocument", "Printer", "format_counts", "format_result", "say"]

#: One line at a time on the demo's output: the beamline relay and the result printer are two
#: threads, and ``print`` writes a line and its newline separately, so lines could run together.
_SAY = threading.Lock()


def say(out: TextIO, line: str) -> None:
    """Write ``line`` and its newline to ``out`` whole, then flush (thread-safe)."""
    with _SAY:
        out.write(line + "\n")
        out.flush()


def format_result(doc: dict[str, Any], label: str = "") -> str:
    """One line for an analysis event: the predictions, or the rejection reason."""
    d = doc.get("data", {})
    head = f"{label} #{d.get('index')}" if label else f"spectrum #{d.get('index')}"
    if d.get("status") != "ok":
        return f"{head}: rejected {d.get('reason')}: {d.get('detail') or ''}".rstrip()
    parts = []
    if d.get("cn") is not None:
        p = d.get("cn_probability")
        doubt = [f"p {p:.2f}"] if isinstance(p, float) else []
        if d.get("cn_set"):  # the conformal set: one value is a sure answer
            doubt.append(f"set {{{d['cn_set']}}}")
        parts.append(f"CN {d['cn']}" + (f" ({', '.join(doubt)})" if doubt else ""))
    if d.get("motif"):
        parts.append(f"motif {d['motif']}")
    if _finite(d.get("distance")):
        parts.append(f"d {d['distance']:.2f} Å")
    if d.get("valence") is not None:
        parts.append(f"valence {d['valence']:+d}")
    if _finite(d.get("charge")):
        parts.append(f"charge {d['charge']:+.2f}")
    if _finite(d.get("e0")):
        parts.append(f"E0 {d['e0']:.1f} eV")
    if _finite(d.get("energy_shift")):
        parts.append(f"shift {d['energy_shift']:+.2f} eV")
    if _finite(d.get("latency_ms")):
        parts.append(f"{d['latency_ms']:.1f} ms")
    flags = f" [{d['flags']}]" if d.get("flags") else ""
    return f"{head}: " + ", ".join(parts) + flags


def format_counts(c: dict[str, Any]) -> str:
    """The demo's last line: the daemon's counters (``Counters.snapshot()``) and latency.

    Spectra received = analysed + rejected by the analysis; what the assembler rejected
    before it (a scan cut by Ctrl-C: ``missing_stop``) was never received, so it is told
    apart, as ``Counters.summary`` does.
    """
    stages = c.get("rejected_by_stage", {})
    analysis, before = stages.get("analysis", {}), stages.get("assembly", {})
    line = (
        f"{c['spectra_received']} spectra received, {c['spectra_analysed']} analysed, "
        f"{sum(analysis.values())} rejected {analysis or ''}"
    ).rstrip()
    if before:
        line += f"; {sum(before.values())} rejected before the analysis {before}"
    return (
        f"{line}; latency p50 {c['latency']['p50_ms'] or 0:.1f} ms, "
        f"p99 {c['latency']['p99_ms'] or 0:.1f} ms"
    )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _describe_expected(info: dict[str, Any]) -> str:
    exp = info.get("expected") or {}
    if not isinstance(exp, dict) or not exp:
        return ""
    valence = exp.get("oxidation_state")
    shown = f"{valence:+d}" if isinstance(valence, int) else str(valence)
    return f"expected CN {exp.get('cn')}, {exp.get('motif')}, valence {shown}"


class Printer:
    """Follows analysis runs on the bus and prints them; counts finished runs."""

    def __init__(self, source: Any, out: TextIO) -> None:
        self.source = source
        self.out = out
        self.runs: dict[str, dict[str, Any]] = {}  # raw uid -> beamline info
        self._router = SafeRouter(
            [stream_factory({}, on_run=lambda start: [_RunPrinter(self, start)])], "demo printer"
        )
        self.finished = 0
        self.analysed = 0
        self.rejected = 0
        self.documents = 0  # documents taken from the source (each printed, or not to print)
        self.last: str | None = None  # the uid of the last document taken
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="xasflow-demo-print", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def note_run(self, info: dict[str, Any]) -> None:
        with self._lock:
            self.runs[str(info.get("run"))] = info
        exp = _describe_expected(info)
        self._print(
            f"beamline: {info.get('scan')} scan of {info.get('sample')} started "
            f"({str(info.get('run'))[:8]})" + (f"; {exp}" if exp else "")
        )

    def _print(self, line: str) -> None:
        say(self.out, line)

    def _label(self, raw_uid: str) -> str:
        info = self.runs.get(raw_uid, {})
        sample = info.get("sample") or "run"
        scan = info.get("scan") or ""
        return f"{sample} {scan} {raw_uid[:8]}".replace("  ", " ")

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.source.get(timeout=0.1)
            if item is None:
                continue
            name, doc = item
            with self._lock:
                self._router(name, doc)
                self.documents += 1
                self.last = doc.get("uid") if isinstance(doc, dict) else None
                self._changed.notify_all()

    def wait_finished(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` analysis runs have ended; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.finished < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.2))
        return True

    def finish(self, sent: int, timeout: float, last: str | None = None) -> int:
        """Print until all the stopped daemon published is taken, or ``timeout`` passes; then
        stop. Returns how many of its ``sent`` documents never came (0: all printed).

        All came once ``sent`` are taken, or once ``last`` (the uid of the daemon's last
        document) is: the bus keeps the order, and what it loses before the subscription
        reaches the publisher are the first ones, which no wait brings.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while (
                self.documents < sent
                and (last is None or self.last != last)
                and (left := deadline - time.monotonic()) > 0
            ):
                self._changed.wait(min(left, 0.2))
            missing = max(0, sent - self.documents)
        self.stop()
        return missing

    def stop(self) -> None:
        """Stop taking documents (what the source still holds is not printed)."""
        self._stop.set()
        self._thread.join(5.0)


class LastDocument:
    """A daemon listener: the uid of the last analysis document it published (for
    :meth:`Printer.finish`; every listener sees them in the order they go to the bus)."""

    def __init__(self) -> None:
        self.uid: str | None = None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.uid = doc.get("uid")


class _RunPrinter(SinkRouter):
    """One analysis run on the bus: prints its ``primary`` results and its end."""

    def __init__(self, printer: Printer, start: dict[str, Any]) -> None:
        super().__init__()
        self.printer = printer
        self.raw_uid = str(start.get("raw_uid"))
        self.primary: str | None = None

    def descriptor(self, doc: Any) -> Any:
        if doc.get("name") == "primary":
            self.primary = doc.get("uid")

    def event(self, doc: Any) -> Any:
        if doc.get("descriptor") != self.primary:
            return  # another stream (recommendations): not a result
        p = self.printer
        if doc.get("data", {}).get("status") == "ok":
            p.analysed += 1
        else:
            p.rejected += 1
        p._print("  " + format_result(doc, p._label(self.raw_uid)))

    def stop(self, doc: Any) -> Any:
        p = self.printer
        p.finished += 1
        p._print(
            f"analysis of {p._label(self.raw_uid)} done: {doc.get('n_analysed')} analysed, "
            f"{doc.get('n_rejected')} rejected ({doc.get('exit_status')}"
            + (f": {doc.get('reason')}" if doc.get("reason") else "")
            + ")"
        )
