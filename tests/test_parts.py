"""The daemon's parts: the order they close in, and the store group built or left clean."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port

from xasflow.adapters.recovery import InterruptedRuns
from xasflow.daemon.config import DaemonConfig
from xasflow.daemon.parts import Parts, build_store


class _Part:
    """Records what is called on it, in one log shared by every part."""

    def __init__(self, name: str, log: list[str], fail: str | None = None) -> None:
        self.name, self.log, self.fail, self.closed = name, log, fail, False

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.log.append(f"{self.name}.{method}")
            if method == self.fail:
                raise RuntimeError(f"{self.name} {method} failed")
            if method == "close":
                self.closed = True
            return True

        return call


def test_close_on_a_start_that_built_nothing() -> None:
    Parts().close(timeout=0.1)  # nothing to close; must not raise


def test_close_finishes_the_input_before_the_store_and_publishes_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Input first (nothing new comes in), Kafka's finish before the store closes, the gate
    after the store flushed (it publishes what the store holds), HTTP last; a part that fails
    to close is logged and the rest still close."""
    log: list[str] = []
    processor = type("Proc", (), {"drain": threading.Event()})()
    parts = Parts(
        registry=_Part("registry", log),  # type: ignore[arg-type]
        store=_Part("store", log, fail="close"),
        gate=_Part("gate", log),  # type: ignore[arg-type]
        publisher=_Part("publisher", log),
        source=_Part("source", log),
        processor=processor,
        ioc=_Part("ioc", log),
        submitter=_Part("submitter", log, fail="close"),
        http=_Part("http", log),
    )
    with caplog.at_level(logging.ERROR, logger="xasflow.daemon.parts"):
        parts.close(timeout=0.1)
    assert processor.drain.is_set()
    assert log == [
        "source.close",
        "registry.stop",
        "source.finish",
        "store.flush",
        "store.close",
        "gate.close",
        "publisher.close",
        "submitter.close",
        "ioc.stop",
        "http.stop",
    ]
    failed = [r.getMessage() for r in caplog.records]
    assert failed == [
        "closing the analysis store failed",
        "closing the queueserver submitter failed",
    ]


def test_a_failed_recovery_scan_leaves_the_store_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_store closes the store it opened when finding the interrupted runs fails, so a
    retry (or another daemon) can open the same directory."""
    cfg = DaemonConfig(storage={"directory": str(tmp_path / "store")})

    def broken(self: InterruptedRuns) -> None:
        raise OSError("catalog unreadable")

    with monkeypatch.context() as m:
        m.setattr(InterruptedRuns, "find", broken)
        with pytest.raises(OSError, match="catalog unreadable"):
            build_store(cfg, on_stored=lambda: None)
    store, writer, interrupted = build_store(cfg, on_stored=lambda: None)
    try:
        assert writer.store is store and interrupted.pending() == []
    finally:
        store.close()


def test_a_taken_http_port_is_refused_before_anything_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second daemon configured on a busy HTTP port refuses at once, naming the port and
    the setting to change (it said "[Errno 98] cannot serve HTTP on ...", naming no setting),
    and leaves no store directory behind (the port is bound before the store opens)."""
    from xasflow.daemon.service import Daemon, DaemonError

    store = tmp_path / "store"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = DaemonConfig(
            input={"address": f"tcp://127.0.0.1:{free_port()}"},
            http={"host": "127.0.0.1", "port": port},
            storage={"directory": str(store)},
        )
        daemon = Daemon(cfg)
        with pytest.raises(DaemonError) as exc:
            daemon.start(timeout=5)
    assert str(exc.value) == (
        f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use "
        "(another process listens there: stop it, or set another http.port)"
    )
    assert not store.exists()
    assert daemon.parts.source is None and daemon.parts.store is None
    # serve's stop() after the failed start said "xasflow daemon stopped: 0 spectra received
    # by the analysis: 0 analysed, ..." just before the error, as if it had run
    with caplog.at_level(logging.INFO, logger="xasflow.daemon.service"):
        daemon.stop()
    assert not [r for r in caplog.records if "daemon stopped" in r.getMessage()]
    from xasflow.daemon.parts import http_bind_error

    elsewhere = OSError(99, "cannot serve HTTP on 10.9.9.9:8620: Cannot assign requested address")
    assert str(http_bind_error(elsewhere)) == (
        "cannot serve HTTP on 10.9.9.9:8620: Cannot assign requested address "
        "(http.host is not an address of this machine)"
    )


def test_a_start_that_fails_after_the_bind_frees_the_port(tmp_path: Path) -> None:
    """The HTTP port is held from the start of start(); a later failure (here the store, open
    already) gives it back, and the daemon names no URL."""
    from xasflow.adapters.tiled_store import AnalysisStore
    from xasflow.daemon.service import Daemon, DaemonError

    port = free_port()
    cfg = DaemonConfig(
        input={"address": f"tcp://127.0.0.1:{free_port()}"},
        http={"host": "127.0.0.1", "port": port},
        storage={"directory": str(tmp_path / "store")},
    )
    with AnalysisStore(tmp_path / "store"):
        daemon = Daemon(cfg)
        with pytest.raises(DaemonError, match="already open"):
            daemon.start(timeout=5)
    assert daemon.http_url is None
    with socket.socket() as again:  # free again (SO_REUSEADDR as the daemon sets it)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen(1)


@pytest.mark.parametrize("where", ["a_file", "below_a_file"])
def test_a_store_path_through_a_file_names_the_setting(tmp_path: Path, where: str) -> None:
    """``storage.directory`` naming a file (or a path below one) stopped ``xasflow serve``
    with "cannot start the daemon: [Errno 17] File exists: '...'" ("[Errno 20] Not a
    directory" below it), naming no setting. Expected: the setting, and the file in its way."""
    from xasflow.daemon.parts import DaemonError

    afile = tmp_path / "afile"
    afile.write_text("")
    store = afile if where == "a_file" else afile / "sub"
    cfg = DaemonConfig(storage={"directory": str(store)})
    with pytest.raises(DaemonError) as exc:
        build_store(cfg, on_stored=lambda: None)
    assert str(exc.value) == (
        f"storage.directory {store}: cannot keep the analysis store there: "
        f"{afile} is in the way: a file (or a link), not a directory"
    )


def test_a_store_directory_this_user_cannot_write_names_the_setting(tmp_path: Path) -> None:
    """A read-only store directory said "[Errno 13] Permission denied: '<dir>/.writer.lock'"
    (the tests run as root, who may write anywhere, so the refusal is the store's own)."""
    import os

    from xasflow.daemon.parts import store_path_error

    store = tmp_path / "store"
    lock = store / ".writer.lock"
    error = store_path_error(store, PermissionError(13, "Permission denied", str(lock)))
    assert str(error) == (
        f"storage.directory {store}: cannot keep the analysis store there: "
        f"this user (uid {os.getuid()}) cannot write {lock} (Permission denied)"
    )
    # an error about another path (the catalog child's interpreter) is not the store's
    other = PermissionError(13, "Permission denied", "/usr/bin/python3")
    assert store_path_error(store, other) is None
    assert store_path_error(store, OSError("no file named")) is None
