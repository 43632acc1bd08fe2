"""The tiled side of the analysis store: table schemas from event-model descriptors, rows
to Arrow tables, the embedded catalog (created, stamped, served in-process), and the
writer-side state of an open run. Used by :mod:`xasflow.adapters.tiled_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from xasflow.adapters.file_lock import HeldElsewhere, hold

__all__ = [
    "CATALOG_FILE",
    "StoreError",
    "column_types",
    "hold_writer_lock",
    "quiet_tiled_app",
    "row_fits",
    "run_metadata",
    "schema_for_descriptor",
]

CATALOG_FILE = "catalog.db"
TABLE_FILES = {"sqlite": "tables.sqlite", "duckdb": "tables.duckdb"}
LOCK_FILE = ".writer.lock"
DEFAULT_STREAM = "primary"
SPEC = "xasflow_analysis"

# Event-model data-key dtypes -> Arrow column types ("array" is stored as JSON text).
_ARROW_TYPES: dict[str, pa.DataType] = {
    "number": pa.float64(),
    "integer": pa.int64(),
    "string": pa.string(),
    "boolean": pa.bool_(),
    "array": pa.string(),
}
_FIXED_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("seq_num", pa.int64()),
    ("time", pa.float64()),
)
_COLUMN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# "." and ".." are path segments a URL resolves away: the catalog routes would name the parent
_KEY_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9_.:-]{1,255}$")
_RETRY_DELAYS = (0.05, 0.25, 1.0)


class StoreError(RuntimeError):
    """The analysis store cannot be opened or used as asked."""


def hold_writer_lock(directory: Path) -> int:
    """The store directory's writer lock (:data:`LOCK_FILE`), as an fd to release; a
    StoreError naming the process that holds it elsewhere."""
    try:
        return hold(directory / LOCK_FILE)
    except HeldElsewhere as held:
        raise StoreError(
            f"{directory} is being written by another process (pid {held.pid}) "
            "(the lock is released when that process exits, even by SIGKILL)"
        ) from None


@dataclass(frozen=True, slots=True)
class Ack:
    """A queued row's two ends: ``stored()`` once it is durable, ``lost()`` when the store
    gives it up (a failed batch, a run that would not open, a row that does not fit). Exactly
    one of them runs per row, so a caller that counts rows out (the commit gate) can count
    them back in either way."""

    stored: Callable[[], None] | None = None
    lost: Callable[[], None] | None = None


@dataclass
class _Run:
    """Writer-side state of one open analysis run."""

    raw_uid: str
    stream: str
    schema: pa.Schema
    array_columns: frozenset[str]
    metadata: dict[str, Any]
    adapter: Any = None  # tiled.adapters.sql.SQLAdapter once the table exists
    node: Any = None  # the run's container: a catalog_runs.RunNode, or tiled's client node
    failed: bool = False
    stored_seq: set[int] = field(default_factory=set)
    pending: list[tuple[dict[str, Any], Ack | None]] = field(default_factory=list)
    journalled: list[int] = field(default_factory=list)  # seq_nums of pending rows journalled
    opened: int = 0  # the callers' count of opens of its raw_uid when this one was made
    first_pending_at: float = 0.0
    start_due: bool = False  # a prepared table: the start document is still to be written
    start_tries: int = 0  # writes of it tried in the writer's turns (the close writes it anyway)


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default``: numpy arrays as lists, numpy scalars as numbers, else text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _plain(obj: Any) -> Any:
    """Return ``obj`` as plain JSON data (numpy scalars/arrays become Python numbers/lists)."""
    return json.loads(json.dumps(obj, default=json_default, allow_nan=True))


def _seq_key(row: Mapping[str, Any]) -> int | None:
    """The row's seq_num as an int (its idempotency key), or None when it has none."""
    seq = row.get("seq_num")
    if isinstance(seq, bool) or not isinstance(seq, int | float) or seq != seq:
        return None
    return int(seq)


