"""What a raw stop document may claim about its run's events, read defensively.

A raw stop's ``num_events`` (event-model: ``{stream name: events emitted}``) is the only
word on events the daemon never saw after the last one that arrived, so it feeds the loss
accounting: the assembler's trailing missing events (the ``seq_gap`` loss counter and the
analysis stop's ``raw_missing_events``) and, for a run a killed predecessor left open, the
``interrupted`` count (:mod:`xasflow.adapters.recovery`). It comes from the bus, so it is
checked before it is believed:

* the value must be a non-negative integer (a Python ``int`` or a numpy integer, as a
  pickled stop may carry; never a ``bool``, a float, text or a container) below ``2**63``,
  where the assembler refuses seq_nums too (its sequence statistics count in int64);
* one stop may claim at most :data:`MAX_STOP_MISSING` events missing. The events a stop
  reveals were emitted after the last event seen, yet the run was still open, i.e. within
  ``analysis.run_timeout_s`` (60 s by default) of its last document. A million is 10 kHz
  for 100 s, above any XAS detector's event rate (a quick-XAS spectrum per event at
  ~100 Hz, a step point every few tenths of a second; a step run keeps 100,000 points at
  most), so a larger claim is a corrupt or hostile stop, not a loss. The assembler bounds
  the hole one event's seq_num may leave before it the same way.

A refused claim counts nothing as missing; the caller makes the refusal visible (the
assembler rejects it as ``malformed_document``, counted and in the analysis run; recovery
logs it and names it in the interrupted run's stop reason). :func:`int64_or_none` is the
same int64 check for other raw integers carried onward (the raw start's ``scan_id``, in
:mod:`xasflow.daemon.documents`).
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral
from typing import Any

__all__ = [
    "INT64_LIMIT",
    "MAX_STOP_MISSING",
    "claimed_missing",
    "int64_or_none",
    "stop_event_count",
]

#: Integers must lie in ``[-INT64_LIMIT, INT64_LIMIT)`` to fit a signed 64-bit integer.
INT64_LIMIT = 2**63
#: The most events one raw stop may claim missing (see the module docstring).
MAX_STOP_MISSING = 1_000_000


def int64_or_none(value: Any) -> int | None:
    """``value`` as an ``int`` if it is an integer (not a bool) that fits int64, else None."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        return None
    number = int(value)
    return number if -INT64_LIMIT <= number < INT64_LIMIT else None


def stop_event_count(stop: Mapping[str, Any], stream: str) -> tuple[int | None, str | None]:
    """``(count, refusal)``: the events ``stop`` says ``stream`` had, or why it is refused.

    ``(None, None)``: the stop says nothing of ``stream`` (no ``num_events``, or no entry
    for the stream: it had no events). ``(None, text)``: what it says is not a count (see
    the module docstring); ``text`` says so, for the caller to report.
    """
    num = stop.get("num_events")
    if num is None:
        return None, None
    if not isinstance(num, Mapping):
        return None, f"stop num_events is a {type(num).__name__}, not a mapping: ignored"
    if stream not in num:
        return None, None
    value = num[stream]
    count = int64_or_none(value)
    if count is None or count < 0:
        shown = repr(value)[:80]
        return None, f"stop num_events[{stream!r}] = {shown} is not a count of events: ignored"
    return count, None


def claimed_missing(count: int, seen: int, stream: str) -> tuple[int, str | None]:
    """``(missing, refusal)``: events a stop's ``count`` claims beyond ``seen``, bounded.

    More than :data:`MAX_STOP_MISSING` is refused: ``(0, text)``.
    """
    missing = count - seen
    if missing <= 0:
        return 0, None
    if missing > MAX_STOP_MISSING:
        return 0, (
            f"stop num_events[{stream!r}] = {count} claims {missing} events missing after "
            f"{seen}; one stop may claim at most {MAX_STOP_MISSING}: ignored"
        )
    return missing, None
