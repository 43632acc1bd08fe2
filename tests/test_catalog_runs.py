"""A run made and its metadata set by the catalog process's own routes: the same node tiled's
client would have made, one request each, no revisions, and the routes closed to a request
without the catalog's key."""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tiled")

from helpers import STORE_DESCRIPTOR as DESCRIPTOR
from helpers import store_row

from xasflow.adapters.catalog_runs import ROUTE, RunNode, create_run
from xasflow.adapters.tiled_batch import set_metadata
from xasflow.adapters.tiled_schema import (
    CATALOG_FILE,
    SPEC,
    _ensure_catalog,
    _serve,
    run_metadata,
    schema_for_descriptor,
)
from xasflow.adapters.tiled_store import AnalysisStore


@pytest.fixture
def root(tmp_path: Path) -> Any:
    _ensure_catalog(tmp_path / CATALOG_FILE)
    with _serve(tmp_path, [f"sqlite:///{tmp_path / 'tables.sqlite'}"]) as client:
        yield client


def _make(root: Any, key: str) -> Any:
    schema, _ = schema_for_descriptor(DESCRIPTOR)
    meta = run_metadata({"uid": f"{key}-start", "n": 1}, DESCRIPTOR, "primary")
    return create_run(root, key, meta, [SPEC], "primary", schema), schema, meta


def test_a_run_made_by_the_route_is_the_node_tiled_would_have_made(root: Any) -> None:
    made, schema, meta = _make(root, "run-a")
    assert made is not None
    node, source = made
    assert isinstance(node, RunNode) and node.metadata == meta
    assert source.parameters["table_name"] and source.assets[0].data_uri.startswith("sqlite")
    container = root["run-a"]  # read back through tiled's own client
    assert dict(container.metadata) == meta
    assert [s.name for s in container.specs] == [SPEC]
    table = container["primary"]
    assert table.structure().arrow_schema_decoded.equals(schema)
    assert table.data_sources()[0].parameters == source.parameters


def test_a_key_that_exists_makes_nothing_and_says_so(root: Any) -> None:
    assert _make(root, "run-b")[0] is not None
    assert _make(root, "run-b")[0] is None  # 409: the caller takes tiled's path (reopen)
    assert list(root) == ["run-b"] and list(root["run-b"]) == ["primary"]


def test_metadata_is_patched_in_place_with_no_revision(root: Any, tmp_path: Path) -> None:
    made, _, meta = _make(root, "run-c")
    assert made is not None
    node = made[0]
    set_metadata(node, {"stop": {"uid": "c-stop", "exit_status": "success"}, "a/b": 1})
    assert node.metadata["stop"]["uid"] == "c-stop"
    stored = dict(root["run-c"].metadata)
    assert stored == {**meta, "stop": {"uid": "c-stop", "exit_status": "success"}, "a/b": 1}
    with contextlib.closing(sqlite3.connect(tmp_path / CATALOG_FILE)) as db:
        assert db.execute("SELECT COUNT(*) FROM revisions").fetchone() == (0,)
    with pytest.raises(ValueError, match="without revisions"):
        node.patch_metadata([{"op": "add", "path": "/x", "value": 1}], drop_revision=False)


def test_a_patch_of_a_run_the_catalog_lacks_is_refused(root: Any) -> None:
    import httpx

    made, _, meta = _make(root, "run-d")
    assert made is not None
    root["run-d"].delete(recursive=True, external_only=False)
    with pytest.raises(httpx.HTTPStatusError) as refused:
        set_metadata(made[0], {"stop": {"uid": "d-stop"}})
    assert refused.value.response.status_code == 404
    assert made[0].metadata == meta  # not changed here either


def test_the_child_s_routes_insist_on_its_key(tmp_path: Path) -> None:
    with AnalysisStore(tmp_path / "s", journal=True, catalog_process=True) as store:
        store.open_run("run-e", {"uid": "e-start"}, DESCRIPTOR)
        store.close_run("run-e", {"uid": "e-stop", "exit_status": "success"})
        assert store.flush(timeout=30)
        client = store.client()
        assert client["run-e"].metadata["stop"]["uid"] == "e-stop"  # made and patched here
        url = str(client.context.api_uri.join(f"{ROUTE}/run-x"))
        for headers in ({}, {"Authorization": "Apikey wrong"}):
            request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401
            patch = urllib.request.Request(
                url.replace("run-x", "run-e") + "/metadata", data=b"[]", headers=headers
            )
            patch.method = "PATCH"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(patch, timeout=10)
            assert refused.value.code == 401
        assert "run-x" not in client


def test_a_run_whose_table_was_never_made_gets_it_on_the_next_attach(root: Any) -> None:
    """A container made without its table (the route's second step failed, or its answer
    was lost after the first): the retry meets 409, and tiled's path makes the table, so
    the run's rows still go in."""
    from xasflow.adapters.tiled_batch import append_pending, attach_run
    from xasflow.adapters.tiled_schema import _Run

    schema, arrays = schema_for_descriptor(DESCRIPTOR)
    meta = run_metadata({"uid": "f-start"}, DESCRIPTOR, "primary")
    root.create_container(key="run-f", metadata=meta, specs=[SPEC])  # the first step alone
    run = _Run("run-f", "primary", schema, arrays, meta)
    attach_run(root, run)
    assert not isinstance(run.node, RunNode)  # found through tiled's client, not made
    assert append_pending(run, [(store_row(1), None), (store_row(2), None)])[0] == 2
    assert list(root["run-f"]) == ["primary"]
    assert [int(s) for s in root["run-f"]["primary"].read()["seq_num"]] == [1, 2]


def test_a_node_made_without_a_request_writes_to_its_run(root: Any) -> None:
    """``run_node`` (a refused stop tried again) reads nothing, and writes to the run."""
    from xasflow.adapters.catalog_runs import run_node

    made, _, meta = _make(root, "run-g")
    assert made is not None
    node = run_node(root, "run-g")
    assert node.metadata == {}  # not read
    set_metadata(node, {"stop": {"uid": "g-stop"}})
    assert dict(root["run-g"].metadata) == {**meta, "stop": {"uid": "g-stop"}}
