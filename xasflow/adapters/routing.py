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

These are sinks: what a callback returns is never used. event-model's ``DocumentRouter``
turns an ``event`` for a callback that handles only pages (and a page for one that handles
only events) into the other form with its generic transposition, then converts the result
back; ``RunRouter`` routes pages only, so each analysis event made that round trip twice per
consumer (measured: 8 % of the daemon's GIL time at 1,000 spectra/s). :class:`SinkRouter`
and the routers :func:`make_run_router` builds convert once, row by row, and return nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from event_model import DocumentRouter, RunRouter

__all__ = [
    "ANALYSIS_MARK",
    "PassThroughFiller",
    "SafeRouter",
    "SinkRouter",
    "StreamCallback",
    "StreamMaker",
    "events_of",
    "make_run_router",
    "page_from",
    "page_of",
    "paged",
    "stream_factory",
]

logger = logging.getLogger(__name__)

#: ``start["analysis"]`` of the daemon's own analysis runs.
ANALYSIS_MARK = "xasflow"

#: Builds the callback of one stream of one run: ``make(start, descriptor)``, None to skip.
StreamMaker = Callable[[dict[str, Any], dict[str, Any]], Callable[..., Any] | None]


def page_of(event: Mapping[str, Any]) -> dict[str, Any]:
    """A one-row event page from an event (``event_model.pack_event_page``, minus generality)."""
    return {
        "descriptor": event["descriptor"],
        "uid": [event["uid"]],
        "time": [event["time"]],
        "seq_num": [event["seq_num"]],
        "data": {k: [v] for k, v in event["data"].items()},
        "timestamps": {k: [v] for k, v in event["timestamps"].items()},
        "filled": {k: [v] for k, v in (event.get("filled") or {}).items()},
    }


def page_from(events: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The event page of ``events`` (all of one descriptor), in their order; KeyError when
    their data or timestamp keys differ (a page holds one set of columns)."""
    first = events[0]
    keys, stamp_keys = first["data"].keys(), first["timestamps"].keys()
    if any(e["data"].keys() != keys or e["timestamps"].keys() != stamp_keys for e in events):
        raise KeyError("the events' data keys differ")
    return {
        "descriptor": first["descriptor"],
        "uid": [e["uid"] for e in events],
        "time": [e["time"] for e in events],
        "seq_num": [e["seq_num"] for e in events],
        "data": {k: [e["data"][k] for e in events] for k in first["data"]},
        "timestamps": {k: [e["timestamps"][k] for e in events] for k in first["timestamps"]},
        "filled": {k: [e["filled"][k] for e in events] for k in first.get("filled") or {}},
    }


def paged(docs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``docs`` with the events of each descriptor gathered into event pages.

    A descriptor's events join the page that its first one opens, where that one stood: they
    move ahead of other streams' documents (streams are not ordered against each other) but
    never past a ``stop``, which closes every page. A page of one event stays an ``event``.
    One page per stream and batch means one routing, one bus message and one journal
    transaction where there were as many as spectra.
    """
    out: list[tuple[str, Any]] = []
    open_pages: dict[str, int] = {}  # descriptor uid -> its slot in out (a list of events)
    for name, doc in docs:
        if name == "event":
            slot = open_pages.get(doc["descriptor"])
            if slot is None:
                open_pages[doc["descriptor"]] = len(out)
                out.append(("events", [doc]))
            else:
                out[slot][1].append(doc)
            continue
        if name == "stop":
            open_pages.clear()
        out.append((name, doc))
    result: list[tuple[str, dict[str, Any]]] = []
    for name, doc in out:
        if name != "events":
            result.append((name, doc))
        elif len(doc) == 1:
            result.append(("event", doc[0]))
        else:
            try:
                result.append(("event_page", page_from(doc)))
            except KeyError:  # events whose keys differ cannot share a page: sent as they are
                result.extend(("event", e) for e in doc)
    return result


def events_of(page: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The events of an event page (``event_model.unpack_event_page``, minus generality)."""
    data, stamps = page["data"], page["timestamps"]
    filled = page.get("filled") or {}
    for i, (uid, time, seq) in enumerate(
        zip(page["uid"], page["time"], page["seq_num"], strict=True)
    ):
        yield {
            "descriptor": page["descriptor"],
            "uid": uid,
            "time": time,
            "seq_num": seq,
            "data": {k: v[i] for k, v in data.items()},
            "timestamps": {k: v[i] for k, v in stamps.items()},
            "filled": {k: v[i] for k, v in filled.items()},
        }


class SinkRouter(DocumentRouter):
    """A ``DocumentRouter`` whose output is not used: events and pages reach whichever of
    ``event`` / ``event_page`` the subclass implements, converted once and nothing returned."""

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        has_event = cls.event is not DocumentRouter.event
        has_page = cls.event_page is not DocumentRouter.event_page
        self._events_only = has_event and not has_page
        self._pages_only = has_page and not has_event

    def __call__(self, name: str, doc: dict, validate: bool = False) -> tuple[str, dict]:
        if not validate:
            if name == "event" and self._pages_only:
                self.event_page(page_of(doc))  # type: ignore[arg-type]
                return name, doc
            if name == "event_page" and self._events_only:
                for event in events_of(doc):
                    self.event(event)  # type: ignore[arg-type]
                return name, doc
        return super().__call__(name, doc, validate)


class _SinkRunRouter(RunRouter):
    """``RunRouter`` (which routes pages only) taking an event as a one-row page, once."""

    def __call__(self, name: str, doc: dict, validate: bool = False) -> tuple[str, dict]:
        if name == "event" and not validate:
            self.event_page(page_of(doc))  # type: ignore[arg-type]
            return name, doc
        return super().__call__(name, doc, validate)


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


class StreamCallback(SinkRouter):
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
    return _SinkRunRouter(factories, filler_class=filler)


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
