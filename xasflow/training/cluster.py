"""A ``dask.distributed`` client for the heavy offline jobs (FEFF generation, structure labels).

One code path for a laptop and a cluster: with no scheduler address a :class:`LocalCluster`
of ``workers`` single-threaded processes is started (and closed afterwards); with an address
(``tcp://host:8786``, or ``$XASFLOW_SCHEDULER`` when none is passed) the client joins that
scheduler, whose workers must have ``xasflow`` importable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client

#: Environment variable naming a dask scheduler to use when no address is given.
SCHEDULER_ENV = "XASFLOW_SCHEDULER"


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
