"""The daemon configuration's sections: one typed, strict model per YAML section.

:mod:`xasflow.daemon.config` assembles them into :class:`~xasflow.daemon.config.DaemonConfig`
and loads the file; see its docstring for the layout. Unknown keys are errors everywhere.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from xasflow import paths
from xasflow.daemon.batching import BatchPolicy
from xasflow.daemon.channels import CHANNEL_DEFAULTS, ChannelMap
from xasflow.daemon.config_base import (
    BOOL_WORDS,
    check_address,
    check_directory,
    check_prefix,
    is_loopback,
)
from xasflow.daemon.config_base import Section as _Section
from xasflow.daemon.config_kafka import KafkaInputConfig, KafkaOutputConfig
from xasflow.daemon.recommend import RecommenderConfig
from xasflow.spectra.herfd import check_fwhm

__all__ = [
    "AnalysisConfig",
    "ChannelsConfig",
    "EpicsConfig",
    "HttpConfig",
    "InputConfig",
    "KafkaInputConfig",
    "KafkaOutputConfig",
    "ModelsConfig",
    "OutputConfig",
    "RecommendConfig",
    "StorageConfig",
    "is_loopback",
]


class InputConfig(_Section):
    """The document input: 0MQ SUB on the ``bluesky-0MQ-proxy`` *out* port (bluesky's
    default 5578), or Kafka (``kind: kafka``, settings under ``kafka``)."""

    kind: Literal["zmq", "kafka"] = "zmq"
    kafka: KafkaInputConfig = Field(default_factory=KafkaInputConfig)

    address: str = "tcp://127.0.0.1:5578"
    prefix: str = Field("", description="only documents published with this prefix; '' = all")
    hwm: int = Field(100_000, ge=0, description="0MQ receive high-water mark (messages)")
    queue_size: int = Field(10_000, ge=1, description="decoded documents waiting for analysis")
    overflow: Literal["block", "drop_newest", "drop_oldest"] = "block"
    formats: tuple[Literal["pickle", "msgpack"], ...] = ("pickle", "msgpack")
    max_message_bytes: int = Field(-1, ge=-1, description="ZMQ_MAXMSGSIZE; -1 = no limit")

    _check_address = field_validator("address")(check_address)
    _check_prefix = field_validator("prefix")(check_prefix)

    @field_validator("formats")
    @classmethod
    def _nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one body format must be accepted")
        return tuple(dict.fromkeys(value))

    def to_zmq(self) -> Any:
        """The adapter's :class:`~xasflow.adapters.zmq_config.ZmqInputConfig`."""
        from xasflow.adapters.zmq_config import ZmqInputConfig

        return ZmqInputConfig(
            address=self.address,
            prefix=self.prefix.encode("ascii"),
            rcvhwm=self.hwm,
            queue_size=self.queue_size,
            overflow=self.overflow,
            formats=self.formats,
            max_message_bytes=self.max_message_bytes,
        )


class ChannelsConfig(_Section):
    """Data keys of energy and each detector channel (first present wins), and the mu mode."""

    model_config = ConfigDict(
        extra="forbid", validate_default=True, frozen=True, populate_by_name=True
    )

    energy: tuple[str, ...] = CHANNEL_DEFAULTS["energy"]
    i0: tuple[str, ...] = CHANNEL_DEFAULTS["i0"]
    it: tuple[str, ...] = CHANNEL_DEFAULTS["it"]
    ir: tuple[str, ...] = CHANNEL_DEFAULTS["ir"]
    if_: tuple[str, ...] = Field(CHANNEL_DEFAULTS["if"], alias="if")
    mode: Literal["auto", "transmission", "fluorescence"] = "auto"
    stream: str = "primary"

    @field_validator("energy", "i0", "it", "ir", "if_", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)  # a single key name is a one-element list
        return value

    @field_validator("energy", "i0", "it", "ir", "if_")
    @classmethod
    def _nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(v.strip() for v in value):
            raise ValueError("give at least one non-empty data key name")
        return value

    def to_channel_map(self) -> ChannelMap:
        """The assembler's :class:`~xasflow.daemon.channels.ChannelMap`."""
        return ChannelMap(
            energy=self.energy,
            i0=self.i0,
            it=self.it,
            ir=self.ir,
            if_=self.if_,
            mode=self.mode,
            stream=self.stream,
        )


