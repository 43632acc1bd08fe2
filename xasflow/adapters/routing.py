"""Document routing for every consumer of analysis runs, on event-model's ``RunRouter``.

A consumer (the store, the EPICS IOC, the queueserver submitter, the dashboard, the demo
printer, the adaptive collector) declares what it wants per *stream* of an analysis run;
event-model's :class:`~event_model.RunRouter` keeps the run -> descriptor -> callback maps
and drops them at each run's stop, so no consumer keeps uid tables of its own.

* :func:`stream_factory` builds a ``RunRouter`` factory: for each analysis run (a start with
  ``analysis == "xasflow"``, or any run with ``analysis_only=False``) and each descriptor
  whose stream name has an entry, the entry builds the per-stream callback.
* :class:`StreamCallback` is a :class:`~event_model.DocumentRouter` with the run's start and
  the stream's descriptor at hand; subclasses implement ``event`` (or ``event_page``).
* :class:`SafeRouter` wraps a ``RunRouter`` so that a consumer never raises into the
  publisher: failures are logged and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from event_model import DocumentRouter, RunRouter

__all__ = [
    "ANALYSIS_MARK",
    "PassThroughFiller",
    "SafeRouter",
    "StreamCallback",
    "StreamMaker",
    "make_run_router",
    "stream_factory",
]

logger = logging.getLogger(__name__)

#: ``start["analysis"]`` of the daemon's own analysis runs.
ANALYSIS_MARK = "xasflow"

#: Builds the callback of one stream of one run: ``make(start, descriptor)``, None to skip.
StreamMaker = Callable[[dict[str, Any], dict[str, Any]], Callable[..., Any] | None]


class PassThroughFiller(DocumentRouter):
    """Stands in for event-model's Filler: nothing external to fill, and Filler copies pages."""

    def __init__(self, handler_registry: Any = None, *, root_map: Any = None, inplace: Any = None):
        super().__init__()

    def descriptor(self, doc: Any) -> Any:
        return doc

    def event_page(self, doc: Any) -> Any:
        return doc

    def event(self, doc: Any) -> Any:
        return doc


class StreamCallback(DocumentRouter):
    """A per-run, per-stream callback that knows its run's start and its stream's descriptor."""

    def __init__(self, start: Mapping[str, Any], descriptor: Mapping[str, Any]) -> None:
        super().__init__()
        self.start_doc = dict(start)
        self.descriptor_doc = dict(descriptor)

    @property
    def raw_uid(self) -> str:
        """The raw run this analysis run mirrors ("" when the start does not say)."""
        return str(self.start_doc.get("raw_uid") or "")


def stream_factory(
    streams: Mapping[str, StreamMaker],
    *,
    on_run: Callable[[dict[str, Any]], list[Callable[..., Any]]] | None = None,
    analysis_only: bool = True,
) -> Callable[[str, dict[str, Any]], tuple[list[Any], list[Any]]]:
    """A ``RunRouter`` factory: the callback each listed stream's maker builds, per run.

    ``on_run(start)`` may add callbacks that see every document of the run (start to stop).
    """

    def factory(name: str, start: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        if analysis_only and start.get("analysis") != ANALYSIS_MARK:
            return [], []
        run_callbacks = on_run(start) if on_run is not None else []

        def subfactory(name: str, descriptor: dict[str, Any]) -> list[Any]:
            make = streams.get(str(descriptor.get("name")))
            callback = make(start, descriptor) if make is not None else None
            return [callback] if callback is not None else []

        return run_callbacks, [subfactory]

    return factory


def make_run_router(factories: list[Any]) -> RunRouter:
    """An event-model ``RunRouter`` over ``factories`` that fills nothing (no copies)."""
    filler: Any = PassThroughFiller  # stands in for Filler (same methods, no external data)
    return RunRouter(factories, filler_class=filler)


class SafeRouter:
    """A ``RunRouter`` over ``factories`` that logs and counts failures instead of raising."""

    def __init__(self, factories: list[Any], label: str) -> None:
        self.router = make_run_router(factories)
        self.label = label
        self.errors = 0
        self.unknown = 0  # documents of a run this router never saw start (ignored)

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        try:
            self.router(name, dict(doc) if not isinstance(doc, dict) else doc)
        except KeyError as exc:  # an event or descriptor of a run that started before us
            self.unknown += 1
            logger.debug("%s: %s document of an unknown run (%s)", self.label, name, exc)
        except Exception:  # a consumer must never break the publisher
            self.errors += 1
            logger.exception("%s: cannot use a %s document", self.label, name)
