"""Writer-thread steps of the analysis store: attach a run's table, split a batch into fresh
rows and duplicates, and salvage a batch with rows that do not fit their columns.

Pure helpers over :class:`~xasflow.adapters.tiled_schema._Run`; the store's writer thread
(:mod:`xasflow.adapters.tiled_store`) is their only caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from xasflow.adapters.catalog_runs import create_run
from xasflow.adapters.tiled_schema import (
    _RETRY_DELAYS,
    SPEC,
    Ack,
    StoreError,
    _rows_to_table,
    _Run,
    _seq_key,
)

__all__ = [
    "Ack",
    "Pending",
    "acknowledge",
    "append_once",
    "append_pending",
    "attach_run",
    "salvage",
    "set_metadata",
    "split_fresh",
    "with_retries",
]

logger = logging.getLogger(__name__)

#: A queued row and what to tell once it is committed or lost.
Pending = tuple[dict[str, Any], Ack | None]

#: Errors of converting rows to an Arrow table that mean "a row does not fit its columns".
CONVERT_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)


def attach_run(root: Any, run: _Run, *, reopen: bool = False) -> None:
    """Find or create the run's container and table, and the adapter that appends to it.

    ``reopen``: the run is being opened for analysis (not made ahead of it), so a stop an
    earlier copy left on an existing node goes: a crash now must show it unfinished. A run
    made ahead (``prepare_run``, at every raw start, duplicates included) keeps its stop.
    """
    from tiled.structures.table import TableStructure

    # one request for a new run (the usual case), served by the catalog's process itself
    made = create_run(root, run.raw_uid, run.metadata, [SPEC], run.stream, run.schema)
    if made is not None:
        run.node, source = made
        run.adapter = _table_adapter(source, TableStructure.from_schema(run.schema))
        run.stored_seq = set()  # a table made just now holds no rows
        return
    node = root[run.raw_uid]  # reopened: after a restart, or replayed after a hand-over
    if _start_due(node.metadata.get("start"), run.metadata.get("start"), reopen):
        run.start_due = True
    if run.stream in node:
        table = node[run.stream]
        stored = table.structure().arrow_schema_decoded
        if not stored.equals(run.schema):
            raise StoreError(
                f"run {run.raw_uid} already has a {run.stream!r} table with columns "
                f"{stored.names}, not {run.schema.names}"
            )
        fresh = False
    else:
        table = node.create_appendable_table(run.schema, key=run.stream)
        fresh = True
    run.adapter = _table_adapter(_data_source(table), table.structure())
    if fresh:  # a table made just now holds no rows: no need to read its seq_num column
        run.stored_seq = set()
    else:
        seq = run.adapter.read(["seq_num"])["seq_num"].dropna()
        run.stored_seq = {int(s) for s in seq}
    run.node = node
    if reopen:
        clear_stop(node)


def _table_adapter(source: Any, structure: Any) -> Any:
    """tiled's SQL adapter of a table (its data source and structure): rows are appended
    through it straight into the table's file, by the daemon itself."""
    from tiled.adapters.sql import SQLAdapter

    params = source.parameters
    return SQLAdapter(
        source.assets[0].data_uri, structure, params["table_name"], params["dataset_id"]
    )


def _start_due(stored: Any, start: dict[str, Any] | None, reopen: bool) -> bool:
    """Whether an existing node's start is to be written: it has none (made ahead of its
    run, ``prepare_run``), or the run is opened for another analysis copy (a replay: its
    stop will be this copy's, so its start must be too; the rows stay one per seq_num)."""
    if start is None:
        return False
    return stored is None or (reopen and stored.get("uid") != start.get("uid"))


def clear_stop(node: Any) -> None:
    """An existing run's node open again: the stop an earlier copy wrote goes."""
    if node.metadata.get("stop") is not None:
        set_metadata(node, {"stop": None})


def set_metadata(node: Any, values: dict[str, Any]) -> None:
    """Set top-level keys of a node's metadata in one JSON Patch (RFC 6902 ``add`` sets a key
    whether present or not), keeping no revision.

    tiled's ``update_metadata`` diffs the whole metadata against the new in the client and,
    by default, keeps the old version as a revision row: for a run, two full copies of its
    start and data keys in the catalog, for nobody, and each write cost the catalog process
    ~19 ms of CPU and the writer thread ~3 ms under the daemon's GIL (against ~15 and ~2
    ms so; scratch s47/M/patchcost.py).
    """
    ops = [{"op": "add", "path": _pointer(key), "value": value} for key, value in values.items()]
    node.patch_metadata(metadata_patch=ops, drop_revision=True)


def _pointer(key: str) -> str:
    """The JSON Pointer (RFC 6901) of a top-level key."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def _data_source(table: Any) -> Any:
    """The table's data source, from the create response when it came with one (no request)."""
    from tiled.structures.data_source import DataSource

    known = table.item["attributes"].get("data_sources")
    if known and known[0].get("assets"):
        return DataSource.from_json(known[0])
    return table.data_sources()[0]


