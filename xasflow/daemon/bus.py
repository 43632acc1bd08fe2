"""The daemon's document bus, built from its config: 0MQ or Kafka input and output.

:func:`make_source` gives the input (``input.kind``): a
:class:`~xasflow.adapters.zmq_bus.ZmqDocumentSource`, or a
:class:`~xasflow.adapters.kafka_input.KafkaDocumentSource` that commits offsets only after
``durable(timeout)``; :func:`make_publisher` the output (``output.kind``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from xasflow.adapters.zmq_bus import ZmqDocumentPublisher, ZmqDocumentSource, ZmqInputConfig
from xasflow.daemon.config import DaemonConfig

__all__ = ["make_publisher", "make_source", "output_address", "zmq_input_config"]


def zmq_input_config(cfg: DaemonConfig) -> ZmqInputConfig:
    """The 0MQ input settings; ignores the daemon's own output prefix when it would see it."""
    zcfg = cfg.input.to_zmq()
    own = cfg.output.prefix.encode("ascii") if cfg.output.enabled else b""
    if cfg.output.kind == "zmq" and own and own != zcfg.prefix and not zcfg.prefix:
        zcfg = dataclasses.replace(zcfg, ignore_prefixes=(*zcfg.ignore_prefixes, own))
    return zcfg


def make_source(
    cfg: DaemonConfig,
    durable: Callable[[float], bool],
    hold: Callable[[], str | None] | None = None,
) -> Any:
    """The input ``cfg.input.kind`` names (not started); a Kafka input commits only what
    ``durable`` made durable, and nothing once ``hold`` gives a reason."""
    if cfg.input.kind == "kafka":
        from xasflow.adapters.kafka_input import KafkaDocumentSource

        out = cfg.output.kafka.topic
        for topic in cfg.input.kafka.topics if cfg.output.kind == "kafka" else ():
            if topic == out or (topic.startswith("^") and re.search(topic, out)):
                raise ValueError(
                    f"input.kafka.topics entry {topic!r} matches output.kafka.topic {out!r}: "
                    "the daemon would analyse its own analysis documents"
                )

        settings = cfg.input.kafka.to_settings(cfg.input.queue_size)
        return KafkaDocumentSource(settings, durable=durable, hold=hold)
    return ZmqDocumentSource(zmq_input_config(cfg))


def make_publisher(cfg: DaemonConfig) -> Any:
    """The output ``cfg.output.kind`` names, or None when the output is off."""
    out = cfg.output
    if not out.enabled:
        return None
    if out.kind == "kafka":
        from xasflow.adapters.kafka_bus import KafkaDocumentPublisher

        return KafkaDocumentPublisher(out.kafka.to_settings(cfg.input.kafka.bootstrap_servers))
    return ZmqDocumentPublisher(out.address, prefix=out.prefix.encode("ascii"), fmt=out.format)


def output_address(cfg: DaemonConfig, publisher: Any) -> str | None:
    """Where analysis documents go: a 0MQ address or ``kafka://servers/topic``."""
    if publisher is None:
        return None
    if cfg.output.kind == "kafka":
        return f"kafka://{publisher.settings.bootstrap_servers}/{cfg.output.kafka.topic}"
    return cfg.output.address
