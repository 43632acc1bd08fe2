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
* with the hook on (it has announced a raw start), an analysis start is that of a run the
  hook announced: every run the daemon analyses was opened by the assembler, which tells
  the hook first. Of the current run, it clears the advice again; of any other run, a later
  raw start came since, and it is ignored (so is the start of a run that scans nothing: one
  closed without its raw start read here). Without the hook (an IOC fed analysis documents
  only), an analysis start makes its run the current one;
* advice, and the withdrawal of ``STOP_EARLY`` after a rejected spectrum or at the run's
  end, are written only for the current run.

Nothing is kept per run, so no run is ever forgotten: the current uid and whether the hook
is on answer every question. (A map of the runs announced and not yet analysed, trimmed to
its newest 1,024, forgot a run still waiting for its analysis start; its start then read as
one the hook never announced, and took the advice PVs from the run scanning.) Nor is this
event-model's ``RunRouter``: the IOC sees the raw runs by their uid only (the hook), not by
their documents, and the analysis runs are followed by the IOC's own router already.

Not thread-safe: the IOC holds its lock around each decision and the write it leads to.
"""

from __future__ import annotations

__all__ = ["AdviceRuns"]


class AdviceRuns:
    """The raw run the advice PVs belong to, and which advice may be written (see module)."""

    def __init__(self) -> None:
        self.current: str | None = None
        #: Whether the raw-start hook has announced a run: then every analysis start is of
        #: a run it announced (see module).
        self.hooked = False

    def raw_start(self, raw_uid: str) -> None:
        """The raw run starts scanning: its advice is the one shown from now on."""
        self.current = raw_uid
        self.hooked = True

    def analysis_start(self, raw_uid: str) -> bool:
        """The analysis run of ``raw_uid`` starts; True when the advice PVs are to be cleared
        for it (it is the current run), False when a later raw start came since."""
        if self.hooked:  # its raw start was announced: its own start, come later
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
