"""Daemon configuration: typed models loaded from one YAML file plus environment overrides.

One file holds every section (all optional; defaults are the beamline-typical values)::

    input:    {address: tcp://127.0.0.1:5578, prefix: "", hwm: 100000, queue_size: 10000,
               overflow: block, formats: [pickle, msgpack]}
    channels: {energy: [...], i0: [...], it: [...], ir: [...], if: [...], mode: auto,
               stream: primary}
    analysis: {element: null, edge: null, prefer: start, align: true, run_timeout_s: 60}
    models:   {directory: <repo>/models, watch: true, watch_interval_s: 2}
    storage:  {enabled: true, directory: xasflow-store, backend: sqlite, batch_size: 256,
               flush_interval_s: 0.2}
    output:   {enabled: true, address: tcp://127.0.0.1:5577, prefix: xasflow-analysis,
               format: pickle}
    http:     {enabled: true, host: 127.0.0.1, port: 8620, token: null, dashboard: true,
               dashboard_rate_hz: 5}
    recommend: {enabled: true, interval_s: 0.1, recommender: {<RecommenderConfig knobs>}}
    epics:    {enabled: false, prefix: "XAS:", host: 127.0.0.1, port: 5064}
    queueserver: {enabled: false, transport: zmq, zmq_public_key: null, ...}

Environment variables ``XASFLOW__SECTION__KEY=value`` override the file (section and key
case-insensitive; the value is read as a YAML scalar or list, so ``8000``, ``null`` and
``[a, b]`` work). Relative paths in the file are relative to the file's directory; relative
paths from the environment or from defaults are relative to the working directory. Every
problem is reported at once as a :class:`ConfigError` naming the offending key.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from xasflow import paths
from xasflow.adapters.queueserver import QueueServerConfig
from xasflow.daemon.channels import CHANNEL_DEFAULTS, ChannelMap
from xasflow.daemon.recommend import RecommenderConfig

__all__ = [
    "ENV_PREFIX",
    "AnalysisConfig",
    "ChannelsConfig",
    "ConfigError",
    "DaemonConfig",
    "EpicsConfig",
    "HttpConfig",
    "InputConfig",
    "ModelsConfig",
    "OutputConfig",
    "RecommendConfig",
    "StorageConfig",
    "env_overrides",
    "is_loopback",
    "load_config",
]

#: Prefix of environment overrides: ``XASFLOW__INPUT__ADDRESS=tcp://host:5578``.
ENV_PREFIX = "XASFLOW__"


class ConfigError(ValueError):
    """The configuration file or an environment override is unusable; the message says where."""


class _Section(BaseModel):
    """Common settings: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def _address(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("address must not be empty")
    return value if "://" in value else f"tcp://{value}"


def _prefix(value: str) -> str:
    if " " in value:
        raise ValueError("prefix must not contain spaces (bluesky frames are space-separated)")
    try:
        value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("prefix must be ASCII") from None
    return value


class InputConfig(_Section):
    """The 0MQ SUB input: the ``bluesky-0MQ-proxy`` *out* port (bluesky's default 5578)."""

    address: str = "tcp://127.0.0.1:5578"
    prefix: str = Field("", description="only documents published with this prefix; '' = all")
    hwm: int = Field(100_000, ge=0, description="0MQ receive high-water mark (messages)")
    queue_size: int = Field(10_000, ge=1, description="decoded documents waiting for analysis")
    overflow: Literal["block", "drop_newest", "drop_oldest"] = "block"
    formats: tuple[Literal["pickle", "msgpack"], ...] = ("pickle", "msgpack")
    max_message_bytes: int = Field(-1, ge=-1, description="ZMQ_MAXMSGSIZE; -1 = no limit")

    _check_address = field_validator("address")(_address)
    _check_prefix = field_validator("prefix")(_prefix)

    @field_validator("formats")
    @classmethod
    def _nonempty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one body format must be accepted")
        return tuple(dict.fromkeys(value))

    def to_zmq(self) -> Any:
        """The adapter's :class:`~xasflow.adapters.zmq_bus.ZmqInputConfig`."""
        from xasflow.adapters.zmq_bus import ZmqInputConfig

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
    """

    element: str | None = None
    edge: str | None = None
    prefer: Literal["start", "config"] = "start"
    align: bool = Field(True, description="align each spectrum on its reference-foil channel")
    run_timeout_s: float = Field(60.0, gt=0, description="close a run idle this long")
    timeout_check_s: float = Field(1.0, gt=0, description="how often idle runs are looked for")
    batch_max: int = Field(512, ge=1, description="documents handled per processing batch")

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
    """The model directory (one verified bundle per subdirectory), watched for new bundles."""

    directory: Path = Field(default_factory=lambda: paths.REPO_ROOT / "models")
    watch: bool = True
    watch_interval_s: float = Field(2.0, gt=0)


class StorageConfig(_Section):
    """The embedded tiled catalog the analysis runs are written to (no server needed)."""

    enabled: bool = True
    directory: Path = Path("xasflow-store")
    backend: Literal["sqlite", "duckdb"] = "sqlite"
    batch_size: int = Field(256, ge=1)
    flush_interval_s: float = Field(0.2, gt=0)
    max_queue: int = Field(100_000, ge=1)


class OutputConfig(_Section):
    """The 0MQ publisher of analysis runs: the proxy's *in* port (bluesky's default 5577).

    ``after_store``: publish a result only once the store has committed it (nothing on the bus
    that the store does not hold; results then wait for the store's next commit, up to
    ``storage.flush_interval_s``). ``after_store_timeout_s``: publish anyway after that long.
    """

    enabled: bool = True
    address: str = "tcp://127.0.0.1:5577"
    prefix: str = "xasflow-analysis"
    format: Literal["pickle", "msgpack"] = "pickle"
    after_store: bool = False
    after_store_timeout_s: float = Field(5.0, gt=0)

    _check_address = field_validator("address")(_address)
    _check_prefix = field_validator("prefix")(_prefix)


class HttpConfig(_Section):
    """The HTTP server: ``/metrics``, ``/health`` and the read-only dashboard (``/``).

    ``token`` (optional on loopback, required when ``host`` is not a loopback address) must
    then accompany every request, as ``?token=`` or ``Authorization: Bearer``.
    ``dashboard_rate_hz`` caps the dashboard's pushed updates per second.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8620, ge=0, le=65535, description="0 picks a free port")
    token: SecretStr | None = Field(None, description="access token; required off loopback")
    dashboard: bool = True
    dashboard_rate_hz: float = Field(5.0, gt=0, le=20, description="dashboard updates per s")

    @field_validator("token", mode="before")
    @classmethod
    def _token_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # a numeric token written unquoted in YAML
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        if self.enabled and self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set http.token "
                "(XASFLOW__HTTP__TOKEN) so the dashboard and metrics are not open to the network"
            )
        return self