def split_fresh(
    run: _Run, pending: list[Pending]
) -> tuple[list[dict[str, Any]], list[Ack | None], set[int], int]:
    """Rows of ``pending`` not yet stored (by seq_num), every callback, their keys, duplicates.

    A row whose seq_num is already stored, or earlier in this batch, is acknowledged without
    being written again: the per-run idempotency that makes redelivery after a crash harmless.
    """
    fresh: list[dict[str, Any]] = []
    acks: list[Ack | None] = []
    seen: set[int] = set()
    duplicates = 0
    for row, callback in pending:
        key = _seq_key(row)
        if key is not None and (key in run.stored_seq or key in seen):
            duplicates += 1
        else:
            fresh.append(row)
            if key is not None:
                seen.add(key)
        acks.append(callback)
    return fresh, acks, seen, duplicates


def salvage(
    run: _Run, pending: list[Pending], fresh: list[dict[str, Any]], seen: set[int]
) -> tuple[pa.Table, list[Ack | None], list[Ack | None]]:
    """Convert rows one by one when a batch will not convert: the table of those that fit,
    the acknowledgements of the rows kept (duplicates included) and of the rows dropped."""
    good_ids: set[int] = set()
    tables = []
    for row in fresh:
        try:
            tables.append(_rows_to_table([row], run.schema, run.array_columns))
            good_ids.add(id(row))
        except CONVERT_ERRORS:
            logger.error(
                "analysis store: run %s: row %r does not fit its columns", run.raw_uid, row
            )
            seen.discard(_seq_key(row))
    fresh_ids = {id(row) for row in fresh}
    kept = [cb for row, cb in pending if id(row) not in fresh_ids or id(row) in good_ids]
    dropped = [cb for row, cb in pending if id(row) in fresh_ids and id(row) not in good_ids]
    table = pa.concat_tables(tables) if tables else run.schema.empty_table()
    return table, kept, dropped


def with_retries(action: Callable[[], Any], what: str) -> Any:
    """``action()``, retried after each of the store's retry delays; the last failure raises."""
    for attempt, delay in enumerate((*_RETRY_DELAYS, None)):
        try:
            return action()
        except Exception:
            if delay is None:
                raise
            logger.warning("analysis store: %s failed (attempt %d), retrying", what, attempt + 1)
            time.sleep(delay)
    return None


def append_once(run: _Run, table: pa.Table) -> None:
    """Append ``table`` to the run's table, retried like every catalog call, but never twice.

    An append can commit and still raise (its connection dropped, or its answer timed out,
    after the commit): a plain retry then wrote every row again, so each result was in the
    catalog twice. tiled's ``SQLAdapter.append_partition`` is one ingest and one commit, so a
    failed try committed all of its rows or none; before each retry the table says which. A
    batch with seq_nums committed if one of them is stored now (:func:`split_fresh` left out
    those stored before); one without any, if the table grew past its size before the first
    try (read then only: the daemon's rows always carry a seq_num).
    """
    keys = {int(k) for k in table.column("seq_num").drop_null().to_pylist()}
    before = None if keys else _stored_rows(run)[1]
    tries = 0

    def attempt() -> None:
        nonlocal tries
        tries += 1
        if tries > 1:  # the single writer: nothing else appends to this table meanwhile
            stored, count = _stored_rows(run)
            if (not keys.isdisjoint(stored)) if keys else count > (before or 0):
                logger.warning(
                    "analysis store: run %s: the failed append of %d rows had committed; "
                    "not written again",
                    run.raw_uid,
                    table.num_rows,
                )
                return
        run.adapter.append_partition(0, table)

    with_retries(attempt, f"append {run.raw_uid}")


def _stored_rows(run: _Run) -> tuple[set[int], int]:
    """The seq_nums stored in the run's table, and how many rows it holds."""
    seq = run.adapter.read(["seq_num"])["seq_num"]
    return {int(s) for s in seq.dropna()}, len(seq)


def append_pending(
    run: _Run, pending: list[Pending]
) -> tuple[int, int, list[Ack | None], list[Ack | None]]:
    """Append a run's pending rows in one transaction (duplicates skipped, rows that do not fit
    dropped): rows stored, duplicates, and the acknowledgements of the rows kept and dropped.

    Raises when the append itself fails (after the store's retries): nothing is acknowledged.
    """
    fresh, acks, seen, duplicates = split_fresh(run, pending)
    dropped: list[Ack | None] = []
    if fresh:
        try:
            table = _rows_to_table(fresh, run.schema, run.array_columns)
        except CONVERT_ERRORS:
            table, acks, dropped = salvage(run, pending, fresh, seen)
        if table.num_rows:
            append_once(run, table)
        run.stored_seq |= seen
    return len(fresh) - len(dropped), duplicates, acks, dropped


def acknowledge(acks: list[Ack | None], *, lost: bool = False) -> None:
    """Tell each row's end (``stored``, or ``lost``); a callback that raises is logged, the
    rest still run."""
    for ack in acks:
        callback = None if ack is None else (ack.lost if lost else ack.stored)
        if callback is not None:
            try:
                callback()
            except Exception:
                logger.exception(
                    "analysis store: a row's %s callback raised", "lost" if lost else "stored"
                )
