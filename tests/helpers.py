"""Helpers shared by the daemon's tests: condition waits, free ports, composed analysis runs.

Imported as ``from helpers import ...`` (the tests directory is on ``sys.path``, as for
``synthetic_feff``). Waits poll a condition and fail with what they waited for; no test
sleeps a fixed time before an assertion.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Docs = list[tuple[str, dict[str, Any]]]

__all__ = ["Docs", "analysis_run_docs", "free_port", "raw_uids", "read_pv", "wait_for"]


def wait_for(
    check: Callable[[], Any], what: str = "", timeout: float = 20.0, interval: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or check}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_KEY = {"source": "test", "dtype": "number", "shape": []}


def analysis_run_docs(
    events: Sequence[tuple[str, Mapping[str, Any]]],
    raw_uid: str = "raw-run-7",
    metadata: Mapping[str, Any] | None = None,
    stop: Mapping[str, Any] | None = None,
) -> Docs:
    """An analysis run composed with event-model: start, one descriptor per stream named in
    ``events`` (``primary`` first), the events (``(stream, data)``) in order, and the stop.

    Each stream's data keys are the union of its events' keys (absent values None);
    ``stop`` adds fields to the stop document (e.g. ``exit_status``, ``raw_missing_events``).
    """
    from event_model import compose_run

    run = compose_run(metadata={"analysis": "xasflow", "raw_uid": raw_uid, **(metadata or {})})
    keys: dict[str, list[str]] = {"primary": []}
    for stream, data in events:
        known = keys.setdefault(stream, [])
        known.extend(k for k in data if k not in known)
    docs: Docs = [("start", dict(run.start_doc))]
    composers = {}
    for stream, names in keys.items():
        desc = run.compose_descriptor(name=stream, data_keys=dict.fromkeys(names, _KEY))
        composers[stream] = desc.compose_event
        docs.append(("descriptor", dict(desc.descriptor_doc)))
    for stream, data in events:
        row = {k: data.get(k) for k in keys[stream]}
        docs.append(
            ("event", dict(composers[stream](data=row, timestamps=dict.fromkeys(row, 0.0))))
        )
    stop = dict(stop or {})
    exit_status = stop.pop("exit_status", "success")
    docs.append(("stop", {**run.compose_stop(exit_status=exit_status), **stop}))
    return docs


def read_pv(pv: Any) -> Any:
    """A caproto client PV's value: a scalar (strings decoded) or a list."""
    data = pv.read(timeout=5.0).data
    value = data[0] if len(data) == 1 else list(data)
    return value.decode() if isinstance(value, bytes) else value


def raw_uids(docs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str | None]:
    """The raw run uid each analysis document belongs to (None for a run never started)."""
    by_start: dict[str, str] = {}
    by_descriptor: dict[str, str] = {}
    out: list[str | None] = []
    for name, doc in docs:
        if name == "start":
            by_start[doc["uid"]] = doc["raw_uid"]
            out.append(doc["raw_uid"])
        elif name in ("descriptor", "stop"):
            raw = by_start.get(doc["run_start"])
            if name == "descriptor" and raw is not None:
                by_descriptor[doc["uid"]] = raw
            out.append(raw)
        else:
            out.append(by_descriptor.get(doc["descriptor"]))
    return out