class RecommendConfig(_Section):
    """Energy-region recommendations: each analysis run's ``recommendations`` stream.

    ``interval_s`` caps them at one per run per interval (the first spectrum of a run always
    gets one): fly scans bring hundreds of spectra a second, the control system needs a few.
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

    _check_prefix = field_validator("prefix")(_prefix)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DaemonConfig(_Section):
    """Everything ``xasflow serve`` needs; see the module docstring for the file layout."""

    input: InputConfig = Field(default_factory=InputConfig)
    channels: ChannelsConfig = Field(default_factory=ChannelsConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    recommend: RecommendConfig = Field(default_factory=RecommendConfig)
    epics: EpicsConfig = Field(default_factory=EpicsConfig)
    queueserver: QueueServerConfig = Field(default_factory=QueueServerConfig)

    @model_validator(mode="after")
    def _no_feedback_loop(self) -> DaemonConfig:
        if self.output.enabled and self.input.prefix and self.input.prefix == self.output.prefix:
            raise ValueError(
                f"input.prefix and output.prefix are both {self.input.prefix!r}: the daemon "
                "would analyse its own results"
            )
        return self

    def with_updates(self, updates: Mapping[str, Mapping[str, Any]]) -> DaemonConfig:
        """A validated copy with ``{section: {key: value}}`` applied (for programs and tests)."""
        data = self.model_dump(by_alias=True)
        _merge(data, {k: dict(v) for k, v in updates.items()})
        return _validate(data, "updates")


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _scalar(text: str) -> Any:
    """An environment value as YAML (numbers, booleans, null, lists), else the raw string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) else value


#: Keys whose environment values are taken as text, never as YAML (``0`` stays a prefix "0").
_TEXT_KEYS = frozenset(
    {
        "prefix",
        "address",
        "host",
        "element",
        "edge",
        "stream",
        "directory",
        "token",
        "api_key",
        "zmq_public_key",
        "zmq_control_addr",
        "zmq_info_addr",
        "http_server_uri",
        "user",
        "user_group",
        "plan_name",
        "motor",
    }
)
_NULLS = frozenset({"", "null", "none", "~"})


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` from ``XASFLOW__SECTION__KEY`` variables (lower-cased names).

    Prefixes, addresses, hosts, paths, element and edge are kept as text (element/edge
    ``null`` or empty means unset).
    """
    environ = os.environ if environ is None else environ
    out: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}SECTION__KEY "
                f"(e.g. {ENV_PREFIX}INPUT__ADDRESS)"
            )
        section, key = parts
        if key in _TEXT_KEYS:
            value: Any = (
                None if key in ("element", "edge") and text.strip().lower() in _NULLS else text
            )
        else:
            value = _scalar(text)
        out.setdefault(section, {})[key] = value
    return out


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative ``models.directory`` / ``storage.directory`` from a file absolute."""
    for section in ("models", "storage"):
        value = (
            data.get(section, {}).get("directory") if isinstance(data.get(section), dict) else None
        )
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            data[section]["directory"] = os.path.normpath(
                path if path.is_absolute() else base / path
            )


def _validate(data: Any, origin: str) -> DaemonConfig:
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting"
            value = err.get("input")
            shown = (
                ""
                if err["type"] in ("extra_forbidden", "missing") or isinstance(value, dict)
                else f" (got {value!r})"
            )
            lines.append(f"  {loc}: {msg}{shown}")
        raise ConfigError(f"invalid configuration from {origin}:\n" + "\n".join(lines)) from None


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> DaemonConfig:
    """Read ``path`` (YAML; None: defaults only), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path).expanduser()
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for section, body in loaded.items():
            if body is None:
                loaded[section] = {}
        data = loaded
        _resolve_paths(data, path.resolve().parent)
    overrides = env_overrides(environ)
    if overrides:
        origin += " + environment " + ", ".join(
            f"{ENV_PREFIX}{s.upper()}__{k.upper()}" for s, kv in overrides.items() for k in kv
        )
        for section in overrides:
            if section in data and not isinstance(data[section], dict):
                raise ConfigError(f"{origin}: section {section!r} is not a mapping")
        _merge(data, overrides)
    return _validate(data, origin)
