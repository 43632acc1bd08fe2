"""A ``dask.distributed`` client for the heavy offline jobs (FEFF generation, structure labels).

One code path for a laptop and a cluster: with no scheduler address a :class:`LocalCluster`
of ``workers`` single-threaded processes is started (and closed afterwards); with an address
(``tcp://host:8786``, or ``$XASFLOW_SCHEDULER`` when none is passed) the client joins that
scheduler, whose workers must have ``xasflow`` importable.

A job that ends normally ends quietly: a worker closed while its heartbeat to the scheduler
is in flight cuts that connection itself and logs "Failed to communicate with scheduler
during heartbeat" with two tracebacks (dask/distributed #7105, #9032; likely on a loaded
machine, where the scheduler answers late). So before the local cluster closes its workers,
each stops its heartbeat and waits for the one in flight to be answered; a heartbeat still
unanswered then, and only that message, is dropped by a filter installed at that moment.
Errors during the job are logged as ever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)

#: Environment variable naming a dask scheduler to use when no address is given.
SCHEDULER_ENV = "XASFLOW_SCHEDULER"

#: What a worker logs (``distributed.worker``, ERROR) when its heartbeat's connection closes.
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."

#: Longest wait, at the end of a job, for a worker's heartbeat in flight to be answered.
HEARTBEAT_WAIT_S = 5.0


def scheduler_address(scheduler: str | None = None) -> str | None:
    """``scheduler`` if given, else ``$XASFLOW_SCHEDULER`` if set and non-empty, else None."""
    return scheduler or os.environ.get(SCHEDULER_ENV) or None


@contextmanager
def dask_client(
    scheduler: str | None = None, workers: int = 2, processes: bool = True
) -> Iterator[Client]:
    """A client on ``scheduler`` (see :func:`scheduler_address`) or on a new LocalCluster.

    The local cluster has ``workers`` workers of one thread each (FEFF and the label code are
    serial), its dashboard on a free port, and is shut down on exit; a remote scheduler is left running.
    ``processes=False`` runs the workers as threads of this process (tests, tiny jobs).
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # the train extra names it
        raise RuntimeError(
            "dask.distributed is needed for this job: pip install 'xasflow[train]'"
        ) from exc

    address = scheduler_address(scheduler)
    if address is not None:
        with Client(address) as client:
            yield client
        return
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client
        _end_quietly(client, processes)  # not after an error: the workers may be what failed


def _end_quietly(client: Client, processes: bool) -> None:
    """Stop every worker's heartbeat before the cluster closes them (see the module docstring);
    a shutdown that cannot be made quiet is left as it is, never an error of the job.
    The log filter only goes into worker processes: in this one it would outlive the job."""
    try:
        client.run(_stop_heartbeat, drop_failure=processes)
    except Exception:
        logger.debug("could not stop the workers' heartbeats before closing", exc_info=True)


class _DropHeartbeatFailure(logging.Filter):
    """Drops the worker's heartbeat-failure record (installed only once the job is over)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != HEARTBEAT_FAILED


async def _stop_heartbeat(dask_worker: Any, drop_failure: bool) -> None:
    """On a worker: no new heartbeat; the one in flight (a connection to the scheduler in use)
    answered or given up after ``HEARTBEAT_WAIT_S``; then, with ``drop_failure``, the failure
    of one still in flight not logged."""
    dask_worker.periodic_callbacks["heartbeat"].stop()
    in_use = getattr(getattr(dask_worker, "rpc", None), "occupied", {})
    address = dask_worker.scheduler.address
    deadline = time.monotonic() + HEARTBEAT_WAIT_S
    while in_use.get(address) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if drop_failure:
        logging.getLogger("distributed.worker").addFilter(_DropHeartbeatFailure())
