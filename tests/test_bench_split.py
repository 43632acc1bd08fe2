"""The Kafka bench's phase selection and its per-process CPU split (bench/kafka.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "bench")]

import kafka as kbench  # noqa: E402  (bench/kafka.py)
import stream as zs  # noqa: E402  (bench/stream.py)


def test_phases_run_in_their_order_and_refuse_unknown_names() -> None:
    assert kbench.phases("zmq,kafka") == ("kafka", "zmq")
    assert kbench.phases(" transport ") == ("transport",)
    with pytest.raises(argparse.ArgumentTypeError):
        kbench.phases("kafka,ladder")
    with pytest.raises(argparse.ArgumentTypeError):
        kbench.phases(",")


def test_the_cpu_split_gives_ms_per_spectrum_per_process_and_cores() -> None:
    split = zs.cpu_split(
        {"daemon": 1.0, "bus": 2.0, "gone": 0.5}, {"daemon": 3.0, "bus": 3.0}, 1000, 4.0, cpus=2
    )
    # 3 ms of CPU per spectrum in all: 2 cores are full at 667 spectra/s
    assert split == {"daemon": 2.0, "bus": 1.0, "cores": 0.75, "cpu_bound_rate_hz": 667}
    assert zs.cpu_split({"daemon": 1.0}, {"daemon": 1.0}, 0, 4.0)["cpu_bound_rate_hz"] is None


def test_cpu_of_reads_live_processes_and_leaves_out_gone_ones() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cpu = zs.cpu_of({"me": os.getpid(), "gone": gone.pid})
    assert set(cpu) == {"me"} and cpu["me"] > 0


def test_a_daemons_children_are_found_and_their_cpu_summed() -> None:
    """The daemon's catalog server and preparation process are its children: their CPU
    counts beside its own (it was left out of every level's split before)."""
    kids = [
        subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE) for _ in "ab"
    ]
    try:
        found = zs.child_pids(os.getpid())
        assert {k.pid for k in kids} <= set(found)
        cpu = zs.cpu_of({"kids": [k.pid for k in kids]})
        assert cpu["kids"] == pytest.approx(sum(zs.cpu_seconds(k.pid) for k in kids), abs=0.02)
    finally:
        for k in kids:
            k.communicate(b"\n")
