"""Input-queue drops the assembler holds for descriptors it has not been fed yet (``_Held``).

Each record is a descriptor's dropped seq_nums, the run the input queued it for and when it
was first held; the rules (when a record is taken, let go, given up or forgotten) are in
:meth:`xasflow.daemon.assembly.RunAssembler.dropped`. The records are bounded twice: in
descriptors (``most``, the assembler's memory of uids) and in rows (:data:`ROWS_HELD`), since
one descriptor of a run whose start never comes can have its events dropped by the page for
all of ``start_wait``. Past either bound a record of a run not open here is forgotten (the
oldest past the first, the largest past the second); its rows count in ``forgotten``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__: list[str] = []  # internal to the assembler

#: Rows held in all (~36 bytes each in a list of ints: ~36 MB, about what one step run's
#: ``MAX_STEP_POINTS`` take); a flood past it costs its own record first.
ROWS_HELD = 1_000_000

logger = logging.getLogger("xasflow.daemon.assembly")  # logged as the assembler's


class _Held:
    """Records of drops held per descriptor uid, oldest first, with their row count."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._records: OrderedDict[str, tuple[str, list[Any], float]] = OrderedDict()
        self._runs: dict[str, set[str]] = {}  # run uid -> its descriptors held here
        self.rows = 0  # seq_nums held in all
        #: rows forgotten past a bound or given up (``RunAssembler.early_drops_forgotten``)
        self.forgotten = 0

    def add(
        self, desc: str, run: str, seqs: list[Any], now: float, is_open: Callable[[str], bool]
    ) -> None:
        """Hold ``seqs`` for ``desc`` (queued for ``run``), then keep within the bounds."""
        held = self._records.get(desc)
        if held is not None:
            held[1].extend(seqs)
        else:
            self._records[desc] = (run, list(seqs), now)
            self._runs.setdefault(run, set()).add(desc)
        self.rows += len(seqs)
        if len(self._records) > self.most:
            first = next((d for d, (r, *_) in self._records.items() if not is_open(r)), None)
            self._forget(first, f"over {self.most} descriptors held")
        while self.rows > ROWS_HELD:
            largest = max(
                (d for d, (r, *_) in self._records.items() if not is_open(r)),
                key=lambda d: len(self._records[d][1]),
                default=None,
            )
            if largest is None:  # every run is open here: they take theirs soon
                break
            self._forget(largest, f"over {ROWS_HELD} rows held")

    def _forget(self, desc: str | None, why: str) -> None:
        """Forget one record for want of room: counted and logged."""
        if desc is None:
            return
        run = self._records[desc][0]
        seqs = self.take(desc) or []
        self.forgotten += len(seqs)
        logger.warning(
            "forgot %d input-queue drop(s) of descriptor %s (run %s, not open here): %s; if "
            "it still comes they count as seq_gap too",
            len(seqs),
            desc,
            run,
            why,
        )

    def take(self, desc: str) -> list[Any] | None:
        """Take the record of ``desc`` (None if none)."""
        held = self._records.pop(desc, None)
        if held is None:
            return None
        run, seqs, _ = held
        self.rows -= len(seqs)
        descs = self._runs.get(run)
        if descs is not None:
            descs.discard(desc)
            if not descs:
                del self._runs[run]
        return seqs

    def take_run(self, run: str) -> None:
        """Let go of every record of ``run`` (closed here: its descriptors could only come
        late)."""
        for desc in list(self._runs.get(run, ())):
            self.take(desc)

    def give_up(self, now: float, wait: float, is_open: Callable[[str], bool]) -> None:
        """Forget the records held over ``wait`` for runs not open here: their start never
        came (lost upstream, or dropped by the input), so nothing would ever take them."""
        due = []
        for desc, (run, _, since) in self._records.items():  # oldest first
            if now - since <= wait:
                break
            if not is_open(run):
                due.append((desc, run))
        if not due:
            return
        rows = sum(len(self.take(desc) or []) for desc, _ in due)
        self.forgotten += rows
        logger.warning(
            "gave up %d input-queue drop(s) of %d descriptor(s) whose run's start did not "
            "come within %.0f s (runs %s); if it still comes they count as seq_gap too",
            rows,
            len(due),
            wait,
            ", ".join(sorted({r for _, r in due})[:5]),
        )
