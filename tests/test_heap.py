"""The heap kept between batches (``xasflow.spectra.heap``): no fresh pages for each page."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from xasflow.spectra.heap import retain_heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

#: a fresh process (a test run's heap is whatever the tests before left) prepares a 64-row
#: page of 1,000-point Cu K edges in a thread, as the daemon's processing thread does, and
#: prints the page faults of each page after the first three
_CHILD = textwrap.dedent(
    """
    import resource, threading
    import numpy as np
    from xasflow.spectra import PrepParams, Prepared
    from xasflow.spectra.batch import prepare_batch

    rng = np.random.default_rng(3)
    energy = np.linspace(8800.0, 9400.0, 1000)
    rel = energy[None, :] - (8979.0 + rng.uniform(-4, 4, (64, 1)))
    mu = 0.8 + 1e-4 * (energy - 8800) + np.arctan(rel / 0.8) / np.pi
    mu += 0.003 * rng.normal(size=mu.shape)
    shifts = rng.uniform(-2, 2, 64)

    def pages():
        for _ in range(3):
            out = prepare_batch(energy, mu, PrepParams(), "Cu", "K", shifts=shifts)
        assert all(isinstance(r, Prepared) for r in out)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            prepare_batch(energy, mu, PrepParams(), "Cu", "K", shifts=shifts)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)

    thread = threading.Thread(target=pages)
    thread.start()
    thread.join()
    """
)


@glibc
def test_a_page_prepared_again_takes_few_fresh_pages_of_memory() -> None:
    # no malloc setting of the environment's own, which retain_heap would leave to stand
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and not (k == "GLIBC_TUNABLES" and "malloc" in v)
    }
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    # glibc's defaults hand the freed heap back after each page: 600-1,300 faults a page
    assert float(run.stdout.strip()) < 100


@glibc
def test_the_environments_own_malloc_settings_stand(monkeypatch: pytest.MonkeyPatch) -> None:
    retain_heap.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert retain_heap() is False
    retain_heap.cache_clear()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert retain_heap() is True
