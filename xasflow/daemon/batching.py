"""How the processing thread micro-batches: wait for more documents only under load.

Each pipeline call has a fixed cost (~1.5 ms on 2 cores: the ONNX calls, the vectorised
preparation's numpy calls, one page of documents), so a daemon that analysed only what was
queued took spectra one or two at a time at 500-1,000 spectra/s and spent about twice the CPU
per spectrum that larger batches need (``bench/stream.py``). :class:`BatchPolicy` lets a turn
wait up to ``max_batch_delay_ms`` for more documents, but only while they arrive so fast that
``min_expected`` more are due within that time (the rate from :class:`RateMeter`, over the
last ~0.25 s); a lone spectrum, or a slow scan (100 spectra/s with the defaults), is never
held back. Measured (``bench/stream.py --daemon-only``, interleaved with the daemon before
this): CPU per spectrum 4.0 -> 1.7 ms at 250/s and 2.0 -> 1.1 ms at 500/s; the price is the
median latency at such rates (250/s: ~6-10 -> ~14 ms), not the p99. Configured as
``analysis.batching`` (:mod:`xasflow.daemon.config`).
"""

from __future__ import annotations

import math
import time

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ANALYSIS_CHUNK", "BatchPolicy", "RateMeter"]

#: Spectra per pipeline call when a backlog is drained: big enough to amortise each call's
#: fixed cost, small enough that the first results of a backlog go out early (64 spectra take
#: ~15 ms). At 1,500 spectra/s 16 left the daemon 1.4 s behind after 10 s; 32 and 64 kept up.
ANALYSIS_CHUNK = 64


class BatchPolicy(BaseModel):
    """The micro-batching bounds of the processing loop (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_delay_ms: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="longest wait for more documents once those queued are taken, under "
        "load only (0: never wait)",
    )
    min_expected: float = Field(
        2.0,
        gt=0.0,
        description="wait only when the recent document rate brings at least this many "
        "more within max_batch_delay_ms",
    )
    target_docs: int = Field(16, ge=1, description="stop waiting once a turn holds this many")
    max_spectra: int = Field(
        ANALYSIS_CHUNK, ge=1, description="spectra per pipeline call (one ONNX call per task)"
    )

    def wait_s(self, rate_hz: float) -> float:
        """How long a turn may wait for more documents at this recent arrival rate (s)."""
        budget = self.max_batch_delay_ms / 1e3
        return budget if budget > 0 and rate_hz * budget >= self.min_expected else 0.0


class RateMeter:
    """Documents per second over the last ~``tau_s``: an exponentially decaying count."""

    def __init__(self, tau_s: float = 0.25) -> None:
        self.tau_s = tau_s
        self._count = 0.0
        self._t = time.monotonic()

    def add(self, n: int, now: float) -> float:
        """Count ``n`` documents taken at ``now`` (monotonic s); returns the rate before them."""
        self._count *= math.exp(-max(0.0, now - self._t) / self.tau_s)
        self._t = max(self._t, now)
        rate = self._count / self.tau_s
        self._count += n
        return rate