def _to_builtin(obj: Any) -> Any:
    """Copy tiled's read-only metadata views into ordinary dicts and lists."""
    if isinstance(obj, Mapping):
        return {k: _to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_builtin(v) for v in obj]
    return obj


def schema_for_descriptor(descriptor: Mapping[str, Any]) -> tuple[pa.Schema, frozenset[str]]:
    """Arrow schema of a run's event table from its descriptor, and its JSON-encoded columns."""
    data_keys = descriptor.get("data_keys")
    if not isinstance(data_keys, Mapping) or not data_keys:
        raise ValueError("descriptor has no data_keys")
    fields = [pa.field(name, dtype) for name, dtype in _FIXED_COLUMNS]
    arrays: set[str] = set()
    for name, key in data_keys.items():
        if not isinstance(name, str) or not _COLUMN_NAME.match(name):
            raise ValueError(
                f"data key {name!r} is not usable as a column name (letters, digits, _; max 63)"
            )
        dtype = key.get("dtype") if isinstance(key, Mapping) else None
        if dtype not in _ARROW_TYPES:
            raise ValueError(f"data key {name!r} has unsupported dtype {dtype!r}")
        if dtype == "array":
            arrays.add(name)
        fields.append(pa.field(name, _ARROW_TYPES[dtype]))
    lowered = [f.name.lower() for f in fields]
    if len(set(lowered)) != len(lowered):
        raise ValueError(
            "descriptor data keys collide with each other or with seq_num/time "
            "(column names are compared case-insensitively)"
        )
    return pa.schema(fields), frozenset(arrays)


def _rows_to_table(
    rows: list[dict[str, Any]], schema: pa.Schema, array_columns: frozenset[str]
) -> pa.Table:
    """Columnar Arrow table of ``rows`` (missing keys become nulls, arrays become JSON text)."""
    columns: dict[str, list[Any]] = {}
    for name in schema.names:
        values = [row.get(name) for row in rows]
        if name in array_columns:
            values = [None if v is None else json.dumps(_plain(v)) for v in values]
        columns[name] = values
    return pa.Table.from_pydict(columns, schema=schema)


def _ensure_catalog(catalog_path: Path) -> None:
    """Create and stamp the tiled catalog database if it is new (in-process, ~0.5 s)."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from tiled.alembic_utils import UninitializedDatabase, check_database, stamp_head
    from tiled.catalog.alembic_constants import ALEMBIC_DIR, ALEMBIC_INI_TEMPLATE_PATH
    from tiled.catalog.core import ALL_REVISIONS, REQUIRED_REVISION, initialize_database
    from tiled.utils import ensure_specified_sql_driver

    uri = ensure_specified_sql_driver(f"sqlite:///{catalog_path}")
    outcome: dict[str, Any] = {}

    async def setup() -> bool:
        engine = create_async_engine(uri)
        try:
            try:
                await check_database(engine, REQUIRED_REVISION, ALL_REVISIONS)
            except UninitializedDatabase:
                await initialize_database(engine)
                return True
            return False
        finally:
            await engine.dispose()

    def work() -> None:
        # A thread of its own: asyncio.run() must not meet the caller's event loop, if any.
        try:
            if asyncio.run(setup()):
                stamp_head(ALEMBIC_INI_TEMPLATE_PATH, ALEMBIC_DIR, uri)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="xasflow-tiled-init")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise StoreError(f"cannot initialise tiled catalog {catalog_path}") from outcome["error"]


class _NoVersionLine(logging.Filter):
    """Drops tiled's "Tiled version X" start-up line, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Tiled version")


@contextlib.contextmanager
def quiet_tiled_app() -> Iterator[None]:
    """While it lasts, tiled's app does not log its version at start-up (a daemon's catalog
    child, every ``read_analysis`` of a directory). Only that line, and only meanwhile: the
    logger's level and every other message are left as the user set them."""
    logger = logging.getLogger("tiled.server.app")
    quiet = _NoVersionLine()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class _SettledOverrides(dict[Any, Any]):
    """tiled's dependency overrides, already in effect: still looked up by tiled's start-up
    and shutdown, but falsy, so FastAPI does not rebuild every route's dependency graph
    for every request (it does whenever ``app.dependency_overrides`` is non-empty:
    fastapi/fastapi#8402)."""

    def __bool__(self) -> bool:
        return False


