"""The daemon configuration's Kafka sections: ``input.kafka`` and ``output.kafka``.

Part of :mod:`xasflow.daemon.config_sections`, which re-exports them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from xasflow.daemon.config_base import Section as _Section

__all__ = ["KafkaInputConfig", "KafkaOutputConfig"]

_LibrdkafkaValue = str | int | float | bool


def _bootstrap(value: str) -> str:
    value = value.strip()
    if not value or "://" in value:
        raise ValueError("give host:port[,host:port...] (no scheme)")
    return value


class KafkaInputConfig(_Section):
    """Kafka input (``input.kind: kafka``): one member of consumer group ``group_id``.

    ``topics``: names, or regexes starting with ``^`` (NSLS-II's
    ``<beamline>.bluesky.runengine.documents``). Offsets are committed (never
    automatically) only once the results they cover are durable: see
    :mod:`xasflow.adapters.kafka_input`. A killed member's partitions move after
    ``session_timeout_ms``. ``consumer``: further librdkafka settings.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    topics: tuple[str, ...] = ("^.*\\.bluesky\\.runengine\\.documents$",)
    group_id: str = Field("xasflow", min_length=1)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(6000, ge=1000, le=300_000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    commit_interval_s: float = Field(0.5, gt=0, description="s between offset commits")
    flush_timeout_s: float = Field(10.0, gt=0, description="longest wait for durable results")
    consumer: dict[str, _LibrdkafkaValue] = Field(default_factory=dict)

    _check_bootstrap = field_validator("bootstrap_servers")(_bootstrap)

    @field_validator("topics", mode="before")
    @classmethod
    def _one_topic(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("topics")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(t.strip() for t in value):
            raise ValueError("give at least one topic name or ^regex")
        for topic in value:
            if topic.startswith("^"):
                try:
                    re.compile(topic)
                except re.error as exc:
                    raise ValueError(f"topic pattern {topic!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _heartbeat(self) -> KafkaInputConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self

    def to_settings(self, queue_size: int) -> Any:
        """The adapter's :class:`~xasflow.adapters.kafka_bus.KafkaInputSettings`."""
        from xasflow.adapters.kafka_bus import KafkaInputSettings

        return KafkaInputSettings(
            bootstrap_servers=self.bootstrap_servers,
            topics=self.topics,
            group_id=self.group_id,
            auto_offset_reset=self.auto_offset_reset,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            queue_size=queue_size,
            commit_interval_s=self.commit_interval_s,
            flush_timeout_s=self.flush_timeout_s,
            consumer=dict(self.consumer),
        )


class KafkaOutputConfig(_Section):
    """Kafka output (``output.kind: kafka``): analysis documents on ``topic``, keyed by
    the raw run's start uid; ``bootstrap_servers`` None: the input's."""

    bootstrap_servers: str | None = None
    topic: str = Field("xasflow.analysis.documents", min_length=1)
    producer: dict[str, _LibrdkafkaValue] = Field(default_factory=dict)

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str | None) -> str | None:
        return None if value is None else _bootstrap(value)

    def to_settings(self, default_servers: str) -> Any:
        """The adapter's :class:`~xasflow.adapters.kafka_bus.KafkaOutputSettings`."""
        from xasflow.adapters.kafka_bus import KafkaOutputSettings

        return KafkaOutputSettings(
            bootstrap_servers=self.bootstrap_servers or default_servers,
            topic=self.topic,
            producer=dict(self.producer),
        )
