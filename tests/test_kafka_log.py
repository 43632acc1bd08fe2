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


def test_the_daemons_tick_logs_a_producers_outage_and_its_end_with_no_documents(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """librdkafka hands its log over only when the producer is polled, which publishing does
    every 64 documents: the processing loop's stats tick (``build_processor``'s ``on_tick``, a
    few times a second) polls it too, so with nothing published an outage's first line and,
    once its errors stopped for ``quiet_s`` (the clock here), the line saying so still appear.
    Before: neither, however long the outage (scratch producer_quiet: 0 lines in 9 s, 6 error
    lines waiting in librdkafka's queue)."""
    import socket

    pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed")
    from helpers import wait_for
    from processor_helpers import processor_parts

    from xasflow.adapters.kafka_bus import KafkaDocumentPublisher, KafkaOutputSettings
    from xasflow.adapters.kafka_log import RDKAFKA_LOG
    from xasflow.daemon.config import DaemonConfig
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_processor

    caplog.set_level(logging.INFO, logger=RDKAFKA_LOG.name)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    with socket.socket() as broker:  # bound, not listening: connections are refused
        broker.bind(("127.0.0.1", 0))
        bootstrap = f"127.0.0.1:{broker.getsockname()[1]}"
        publisher = KafkaDocumentPublisher(KafkaOutputSettings(bootstrap_servers=bootstrap))
        clock = Clock()
        publisher._log.clock = clock
        parts = processor_parts()
        parts.publisher = publisher
        proc = build_processor(parts, DaemonConfig(), Counters(), [], lambda: None)  # type: ignore[arg-type]
        assert proc.on_tick is not None
        tick = proc.on_tick

        def outage() -> bool:  # the first line, and another error held back
            tick()
            return bool(lines()) and publisher._log._total >= 2

        wait_for(outage, "the producer's outage in the log", 30)
        assert len(lines()) == 1 and "Connection refused" in lines()[0], lines()
        broker.listen()  # the broker answers again
        clock.t += publisher._log.quiet_s + 1.0
        tick()
        assert any(m.startswith("librdkafka errors stopped: ") for m in lines()), lines()
        assert publisher.stats()["sent"] == 0
        publisher.close()
