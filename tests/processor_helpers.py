"""Stand-ins for the processing loop's tests: a pipeline that records what it is handed, and
the daemon's parts with an input that never delivers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from xasflow.daemon.assembly import RunAssembler


class RecordingPipeline:
    """The pipeline's side of the processor (``begin``/``end``, no preparation process) for
    processor tests: records each batch's outputs, emits nothing."""

    worker = None

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    @property
    def outputs(self) -> list[Any]:
        """Every output handed over, in order."""
        return [o for batch in self.batches for o in batch]

    def begin(self, outputs: list[Any]) -> SimpleNamespace:
        self.batches.append(list(outputs))
        return SimpleNamespace(items=outputs, ready=lambda worker: True)

    def end(self, batch: SimpleNamespace, *, advise: bool = True) -> list[Any]:
        return []

    def advise(self) -> list[Any]:
        return []

    def close_all(self, reason: str) -> list[Any]:
        return []


def processor_parts(ioc: Any = None, pipeline: Any = None) -> SimpleNamespace:
    """What ``build_processor`` builds a processing loop from, as the daemon's parts, with an
    input that never delivers and no store, gate or publisher: the loop's own tests feed it
    (``_turn``). ``pipeline``: a real one, or a stand-in with no preparation process."""
    return SimpleNamespace(
        source=SimpleNamespace(get=lambda timeout: None),
        assembler=RunAssembler(),
        pipeline=pipeline if pipeline is not None else SimpleNamespace(worker=None),
        probes=None,
        interrupted=None,
        writer=None,
        store=None,
        ioc=ioc,
        gate=None,
        publisher=None,
    )