class AnalysisConfig(_Section):
    """Where element and edge come from, alignment, and when an unfinished run is given up.

    ``prefer: start`` takes element/edge from the start document and falls back to
    ``element``/``edge`` here; ``prefer: config`` forces these values on every run. With
    neither, the pipeline infers them from the energy range (tabulated edge energies).
    ``herfd`` and ``calculated`` (FEFF replays; default false: measured scans, which need
    15 eV below E0 and 5 eV below the tabulated edge, else ``no_pre_edge``: one starting at its
    edge gave an E0 11 eV too high) say what the spectra are; a start document's own key wins (null or "" declares
    nothing; "true", "false" and numbers as text are read as such).
    ``batching``: how long the processing thread may wait for more documents under load
    (:class:`~xasflow.daemon.batching.BatchPolicy`). ``prep_process``: the heavy numbers of
    fly-scan batches in a child process (:mod:`xasflow.daemon.prep_worker`).
    """

    element: str | None = None
    edge: str | None = None
    prefer: Literal["start", "config"] = "start"
    align: bool = Field(True, description="align each spectrum on its reference-foil channel")
    run_timeout_s: float = Field(60.0, gt=0, description="close a run idle this long")
    timeout_check_s: float = Field(1.0, gt=0, description="how often idle runs are looked for")
    batch_max: int = Field(512, ge=1, description="documents handled per processing batch")
    batching: BatchPolicy = Field(
        default_factory=BatchPolicy, description="micro-batching under load (BatchPolicy)"
    )
    herfd: bool | float = Field(
        False, description="spectra are HERFD: true (tabulated width) or the FWHM in eV"
    )
    calculated: bool | None = Field(
        False, description="spectra are calculations (true), measured (false) or guessed (null)"
    )
    min_edge_snr: float | None = Field(
        None,
        ge=0,
        description="refuse (weak_edge) spectra whose edge step is under this many times "
        "their point noise; unset: each bundle's own limit (5 for the shipped one), 0: never",
    )
    switch_interval_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="the GIL switch interval under `xasflow serve` (Python's 5 ms let a busy "
        "thread hold a woken one back that long)",
    )
    prep_process: bool = Field(
        False,
        description="align, prepare and run the graphs of stacked spectra in a child process "
        "(xasflow.daemon.prep_worker), so the processing thread's GIL is free meanwhile",
    )

    @field_validator("herfd", mode="before")
    @classmethod
    def _herfd_word(cls, value: Any) -> Any:
        """A word neither a boolean nor a number was refused once per branch of the union,
        as ``analysis.herfd.bool`` and ``analysis.herfd.float``, settings that do not exist."""
        if isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            with contextlib.suppress(ValueError):
                float(word)
                return value
            if word in BOOL_WORDS:
                return value
        raise ValueError("give true, false or a broadening FWHM in eV")

    @field_validator("herfd")
    @classmethod
    def _herfd(cls, value: bool | float) -> bool | float:
        if not isinstance(value, bool):
            try:
                check_fwhm(value)
            except ValueError as exc:
                raise ValueError(f"give true, false or a broadening FWHM in eV: {exc}") from None
        return value

    @field_validator("element")
    @classmethod
    def _element(cls, value: str | None) -> str | None:
        if value is None:
            return None
        sym = value.strip().capitalize()
        if not (1 <= len(sym) <= 2 and sym.isalpha()):
            raise ValueError(f"{value!r} is not an element symbol")
        return sym

    @field_validator("edge")
    @classmethod
    def _edge(cls, value: str | None) -> str | None:
        if value is None:
            return None
        edge = value.strip().upper()
        if not (edge.isalnum() and 1 <= len(edge) <= 3):
            raise ValueError(f"{value!r} is not an edge name (K, L3, ...)")
        return edge

    @model_validator(mode="after")
    def _forced_needs_values(self) -> AnalysisConfig:
        if self.prefer == "config" and self.element is None:
            raise ValueError("prefer: config needs an element")
        return self


