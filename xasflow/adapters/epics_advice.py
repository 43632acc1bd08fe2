"""Which raw run the IOC's advice PVs (``REGIONS``, ``N_REGIONS``, ``STOP_EARLY``) belong to.

The advice PVs speak of the scan under way: ``ADVICE_UID`` names its raw run. Two signals
say that a run starts. The daemon's raw-start hook (:meth:`AdviceRuns.raw_start`) comes as the
raw start document is *read*, once the assembler has opened its run (a start it refused, of
a run open or closed already, scans nothing new and never comes here); the analysis run's
start (:meth:`AdviceRuns.analysis_start`) comes with the run's first result, after its
spectra were *analysed*, which may be a turn (or a batch in the preparation process) later.
So the last advice of run A, and even A's analysis start, can reach the IOC after run B's
raw start: written, they would set ``STOP_EARLY`` from A's certainty while B scans.
:class:`AdviceRuns` keeps the order straight:

* a raw start makes its run the current one (always: a run replayed from its start, e.g.
  after a Kafka hand-over, scans again);
* an analysis start of a run whose raw start the hook announced is that run's own: the
  advice is cleared again if it is still the current one, ignored if a later raw start came
  since; an analysis start the hook never announced (an IOC fed analysis documents only)
  makes its run the current one;
* advice, and the withdrawal of ``STOP_EARLY`` after a rejected spectrum, are written only
  for the current run.

Not thread-safe: the IOC holds its lock around each decision and the write it leads to.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["AdviceRuns"]


class AdviceRuns:
    """The raw run the advice PVs belong to, and which advice may be written (see module)."""

    def __init__(self, remember: int = 1024) -> None:
        """``remember``: raw starts announced by the hook and kept until their analysis
        start (a run that never gets one is forgotten, oldest first)."""
        self.current: str | None = None
        self.remember = remember
        self._announced: OrderedDict[str, None] = OrderedDict()

    def raw_start(self, raw_uid: str) -> None:
        """The raw run starts scanning: its advice is the one shown from now on."""
        self.current = raw_uid
        self._announced[raw_uid] = None
        self._announced.move_to_end(raw_uid)
        while len(self._announced) > self.remember:
            self._announced.popitem(last=False)

    def analysis_start(self, raw_uid: str) -> bool:
        """The analysis run of ``raw_uid`` starts; True when the advice PVs are to be cleared
        for it (it is the current run), False when a later raw start came since."""
        if raw_uid in self._announced:  # the hook announced it: its own start, come later
            del self._announced[raw_uid]
            return raw_uid == self.current
        self.current = raw_uid
        return True

    def may_advise(self, raw_uid: str) -> bool:
        """Whether advice of ``raw_uid`` may be written (the first run seen becomes current)."""
        if self.current is None:
            self.current = raw_uid
        return raw_uid == self.current

    def is_current(self, raw_uid: str | None) -> bool:
        """Whether ``raw_uid`` is the run the advice PVs belong to (or none is known yet)."""
        return self.current is None or raw_uid == self.current
