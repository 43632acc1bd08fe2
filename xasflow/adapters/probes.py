"""Warm-up probe runs: how a publisher tells that the daemon hears it, never analysed.

A probe run is a start document carrying ``PROBE_KEY`` (its value a token) and its stop
(see :meth:`xasflow.sim.beamline.SimBeamline.warm_up`). The input side filters them out
with :class:`ProbeFilter` before assembly; ``/health`` reports the tokens seen.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

__all__ = ["PROBE_KEY", "ProbeFilter"]

#: Start-document key of a warm-up probe run (the one definition; publishers import it).
PROBE_KEY = "xasflow_probe"


class ProbeFilter:
    """Recognises probe runs (start and stop), remembering the last ``memory`` tokens."""

    def __init__(self, memory: int = 64) -> None:
        self.memory = memory
        self.seen = 0
        self._lock = threading.Lock()
        self._uids: OrderedDict[str, str] = OrderedDict()  # probe start uid -> token
        self._tokens: OrderedDict[str, int] = OrderedDict()  # token -> starts seen

    def __call__(self, name: str, doc: Any) -> bool:
        """True when ``(name, doc)`` belongs to a probe run (drop it), else False."""
        if not isinstance(doc, Mapping):
            return False
        if name == "start" and PROBE_KEY in doc:
            uid, token = _text(doc.get("uid")), _text(doc.get(PROBE_KEY))
            with self._lock:
                self.seen += 1
                self._uids[uid] = token
                self._tokens[token] = self._tokens.get(token, 0) + 1
                self._tokens.move_to_end(token)
                for table in (self._uids, self._tokens):
                    while len(table) > self.memory:  # a bounded record for /health
                        table.popitem(last=False)
            return True
        if name == "stop":
            run_start = doc.get("run_start")
            if not isinstance(run_start, str):
                return False  # not a probe's: the assembler refuses it with a reason
            with self._lock:
                return self._uids.pop(run_start, None) is not None
        return False

    def health(self) -> dict[str, Any]:
        """``{"seen": n, "tokens": [...]}``, the most recent token last."""
        with self._lock:
            return {"seen": self.seen, "tokens": list(self._tokens)}


def _text(value: Any) -> str:
    """A probe's uid or token as text (a value that is not text is shown by its type only:
    ``str()`` of a crafted value can raise, e.g. an int of 5,000 digits)."""
    return value if isinstance(value, str) else f"<{type(value).__name__}>"
