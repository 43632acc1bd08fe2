"""The store's tiled catalog served by a child process on loopback.

Served in-process, every catalog change (a run's container and table, its start and stop
metadata) runs tiled's whole HTTP stack under the daemon's GIL: about 70 ms of CPU per run,
in one burst when a run starts, which held back every spectrum analysed meanwhile (measured:
500 spectra/s, each run's first ~120 spectra waited 30-100 ms, against 2-5 ms with no
store). In a child, the same work runs on the other core, and the daemon keeps ~3-3.5 ms of
client CPU per run: a new run and its metadata writes take one request each of the child's
own routes (:mod:`xasflow.adapters.catalog_runs`). Rows are still appended by the daemon
itself, straight into the table's SQLite file
(:func:`xasflow.adapters.tiled_batch.append_pending`).

The child binds an ephemeral loopback port, prints it on stdout, requires a fresh random API
key (from its environment, never its command line), and exits when its stdin closes: when
the store closes it, or when the daemon dies, even by SIGKILL. It ignores SIGINT, SIGTERM and
SIGHUP, which a terminal or systemd sends to the whole group while the daemon still needs
its catalog to flush. A child that dies all the same is replaced by the store
(:mod:`xasflow.adapters.catalog_supervisor`).

    python -m xasflow.adapters.tiled_server DIRECTORY TABLE_URI   (run by the store)
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The environment variable that carries the API key to the child.
KEY_ENV = "XASFLOW_CATALOG_KEY"


class CatalogServerError(RuntimeError):
    """The catalog's child process did not start."""


class ChildLiveness:
    """Whether the catalog's child process is running (``serve_in_child`` fills ``proc``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def serve_in_child(
    directory: Path,
    table_uris: list[str],
    timeout: float = 60.0,
    liveness: ChildLiveness | None = None,
    python: str = sys.executable,
) -> Iterator[Any]:
    """Yield a tiled client of the catalog in ``directory``, served by a child process run by
    ``python`` (``liveness``, if given, tells from then on whether that process still runs)."""
    key = secrets.token_hex(16)
    proc = subprocess.Popen(
        [python, "-m", "xasflow.adapters.tiled_server", str(directory), *table_uris],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, KEY_ENV: key},
        start_new_session=True,  # a terminal's Ctrl-C is for the daemon, which then closes it
    )
    if liveness is not None:
        liveness.proc = proc
    storages: list[Any] = []
    try:  # this side's imports (tiled's SQL adapter alone: 2 s) overlap the child's start
        from tiled.adapters.sql import SQLAdapter  # noqa: F401  (what appends use)
        from tiled.client import from_uri
        from tiled.storage import acquire_storage, parse_storage

        port = _read_port(proc, timeout)
        for uri in table_uris:  # appends go straight to the tables: their storage, here too
            storages.append(acquire_storage(parse_storage(uri)))
        client = from_uri(f"http://127.0.0.1:{port}", api_key=key)
        warm_up(client)
    except BaseException:
        _stop(proc)
        _release(storages)
        raise
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.context.close()
        _stop(proc)
        _release(storages)


def _release(storages: list[Any]) -> None:
    """Give back this side's table storages: the last user closes their pooled connections.

    tiled shares one storage (and its pool) per URI in a process. Kept past the store, a
    pooled SQLite connection keeps its old view of the schema, and a store opened again on
    the same directory in the same process failed its first append ("no such table": the
    table its child had just made again).
    """
    from tiled.storage import release_storage

    for storage in storages:
        try:
            release_storage(storage)
        except Exception:  # closing connections only; the store is closed either way
            logger.warning("releasing the catalog's table storage failed", exc_info=True)


def warm_up(root: Any) -> None:
    """One throwaway run through every catalog operation a run needs (container, table, an
    appended row, metadata), then deleted: both processes' first-use costs (lazy imports,
    the table driver, connections) are paid before the daemon analyses anything, not while
    its first run streams (measured: 30-130 ms latency bumps at 100 spectra/s without). The
    run carries a stop, so a crash before the delete leaves nothing that looks unfinished."""
    import pyarrow as pa

    from xasflow.adapters.tiled_batch import append_pending, attach_run, set_metadata
    from xasflow.adapters.tiled_schema import _Run

    key = f"xasflow-warm-up-{secrets.token_hex(4)}"
    schema = pa.schema([("seq_num", pa.int64()), ("time", pa.float64()), ("s", pa.string())])
    meta = {"xasflow_warm_up": True, "stop": {"uid": key}}
    run = _Run(key, "primary", schema, frozenset(), meta)
    try:
        attach_run(root, run)
        append_pending(run, [({"seq_num": 1, "time": 0.0, "s": "x"}, None)])
        set_metadata(run.node, {"xasflow_warm_up": "done", "stop": {"uid": key}})
    finally:
        try:
            root[key].delete(recursive=True, external_only=False)
        except Exception:  # harmless (it carries a stop), but a person should know
            logger.warning("catalog warm-up run %s could not be deleted", key, exc_info=True)


def _read_port(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port the child prints once it is listening (a CatalogServerError if it never does)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if line.strip().isdigit():
                return int(line)
            break
        if proc.poll() is not None:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):  # its exit code, for the message
        proc.wait(timeout=min(5.0, max(0.0, deadline - time.monotonic())))
    raise CatalogServerError(
        f"the catalog server did not start (exit code {proc.poll()}); see the log above"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin (it exits on EOF), then wait; kill it if it lingers."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    """The child: serve the catalog until stdin closes."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the daemon's to act on (see _ParentOwned)
    import uvicorn
    from tiled.catalog import from_uri
    from tiled.config import Authentication
    from tiled.server.app import build_app

    from xasflow.adapters.catalog_runs import add_run_routes
    from xasflow.adapters.tiled_schema import (
        CATALOG_FILE,
        _ensure_catalog,
        quiet_tiled_app,
        settle_overrides,
    )

    args = sys.argv[1:] if argv is None else argv
    directory, table_uris = Path(args[0]), args[1:]
    key = os.environ.pop(KEY_ENV)
    _ensure_catalog(directory / CATALOG_FILE)
    tree = from_uri(f"sqlite:///{directory / CATALOG_FILE}", writable_storage=table_uris)
    app = build_app(tree, authentication=Authentication(single_user_api_key=key))
    settle_overrides(app)
    add_run_routes(app, tree, key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # before the port is told: a first request waits in the backlog

    def exit_on_eof() -> None:  # the parent closed stdin, or died
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=exit_on_eof, name="parent-watch", daemon=True).start()
    print(sock.getsockname()[1], flush=True)

    class _ParentOwned(uvicorn.Server):
        """Stops only when stdin closes. Ctrl-C in a terminal and systemd's stop signal reach
        the whole process group or cgroup: had the child obeyed them, the daemon, which
        stops on them too, would have found its catalog gone while it flushed."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app, log_level="warning", access_log=False)
    with quiet_tiled_app():  # the app starts inside run()
        _ParentOwned(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
