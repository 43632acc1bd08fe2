"""The local dask cluster of the offline jobs: a finished job ends quietly.

The job runs in a subprocess (its worker processes write to its stderr), on a LocalCluster
of 2 worker processes as ``xasflow train`` labels on one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("distributed")

from xasflow import paths
from xasflow.training.cluster import dask_client

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"

# A scheduler slow to answer heartbeats (a loaded one: 2 shared cores, 1-2 s answers were
# seen at the end of a label build) holds each worker's heartbeat in flight when the job
# ends: the script waits until both workers have one pending, then leaves the cluster.
# During the job a worker logs the heartbeat error itself: errors then must stay visible.
JOB = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    from xasflow.training.cluster import dask_client

    def square(x):
        return x * x

    def log_heartbeat_error():
        logging.getLogger("distributed.worker").error(
            "Failed to communicate with scheduler during heartbeat."
        )

    with dask_client(workers=2) as client:
        assert client.gather(client.map(square, range(8))) == [x * x for x in range(8)]
        first = sorted(client.scheduler_info()["workers"])[0]
        client.run(log_heartbeat_error, workers=[first])  # during the job: to be seen
        scheduler = client.cluster.scheduler
        answer, pending = scheduler.handlers["heartbeat_worker"], set()

        async def late(*args, address=None, **kwargs):
            pending.add(address)
            await asyncio.sleep(3.0)
            return answer(*args, address=address, **kwargs)

        def slow_down():
            scheduler.handlers["heartbeat_worker"] = late

        scheduler.loop.add_callback(slow_down)
        deadline = time.monotonic() + 30
        while len(pending) < 2:  # both workers wait for an answer
            assert time.monotonic() < deadline, pending
            time.sleep(0.01)
    print("job done", file=sys.stderr)
    """
)


@pytest.mark.slow
def test_a_finished_job_ends_without_heartbeat_tracebacks() -> None:
    """Before: a worker closing while its heartbeat was in flight closed the connection under
    it and logged "Failed to communicate with scheduler during heartbeat" with two
    tracebacks (seen at the end of ``xasflow train``'s label build). Now the workers stop
    their heartbeats, and wait for the one in flight, before the cluster closes them."""
    env = {**os.environ, "PYTHONPATH": str(paths.REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", JOB], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job done" in proc.stderr
    # the one logged during the job, and no other: none from the shutdown
    assert proc.stderr.count(HEARTBEAT_FAILED) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "heartbeat from unregistered worker" not in proc.stderr, proc.stderr[-3000:]


def test_in_process_workers_leave_this_process_logging_as_it_was() -> None:
    """Worker threads share this process's loggers: the end of their job stops their
    heartbeats but filters nothing here, where later jobs would lose their errors."""
    worker_log = logging.getLogger("distributed.worker")
    before = list(worker_log.filters)
    with dask_client(workers=2, processes=False) as client:
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert worker_log.filters == before
