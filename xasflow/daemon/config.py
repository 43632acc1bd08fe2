"""Daemon configuration: typed models loaded from one YAML file plus environment overrides.

One file holds every section (all optional; defaults are the beamline-typical values)::

    input:    {address: tcp://127.0.0.1:5578, prefix: "", hwm: 100000, queue_size: 10000,
               overflow: block, formats: [pickle, msgpack]}
    channels: {energy: [...], i0: [...], it: [...], ir: [...], if: [...], mode: auto,
               stream: primary}
    analysis: {element: null, edge: null, prefer: start, align: true, run_timeout_s: 60,
               herfd: false, batching: {max_batch_delay_ms: 10, min_expected: 2,
               target_docs: 16, max_spectra: 64}}
    models:   {directory: <repo>/models, watch: true, watch_interval_s: 2,
               require_digest: true, require_signature: false, trusted_keys: []}
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

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from xasflow.adapters.queueserver import QueueServerConfig
from xasflow.daemon.config_base import Section as _Section
from xasflow.daemon.config_sections import (
    AnalysisConfig,
    ChannelsConfig,
    EpicsConfig,
    HttpConfig,
    InputConfig,
    ModelsConfig,
    OutputConfig,
    RecommendConfig,
    StorageConfig,
    is_loopback,
)

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
#: How long a full store holds a Kafka-fed daemon back before refusing a result (s).
KAFKA_FULL_WAIT_S = 60.0


class ConfigError(ValueError):
    """The configuration file or an environment override is unusable; the message says where."""


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

    def store_full_wait(self) -> float:
        """``storage.full_wait_s``, or its default for the input: 60 s with Kafka (its consumer
        stops polling meanwhile and Kafka keeps the documents), 0 with 0MQ (a publisher cannot
        be held back: waiting would only move the loss to the input queue and delay every run)."""
        if self.storage.full_wait_s is not None:
            return self.storage.full_wait_s
        return KAFKA_FULL_WAIT_S if self.input.kind == "kafka" else 0.0

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


def _scalar(text: str, name: str) -> Any:
    """An environment value as YAML (numbers, booleans, null, lists, and a mapping written in
    braces: ``{security.protocol: SSL}`` for the librdkafka settings), else the raw string
    (``a: b`` without braces stays text)."""
    braced = text.lstrip().startswith("{")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if braced:
            raise ConfigError(
                f"environment variable {name}: not a YAML mapping: {_problem(exc)}"
            ) from None
        return text
    return text if isinstance(value, dict) and not braced else value


def _problem(exc: yaml.YAMLError) -> str:
    """PyYAML's one-line description of a syntax error (its ``str`` spans several lines)."""
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


#: Keys whose environment values are taken as text, never as YAML (``0`` stays a prefix "0").
_TEXT_KEYS = frozenset(
    {
        "prefix",
        "address",
        "bootstrap_servers",
        "topic",
        "group_id",
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
    """``{section: {key: value}}`` from ``XASFLOW__SECTION__KEY`` variables (lower-cased names);
    ``XASFLOW__SECTION__SUB__KEY`` reaches one level down (``XASFLOW__INPUT__KAFKA__GROUP_ID``).

    Prefixes, addresses, hosts, paths, topics, element and edge are kept as text (element/edge
    ``null`` or empty means unset).
    """
    environ = os.environ if environ is None else environ
    out: dict[str, dict[str, Any]] = {}
    for name, text in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            if name.upper().startswith(ENV_PREFIX[:-1]) and "__" in name:  # XASFLOW_HTTP__PORT
                raise ConfigError(
                    f"environment variable {name}: a setting is {ENV_PREFIX}SECTION__KEY, two "
                    f"underscores after XASFLOW ({ENV_PREFIX}{name[len(ENV_PREFIX) - 1 :]}); "
                    "as written it would be ignored"
                )
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}SECTION__KEY or "
                f"{ENV_PREFIX}SECTION__SUB__KEY (e.g. {ENV_PREFIX}INPUT__ADDRESS)"
            )
        key = parts[-1]
        if key in _TEXT_KEYS:
            value: Any = (
                None if key in ("element", "edge") and text.strip().lower() in _NULLS else text
            )
        else:
            value = _scalar(text, name)
        target = out.setdefault(parts[0], {})
        if len(parts) == 3:
            target = target.setdefault(parts[1], {})
            if not isinstance(target, dict):
                raise ConfigError(f"environment variable {name}: {parts[1]} is set as a value")
        target[key] = value
    return out


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Make relative ``models.directory`` / ``storage.directory`` / ``models.trusted_keys``
    from a file absolute."""

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or not value:
            return value
        path = Path(value).expanduser()
        return os.path.normpath(path if path.is_absolute() else base / path)

    for section in ("models", "storage"):
        body = data.get(section)
        if isinstance(body, dict) and "directory" in body:
            body["directory"] = absolute(body["directory"])
    models = data.get("models")
    if isinstance(models, dict) and "trusted_keys" in models:
        keys = models["trusted_keys"]
        models["trusted_keys"] = (
            [absolute(k) for k in keys] if isinstance(keys, list) else absolute(keys)
        )


def _suggestion(loc: tuple[Any, ...]) -> str:
    """' (did you mean 'port'?)' for an unknown key at ``loc`` close to a setting of its
    section ("http.prot"), else ''; sections are walked as the schema nests them."""
    cls: type[BaseModel] = DaemonConfig
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        inner = field.annotation if field is not None else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return ""  # a dict, a union, a list: no fixed set of keys to suggest from
        cls = inner
    names = [f.alias or name for name, f in cls.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _validate(data: Any, origin: str) -> DaemonConfig:
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting" + _suggestion(tuple(err["loc"]))
            value = err.get("input")
            shown = (
                ""
                if err["type"] in ("extra_forbidden", "missing") or isinstance(value, dict)
                else f" (got {value!r})"
            )
            lines.append(f"  {loc}: {msg}{shown}")
        raise ConfigError(f"invalid configuration from {origin}:\n" + "\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently (YAML itself forbids it), so a second ``http:`` section dropped the first."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # <<: *anchor: the keys after it override the merged ones, as meant
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool):
            continue  # an unhashable key: construct_mapping refuses it in its own words
        if key in first:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{key!r} is given twice in one mapping (first on line {first[key] + 1}): "
                "only the last would count, so keep one",
                key_node.start_mark,
            )
        first[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> str:
    """What the configuration file's bytes are, where they are not UTF-8."""
    if b"\0" in raw:
        return (
            "not UTF-8 text (it holds NUL bytes: UTF-16, as Windows saves 'Unicode', "
            "or a binary file)"
        )
    line = raw.count(b"\n", 0, exc.start) + 1
    return f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}: Latin-1?)"


def yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the file, line and column, and what went wrong
    (PyYAML's own text spans several lines and names ``<unicode string>``)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = _problem(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    opened = f" ({context} from line {start.line + 1})" if context and start is not None else ""
    return f"{where}: not valid YAML: {problem}{opened}"


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
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:  # a traceback before: UTF-16, Latin-1, a binary
            raise ConfigError(f"{path}: {_not_utf8(raw, exc)}: save it as UTF-8") from None
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error(path, exc)) from None
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
        env = os.environ if environ is None else environ
        origin += " + environment " + ", ".join(
            sorted(n for n in env if n.upper().startswith(ENV_PREFIX))
        )
        for section in overrides:
            if section in data and not isinstance(data[section], dict):
                raise ConfigError(f"{origin}: section {section!r} is not a mapping")
        _merge(data, overrides)
    return _validate(data, origin)
