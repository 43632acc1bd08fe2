"""A run's container and table made, and its metadata set, by one request each that the
catalog's process serves itself, through tiled's catalog adapter.

Through tiled's HTTP client a new run took two POSTs (container, then table) and each start
or stop one PATCH, each costing the daemon's writer thread client CPU under the daemon's GIL
while the processing thread waited for it (the first ~50 spectra of a run were analysed
16-24 % slower, s47). Here a run is one request, and tiled's route machinery is left out of
the catalog's process too. Measured (scratch ``s48/M/attachcost.py``, ``ab_route.sh``): the
writer's CPU for a new run and its stop 5.2-5.3 -> 3.1-3.6 ms; the catalog process's CPU per
run of 10 spectra 70.7-71.0 -> 47.7-57.0 ms. Only what the store does with a new run goes
this way; a run that already exists (409), and every read, still go through tiled's client
(:func:`xasflow.adapters.tiled_batch.attach_run`).

:func:`add_run_routes` installs the routes on the app that ``build_app`` made (the child's and
the in-process one); :func:`create_run` and :class:`RunNode` are the writer's side.
"""

import secrets
from dataclasses import asdict
from typing import Any

import orjson

__all__ = ["ROUTE", "RunNode", "add_run_routes", "create_run", "run_node"]

#: Where the routes live, beside tiled's ``/api/v1``.
ROUTE = "/xasflow/v1/runs"

_TABLE_MIMETYPE = "application/x-tiled-sql-table"


def add_run_routes(app: Any, tree: Any, api_key: str | None) -> None:
    """Serve ``POST {ROUTE}/{key}`` (make a run's container with its metadata and specs, and
    its appendable table, in one request: 201 with the table's data source, 409 when the key
    exists) and ``PATCH {ROUTE}/{key}/metadata`` (a JSON Patch applied to the container's
    metadata, keeping no revision: 204; 404 when there is no such run) on ``app``, over the
    catalog adapter ``tree``. With ``api_key`` every request must carry it, as tiled's own do."""
    import jsonpatch
    from fastapi import Depends, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
    from tiled.catalog.adapter import Collision
    from tiled.server.core import NoEntry
    from tiled.structures.core import Spec, StructureFamily
    from tiled.structures.data_source import DataSource, Management
    from tiled.structures.table import TableStructure

    # no ``from __future__ import annotations`` in this module: FastAPI reads the routes'
    # annotations, which name classes imported here, not at the module's top
    expected = None if api_key is None else f"Apikey {api_key}".encode()

    def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not secrets.compare_digest(given, expected):
            raise HTTPException(status_code=401, detail="not authenticated")

    @app.post(ROUTE + "/{key}", dependencies=[Depends(authorized)])
    async def create(key: str, request: Request) -> Response:
        body = orjson.loads(await request.body())
        try:
            container = await tree.create_node(
                structure_family=StructureFamily.container,
                metadata=body["metadata"],
                key=key,
                specs=[Spec(**spec) for spec in body["specs"]],
            )
        except Collision:
            return JSONResponse({"detail": f"run {key} exists"}, status_code=409)
        source = DataSource(
            structure_family=StructureFamily.table,
            structure=TableStructure(**body["structure"]),
            mimetype=_TABLE_MIMETYPE,
            management=Management.writable,
        )
        table = await container.create_node(
            structure_family=StructureFamily.table,
            metadata={},
            key=body["stream"],
            data_sources=[source],
        )
        made = await table.data_sources(include_assets=True)
        return JSONResponse({"data_source": made[0].model_dump(mode="json")}, status_code=201)

    @app.patch(ROUTE + "/{key}/metadata", dependencies=[Depends(authorized)])
    async def patch(key: str, request: Request) -> Response:
        ops = orjson.loads(await request.body())
        try:
            node = await tree.lookup_adapter([key])
        except NoEntry:
            node = None
        if node is None:
            return JSONResponse({"detail": f"no run {key}"}, status_code=404)
        metadata = jsonpatch.apply_patch(dict(node.metadata()), ops)
        await node.replace_metadata(metadata=metadata, drop_revision=True)
        return Response(status_code=204)


def _url(root: Any, key: str) -> str:
    return str(root.context.api_uri.join(f"{ROUTE}/{key}"))


def create_run(
    root: Any, key: str, metadata: dict[str, Any], specs: list[str], stream: str, schema: Any
) -> "tuple[RunNode, Any] | None":
    """Make run ``key``'s container (``metadata``, ``specs``) and its appendable table
    ``stream`` of Arrow ``schema`` in one request over ``root``'s connection. Returns the
    container as a :class:`RunNode` and the table's tiled ``DataSource``, or None when the
    run exists already (nothing was made). Other refusals raise ``httpx.HTTPStatusError``."""
    from tiled.structures.data_source import DataSource
    from tiled.structures.table import TableStructure

    body = {
        "metadata": metadata,
        "specs": [{"name": name, "version": None} for name in specs],
        "stream": stream,
        "structure": asdict(TableStructure.from_schema(schema)),
    }
    http = root.context.http_client
    url = _url(root, key)
    response = http.post(url, content=orjson.dumps(body), headers=_JSON)
    if response.status_code == 409:
        return None
    response.raise_for_status()
    source = DataSource.from_json(response.json()["data_source"])
    return RunNode(http, url + "/metadata", metadata), source


_JSON = {"Content-Type": "application/json"}


def run_node(root: Any, key: str) -> "RunNode":
    """Run ``key``'s container as a :class:`RunNode` over ``root``'s connection, made
    without a request (its metadata is not read: for writes, such as a stop tried again; a
    run the catalog lacks is refused at the write, 404)."""
    return RunNode(root.context.http_client, _url(root, key) + "/metadata", {})


class RunNode:
    """A run's container as the store's writer uses it (what :func:`create_run` made): its
    metadata, and ``patch_metadata`` as tiled's client node has it, one request each."""

    def __init__(self, http: Any, url: str, metadata: dict[str, Any]) -> None:
        self._http = http
        self._url = url
        self.metadata = dict(metadata)

    def patch_metadata(self, metadata_patch: list[dict[str, Any]], drop_revision: bool) -> None:
        """Apply a JSON Patch (RFC 6902) to the run's metadata in the catalog, then here.
        Only without a revision (``drop_revision``), the one way the store writes."""
        import jsonpatch

        if not drop_revision:
            raise ValueError("a run's metadata is written without revisions here")
        response = self._http.patch(self._url, content=orjson.dumps(metadata_patch), headers=_JSON)
        response.raise_for_status()
        jsonpatch.apply_patch(self.metadata, metadata_patch, in_place=True)  # no deep copy
