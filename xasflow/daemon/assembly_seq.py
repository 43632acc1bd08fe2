"""Sequence-number accounting of a run's configured stream, descriptor by descriptor: which
rows are duplicates or follow a hole no bus makes, the ``seq_gap`` / ``seq_disorder`` flags a
row carries, the seq_nums the input queue dropped, and the run's gaps, missing and dropped
counts at its close. The rules are in :mod:`xasflow.daemon.assembly`'s docstring.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np

from xasflow.adapters.stop_claims import MAX_STOP_MISSING
from xasflow.daemon.assembly_stream import _Bad, _Stream

__all__: list[str] = []  # internal to the assembler

#: seq_nums at or past this are refused: the run's sequence statistics count in int64.
_SEQ_LIMIT = 2**63
#: :func:`_seq_flags`' mark of a step point seen before (never a published flag).
_REPEAT = "repeat"


def _seq_flags(st: _Stream, seq: int) -> list[str]:
    """Duplicate check and arrival-time flags for one row of ``st``, recorded as seen; raises
    ``_Bad`` for a row to drop. A step point seen before gives ``[_REPEAT]``: the run's
    ``_step_row`` tells a bluesky rewind's re-take (new readings: they replace the old) from a
    redelivered copy."""
    if seq in st.seen:
        if st.kind == "step":
            return [_REPEAT]
        raise _Bad("duplicate_event", f"seq_num {seq} repeated in descriptor {st.uid}")
    base = None
    if st.expect is None:  # first row of this descriptor: where its sequence may begin
        base = max((b for b in st.first_ok if b <= seq), default=None)
    mark = st.expect if st.expect is not None else base
    if mark is not None and seq - mark > MAX_STOP_MISSING:  # a hole no bus makes
        raise _Bad(
            "malformed_document",
            f"seq_num {seq} leaves {seq - mark} events missing before it in descriptor "
            f"{st.uid}; at most {MAX_STOP_MISSING} may go missing at once: ignored",
        )
    st.seen.add(seq)
    flags: list[str] = []
    if st.expect is None:
        if base is None:
            flags.append("seq_disorder")
        elif seq > base:
            flags.append("seq_gap")
        st.base = seq if base is None else base
    elif seq > st.expect:
        flags.append("seq_gap")
    elif seq < st.expect:
        flags.append("seq_disorder")
    if st.expect is None or seq >= st.expect:
        st.expect = seq + 1
    return flags


def _note_dropped(st: _Stream, seqs: list[Any]) -> None:
    """Record rows of ``st`` the input queue dropped (unchecked, as sent): the valid seq_nums."""
    for seq in seqs:
        ok = isinstance(seq, (int, np.integer)) and not isinstance(seq, bool)
        if ok and 0 <= int(seq) < _SEQ_LIMIT:
            st.dropped.add(int(seq))


def _seq_stats(streams: Collection[_Stream], last: int, trailing: int) -> tuple[int, int, int]:
    """(gaps, missing seq_nums, of them dropped by the input queue) over a run's ``streams``,
    from what finally arrived (late ones count); ``last``: the highest seq_num seen, ``trailing``
    the events the stop says came after it and never arrived."""
    gaps, missing = 0, trailing
    tail: set[int] = set()  # dropped seq_nums among the trailing missing ones
    if missing:
        gaps += 1
        for st in streams:
            tail.update(s for s in st.dropped if last < s <= last + missing)
    dropped = len(tail)
    for st in streams:
        if not st.seen:
            continue
        seqs = np.sort(np.fromiter(st.seen, np.int64, len(st.seen)))
        low = min(st.base, int(seqs[0]))
        steps = np.diff(seqs, prepend=low - 1)
        holes = steps[steps > 1] - 1
        gaps += int(holes.size)
        missing += int(holes.sum())
        high = int(seqs[-1])
        dropped += sum(1 for s in st.dropped if low <= s < high and s not in st.seen)
    return gaps, missing, dropped
