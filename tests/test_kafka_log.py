"""librdkafka's log during a broker outage (:class:`xasflow.adapters.kafka_log.OutageLog`),
on a clock driven by hand: the first error line as it is, one summary per interval with the
count held back, one line once the errors stop; lines under WARNING unchanged."""

from __future__ import annotations

import logging

import pytest

from xasflow.adapters.kafka_log import OutageLog

FMT = "%s [%s] %s"  # how confluent-kafka hands librdkafka's lines to its logger


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_outage_logs_its_first_error_a_summary_per_interval_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    target = logging.getLogger("test_kafka_log.rdkafka")
    log = OutageLog(target, summary_s=60.0, quiet_s=10.0, clock=clock)
    caplog.set_level(logging.DEBUG, logger=target.name)
    log.log(logging.INFO, FMT, "FAIL", "rdkafka#consumer-1", "Disconnected")
    for i in range(20 * 150):  # 150 s of refused reconnections, 20 a second
        clock.t = 1000.0 + i / 20
        log.log(logging.ERROR, FMT, "FAIL", "rdkafka#consumer-1", f"Connect {i} failed")
        log.tick()
    clock.t += 9.0
    log.tick()  # quiet for 9 s: not over yet
    clock.t += 2.0
    log.tick()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0] == (logging.INFO, "FAIL [rdkafka#consumer-1] Disconnected")
    assert lines[1] == (logging.ERROR, "FAIL [rdkafka#consumer-1] Connect 0 failed")
    assert [m.split(" (")[0] for _, m in lines[2:4]] == [
        "1200 more librdkafka errors in the last 60 s",  # each summary at the first past 60 s
        "1200 more librdkafka errors in the last 60 s",
    ]
    assert lines[2][1].endswith("; the latest: FAIL [rdkafka#consumer-1] Connect 1200 failed")
    assert "(1201 since the outage began 60 s ago)" in lines[2][1]
    assert "(2401 since the outage began 120 s ago)" in lines[3][1]
    assert lines[4] == (
        logging.WARNING,
        "librdkafka errors stopped: 3000 in 150 s (599 since the last line), none for 11 s",
    )
    assert len(lines) == 5
    # the next outage starts over: its first error as it is
    clock.t += 100.0
    log.log(logging.ERROR, FMT, "FAIL", "rdkafka#consumer-1", "Connect again failed")
    assert caplog.records[-1].getMessage() == "FAIL [rdkafka#consumer-1] Connect again failed"
    assert len(caplog.records) == 6
    clock.t += 11.0
    log.tick()  # a lone error line: logged as it is, no line to say it stopped
    assert len(caplog.records) == 6