def settle_overrides(app: Any) -> bool:
    """Take tiled's one dependency override out of FastAPI's per-request path, where that is
    exact: ``build_app`` overrides ``get_settings`` with a function that puts the app's
    settings into ``get_settings``'s own cached object and returns that object, so once it
    has run the two give the same settings. Rebuilding the dependency graphs was about half
    of the catalog child's CPU per request (3 requests and ~80 ms of CPU per analysis run).
    Returns whether it did; an app with any other override, or a tiled whose override
    returns another object, is left as it is."""
    from tiled.server.settings import get_settings

    overrides = app.dependency_overrides
    override = overrides.get(get_settings)
    if override is None or set(overrides) != {get_settings} or override() is not get_settings():
        return False
    app.dependency_overrides = _SettledOverrides(overrides)
    return True


@contextlib.contextmanager
def _serve(directory: Path, table_uris: list[str]) -> Iterator[Any]:
    """Yield a root tiled client over the catalog in ``directory``, served in-process."""
    from tiled.catalog import from_uri
    from tiled.client import Context, from_context
    from tiled.server.app import build_app

    from xasflow.adapters.catalog_runs import add_run_routes

    tree = from_uri(f"sqlite:///{directory / CATALOG_FILE}", writable_storage=table_uris)
    with quiet_tiled_app():  # the app starts here
        app = build_app(tree)
        settle_overrides(app)
        add_run_routes(app, tree, None)  # reached only through this process's own client
        context = Context.from_app(app)
    try:
        yield from_context(context)
    finally:
        context.close()


def run_metadata(start: dict | None, descriptor: dict, stream: str) -> dict[str, Any]:
    """A run container's metadata: its analysis start (None while prepared ahead), the
    descriptor's uid, stream and data keys, and no stop yet."""
    desc = {"uid": descriptor.get("uid"), "name": stream, "data_keys": descriptor["data_keys"]}
    return _plain(
        {"start": None if start is None else dict(start), "descriptor": desc, "stop": None}
    )


#: Python types an Arrow column of each type takes from a row (bool is not a number here).
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "int64": (int, np.integer),
    "double": (int, float, np.integer, np.floating),
    "string": (str,),
    "bool": (bool, np.bool_),
}


def column_types(schema: pa.Schema, array_columns: frozenset[str]) -> dict[str, tuple[type, ...]]:
    """Per column, the value types :func:`row_fits` accepts (array columns take anything JSON)."""
    return {
        name: _ACCEPTS.get(str(t), (object,)) if name not in array_columns else (object,)
        for name, t in zip(schema.names, schema.types, strict=True)
    }


def row_fits(row: Mapping[str, Any], types: Mapping[str, tuple[type, ...]]) -> bool:
    """Whether every value of ``row`` has a type its column takes (None always fits): a check
    in microseconds where converting the row to Arrow costs ~0.4 ms."""
    for key, value in row.items():
        if value is None:
            continue
        accepted = types.get(key)
        if accepted is None:
            return False
        kind = type(value)
        if kind is str:  # Arrow refuses text UTF-8 cannot carry (a lone surrogate)
            if str not in accepted or not (value.isascii() or _utf8(value)):
                return False
            continue
        if kind in accepted and kind is not int:  # the usual row: a float or bool as is
            continue
        if not isinstance(value, accepted):
            return False
        if isinstance(value, (bool, np.bool_)) and bool not in accepted:
            return False
        # a number column takes the integers a double holds exactly; int64 its range (Arrow
        # refuses numpy's unsigned integers past it too)
        if isinstance(value, (int, np.integer)) and not (
            -(2**53) <= int(value) <= 2**53 if float in accepted else -(2**63) <= int(value) < 2**63
        ):
            return False
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
