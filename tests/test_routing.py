"""The sink routers: events and pages reach callbacks in the form they handle, converted once."""

from __future__ import annotations

from typing import Any

import event_model
import pytest

from xasflow.adapters.routing import (
    ANALYSIS_MARK,
    SinkRouter,
    StreamCallback,
    events_of,
    make_run_router,
    page_of,
    paged,
    stream_factory,
)


def _run(n: int) -> tuple[dict, dict, list[dict], dict]:
    bundle = event_model.compose_run(metadata={"analysis": ANALYSIS_MARK})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "cn": {"dtype": "integer", "shape": [], "source": "x"},
            "motif": {"dtype": "string", "shape": [], "source": "x"},
        },
    )
    events = [
        desc.compose_event(
            data={"cn": 4 + i, "motif": f"m{i}"}, timestamps={"cn": 1.0 + i, "motif": 2.0 + i}
        )
        for i in range(n)
    ]
    return bundle.start_doc, desc.descriptor_doc, events, bundle.compose_stop()


@pytest.mark.parametrize("n", [1, 3])
def test_page_of_and_events_of_match_event_model(n: int) -> None:
    _, _, events, _ = _run(n)
    page = event_model.pack_event_page(*events)
    assert [page_of(e) for e in events[:1]] == [event_model.pack_event_page(events[0])]
    assert list(events_of(page)) == list(event_model.unpack_event_page(page))


class _Events(StreamCallback):
    def __init__(self, start: Any, desc: Any, seen: list) -> None:
        super().__init__(start, desc)
        self.seen = seen

    def event(self, doc: Any) -> Any:
        self.seen.append(("event", doc["seq_num"], doc["data"]["cn"]))


class _Pages(SinkRouter):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def event_page(self, doc: Any) -> Any:
        self.seen.append(("page", list(doc["seq_num"]), list(doc["data"]["cn"])))


def test_events_and_pages_reach_each_callback_in_its_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """No generic pack/unpack: event-model's round trip would raise here."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("event-model's generic conversion was used")

    monkeypatch.setattr(event_model, "pack_event_page", boom)
    monkeypatch.setattr(event_model, "unpack_event_page", boom)
    stream_seen: list = []
    run_seen: list = []
    factory = stream_factory(
        {"primary": lambda start, desc: _Events(start, desc, stream_seen)},
        on_run=lambda start: [_Pages(run_seen)],
    )
    router = make_run_router([factory])
    start, desc, events, stop = _run(3)
    router("start", start)
    router("descriptor", desc)
    assert router("event", events[0]) == ("event", events[0])
    page = {
        "descriptor": desc["uid"],
        "uid": [e["uid"] for e in events[1:]],
        "time": [e["time"] for e in events[1:]],
        "seq_num": [2, 3],
        "data": {"cn": [5, 6], "motif": ["m1", "m2"]},
        "timestamps": {"cn": [2.0, 3.0], "motif": [3.0, 4.0]},
    }
    router("event_page", page)
    router("stop", stop)
    assert stream_seen == [("event", 1, 4), ("event", 2, 5), ("event", 3, 6)]
    assert run_seen == [("page", [1], [4]), ("page", [2, 3], [5, 6])]


def test_paged_gathers_each_streams_events_but_never_past_a_stop() -> None:
    start, desc, events, stop = _run(3)
    other = dict(events[1], descriptor="other-stream")
    odd = dict(events[2], data={"cn": 6})  # keys differ from the first event's
    docs = [("start", start), ("descriptor", desc), ("event", events[0]), ("event", other)]
    docs += [("event", events[1]), ("stop", stop), ("event", events[2])]
    got = paged(docs)
    assert [n for n, _ in got] == ["start", "descriptor", "event_page", "event", "stop", "event"]
    assert got[2][1]["seq_num"] == [1, 2] and got[2][1]["data"]["cn"] == [4, 5]
    assert list(events_of(got[2][1])) == [events[0], events[1]]
    for pair in ([events[0], odd], [odd, events[0]]):  # no shared columns: left alone
        assert paged([("event", e) for e in pair]) == [("event", e) for e in pair]