class ModelsConfig(_Section):
    """The model directory (one verified bundle per subdirectory), watched for new bundles.

    ``require_digest``: refuse bundles without a ``manifest.sha256``; ``trusted_keys``: Ed25519
    public keys (PEM files) whose ``manifest.sig`` is accepted; ``require_signature``: serve
    only bundles signed by one of them. ``max_graph_mb``: a bundle listing a larger file (or a
    ``.gz`` graph larger once decompressed) is refused ``too_large`` without being read, so
    a stray huge file cannot exhaust the daemon's memory (a manifest is limited to 4 MiB).
    """

    directory: Path = Field(default_factory=lambda: paths.REPO_ROOT / "models")
    watch: bool = True
    watch_interval_s: float = Field(2.0, gt=0)
    require_digest: bool = True
    require_signature: bool = False
    trusted_keys: tuple[Path, ...] = ()
    max_graph_mb: int = Field(256, ge=1, le=2047, description="largest graph file, MiB")

    _check_directory = field_validator("directory", mode="before")(check_directory)

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str | Path) else value  # one path alone

    @field_validator("trusted_keys")
    @classmethod
    def _keys_load(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        from xasflow.errors import os_problem  # "no such file", not the errno text
        from xasflow.models.integrity import load_public_key

        for path in value:
            try:
                load_public_key(path)
            except (OSError, ValueError) as exc:
                why = os_problem(exc)
                raise ValueError(f"{path}: not a readable Ed25519 public key ({why})") from None
        return value

    @model_validator(mode="after")
    def _signature_needs_keys(self) -> ModelsConfig:
        if self.require_signature and not self.trusted_keys:
            raise ValueError("require_signature: true needs at least one trusted_keys entry")
        return self


class StorageConfig(_Section):
    """The embedded tiled catalog the analysis runs are written to (no server needed).

    ``journal`` (default): a result counts as stored once it is in the store's write-ahead
    journal (``journal.sqlite`` beside the catalog, one short SQLite transaction), not once
    the catalog has it: creating a run's table (60-300 ms) then delays no result. The
    catalog catches up in the background; after a crash the journal is replayed into it.
    ``catalog_process`` (default): the catalog's tiled server runs in a child process
    (:mod:`xasflow.adapters.tiled_server`), so creating a run's table takes ~4 ms of the
    daemon's CPU instead of ~70 ms in one burst while spectra wait.
    ``max_queue`` results may wait for the catalog; beyond that the store waits up to
    ``full_wait_s`` (unset: :meth:`~xasflow.daemon.config.DaemonConfig.store_full_wait`) for
    room before it refuses (counts ``dropped``) a result.
    """

    enabled: bool = True
    journal: bool = True
    catalog_process: bool = True
    directory: Path = Path("xasflow-store")
    backend: Literal["sqlite", "duckdb"] = "sqlite"
    batch_size: int = Field(256, ge=1)
    flush_interval_s: float = Field(0.2, gt=0)
    max_queue: int = Field(100_000, ge=1)
    # at most 240 s: a Kafka consumer that does not poll for 300 s is dropped from its group
    full_wait_s: float | None = Field(None, ge=0, le=240.0, description="wait for room (s)")

    _check_directory = field_validator("directory", mode="before")(check_directory)


class OutputConfig(_Section):
    """The 0MQ publisher of analysis runs: the proxy's *in* port (bluesky's default 5577).

    ``after_store`` (default): publish a result only once the store has committed it (nothing
    on the bus that the store does not hold; the daemon asks the store to commit at once, so a
    result waits for one transaction, not ``storage.flush_interval_s``); off, results go out at
    once and a SIGKILL can leave published rows unstored. ``after_store_timeout_s``: publish
    anyway once a result has waited that long (counted; time the process stood still does
    not count).
    ``kind: kafka``: to ``kafka.topic`` instead (:class:`KafkaOutputConfig`).
    """

    enabled: bool = True
    address: str = "tcp://127.0.0.1:5577"
    prefix: str = "xasflow-analysis"
    format: Literal["pickle", "msgpack"] = "pickle"
    after_store: bool = True
    after_store_timeout_s: float = Field(5.0, gt=0)
    kind: Literal["zmq", "kafka"] = Field("zmq", description="kafka: to output.kafka.topic")
    kafka: KafkaOutputConfig = Field(default_factory=KafkaOutputConfig)

    _check_address = field_validator("address")(check_address)
    _check_prefix = field_validator("prefix")(check_prefix)


class HttpConfig(_Section):
    """The HTTP server: ``/metrics``, ``/health`` and the read-only dashboard (``/``).

    ``token`` (optional on loopback, required when ``host`` is not a loopback address) must
    then accompany every request, as ``?token=`` or ``Authorization: Bearer``.
    ``dashboard_rate_hz`` caps the dashboard's pushed updates per second;
    ``max_sse_clients`` the dashboard event streams open at once (more: 503, counted).
    A token shorter than ``token_min_length`` characters is refused.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8620, ge=0, le=65535, description="0 picks a free port")
    token: SecretStr | None = Field(None, description="access token; required off loopback")
    dashboard: bool = True
    dashboard_rate_hz: float = Field(5.0, gt=0, le=20, description="dashboard updates per s")
    max_sse_clients: int = Field(64, ge=1, description="dashboard event streams at once")
    token_min_length: int = Field(16, ge=8, description="shortest access token accepted")

    @field_validator("token", mode="before")
    @classmethod
    def _token_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # a numeric token written unquoted in YAML
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        if self.token is not None and len(self.token.get_secret_value()) < self.token_min_length:
            n = len(self.token.get_secret_value())
            raise ValueError(
                f"token has {n} characters; at least {self.token_min_length} are required "
                "(http.token_min_length), e.g. python -c 'import secrets; "
                "print(secrets.token_urlsafe(24))'"
            )
        if self.enabled and self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set http.token "
                "(XASFLOW__HTTP__TOKEN) so the dashboard and metrics are not open to the network"
            )
        return self


class RecommendConfig(_Section):
    """Energy-region recommendations: each analysis run's ``recommendations`` stream.

    ``interval_s`` caps them at one per run per interval (the first spectrum of a run always
    gets one), and flips in or out of the bundle's domain at one more per interval
    (:mod:`xasflow.daemon.advice`): fly scans bring hundreds of spectra a second, the
    control system needs a few.
    """

    enabled: bool = True
    interval_s: float = Field(0.1, ge=0, description="s between recommendations of a run")
    recommender: RecommenderConfig = Field(default_factory=RecommenderConfig)


class EpicsConfig(_Section):
    """The caproto IOC serving the latest answer as PVs (off unless enabled)."""

    enabled: bool = False
    prefix: str = Field("XAS:", min_length=1, description="PV name prefix")
    host: str = "127.0.0.1"
    port: int = Field(5064, ge=1, le=65535, description="Channel Access server port")

    @field_validator("prefix")
    @classmethod
    def _pv_prefix(cls, value: str) -> str:
        if not value.isascii() or any(c.isspace() for c in value):
            raise ValueError("a PV name prefix is ASCII without spaces (e.g. XAS: or BL7:XAS:)")
        return value
