"""The daemon's configuration: file, environment, errors naming the setting, serve --check."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import yaml

pytest.importorskip("sklearn")
pytest.importorskip("pymatgen.core")

from helpers import free_port

from xasflow.daemon.commands import add_commands
from xasflow.daemon.config import ConfigError, DaemonConfig, env_overrides, load_config
from xasflow.sim.commands import add_demo_command


def test_config_file_env_overrides_and_adapters(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "xasflow.yaml"
    path.parent.mkdir()
    path.write_text(
        "input:\n  address: 10.0.0.5:5578\n  prefix: raw\n  overflow: drop_oldest\n"
        "channels:\n  i0: ion0\n  it: [ion1, It]\n  if: [pips]\n  mode: transmission\n"
        "storage:\n  directory: results\n"
        "models:\n"  # an empty section is allowed
    )
    env = {
        "XASFLOW__INPUT__ADDRESS": "tcp://beamline:5578",
        "XASFLOW__HTTP__PORT": "9001",
        "XASFLOW__INPUT__FORMATS": "[msgpack]",
        "XASFLOW__ANALYSIS__ELEMENT": "cu",
        "XASFLOW__OUTPUT__PREFIX": "123",  # kept as text, never read as a number
        "XASFLOW_SHARED_DATA": "/elsewhere",  # single underscore: not ours
    }
    cfg = load_config(path, env)
    assert cfg.input.address == "tcp://beamline:5578"
    assert cfg.input.prefix == "raw" and cfg.input.overflow == "drop_oldest"
    assert cfg.input.formats == ("msgpack",)
    assert cfg.http.port == 9001 and cfg.http.host == "127.0.0.1"
    assert cfg.analysis.element == "Cu" and cfg.analysis.prefer == "start"
    assert cfg.output.prefix == "123"
    assert cfg.storage.directory == path.parent / "results"  # relative to the file
    assert cfg.models.directory.name == "models"
    zin = cfg.input.to_zmq()
    assert (zin.address, zin.prefix, zin.formats) == ("tcp://beamline:5578", b"raw", ("msgpack",))
    cmap = cfg.channels.to_channel_map()
    assert cmap.i0 == ("ion0",) and cmap.it == ("ion1", "It") and cmap.if_ == ("pips",)
    assert cmap.mode == "transmission" and cmap.energy[0] == "energy"
    defaults = load_config(None, {})
    assert defaults.input.address == "tcp://127.0.0.1:5578"
    assert defaults.output.address == "tcp://127.0.0.1:5577"
    assert defaults.storage.enabled and defaults.analysis.run_timeout_s == 60.0
    assert env_overrides({"XASFLOW__ANALYSIS__EDGE": "null"}) == {"analysis": {"edge": None}}
    kafka_env = {
        "XASFLOW__INPUT__KIND": "kafka",
        "XASFLOW__INPUT__KAFKA__BOOTSTRAP_SERVERS": "broker:9092",
        "XASFLOW__INPUT__KAFKA__GROUP_ID": "7",  # text, not the number 7
    }
    kafka = load_config(None, kafka_env)
    assert (kafka.input.kind, kafka.input.kafka.bootstrap_servers) == ("kafka", "broker:9092")
    assert kafka.input.kafka.group_id == "7" and kafka.input.kafka.session_timeout_ms == 6000
    with pytest.raises(ConfigError, match="SECTION__SUB__KEY"):
        env_overrides({"XASFLOW__INPUT__KAFKA__CONSUMER__X": "1"})
    # a mapping (librdkafka settings) is written in braces; without them it stays text
    kafka_env["XASFLOW__INPUT__KAFKA__CONSUMER"] = "{security.protocol: SSL, fetch.wait.max.ms: 5}"
    kafka = load_config(None, kafka_env)
    assert kafka.input.kafka.consumer == {"security.protocol": "SSL", "fetch.wait.max.ms": 5}
    assert env_overrides({"XASFLOW__INPUT__PLAN": "a: b"}) == {"input": {"plan": "a: b"}}
    with pytest.raises(ConfigError, match="XASFLOW__OUTPUT__KAFKA__PRODUCER: not a YAML mapping"):
        env_overrides({"XASFLOW__OUTPUT__KAFKA__PRODUCER": "{linger.ms: 5"})


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("http:\n  port: 9100\n".encode("utf-16"), "it holds NUL bytes: UTF-16"),
        (b"http:\n  port: 9100  # caf\xe9\n", "byte 0xe9 on line 2: Latin-1?"),
    ],
)
def test_a_configuration_file_not_in_utf8_is_said_to_be(
    tmp_path: Path, content: bytes, said: str
) -> None:
    """A configuration saved as UTF-16 (Windows' "Unicode") or Latin-1 stopped ``serve`` and
    ``--check`` with a UnicodeDecodeError traceback. Expected: a ConfigError saying what the
    file is; a UTF-8 file with a byte-order mark is read as before."""
    path = tmp_path / "site.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(path, {})
    assert str(exc.value).startswith(f"{path}: not UTF-8 text ({said}")
    assert str(exc.value).endswith(": save it as UTF-8")
    path.write_bytes(b"\xef\xbb\xbfhttp:\n  port: 9100\n")
    assert load_config(path, {}).http.port == 9100


@pytest.mark.parametrize("value", ["maybe", "[1, 2]", "{a: 1}"])
def test_a_herfd_value_neither_boolean_nor_number_names_the_setting(value: str) -> None:
    """``analysis.herfd: maybe`` was refused on two lines, "analysis.herfd.bool: Input should
    be a valid boolean" and "analysis.herfd.float: Input should be a valid number", naming
    settings that do not exist. Expected: one line for analysis.herfd saying what it takes."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"XASFLOW__ANALYSIS__HERFD": value})
    lines = str(exc.value).splitlines()[1:]
    assert len(lines) == 1
    assert lines[0].startswith(
        "  analysis.herfd: Value error, give true, false or a broadening FWHM in eV"
    )
    for word, taken in (("yes", True), ("off", False), ("1.5", 1.5), (" 2 ", 2.0)):
        assert load_config(None, {"XASFLOW__ANALYSIS__HERFD": word}).analysis.herfd == taken


@pytest.mark.parametrize("value", ["[9000]", "[8900, 9000, 9100]"])
def test_a_mono_range_of_one_or_three_energies_says_what_it_takes(value: str) -> None:
    """``recommend.recommender.mono_range: [9000]`` was refused as
    "recommend.recommender.mono_range.1: Field required" (three energies: "Tuple should
    have at most 2 items"). Expected: the setting, what it takes and how many were given."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"XASFLOW__RECOMMEND__RECOMMENDER__MONO_RANGE": value})
    n = value.count(",") + 1
    assert str(exc.value).splitlines()[1:] == [
        "  recommend.recommender.mono_range: Value error, mono_range is [low, high], two "
        f"energies in eV, not {n} (got {yaml.safe_load(value)!r})"
    ]


def test_an_empty_directory_setting_is_refused(tmp_path: Path) -> None:
    """``storage.directory: ""`` (or ``XASFLOW__STORAGE__DIRECTORY=`` left blank in an env
    file) was read as ".": the daemon wrote its catalog into whatever directory it was
    started from; an empty ``models.directory`` served that directory's bundles. Expected:
    a configuration error naming each setting."""
    path = tmp_path / "site.yaml"
    path.write_text('storage:\n  directory: ""\nmodels:\n  directory: ""\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, {})
    said = "Value error, an empty path would be the working directory: give one (or omit it)"
    assert f"storage.directory: {said}" in str(exc.value)
    assert f"models.directory: {said}" in str(exc.value)
    with pytest.raises(ConfigError, match=re.escape(f"storage.directory: {said}")):
        load_config(None, {"XASFLOW__STORAGE__DIRECTORY": ""})
    path.write_text("storage:\n  directory: store\n")
    assert load_config(path, {}).storage.directory == tmp_path / "store"


@pytest.mark.parametrize("prefix", ["X AS:", "XAS:\t", "XÄS:"])
def test_an_epics_prefix_with_a_space_says_why_in_epics_terms(prefix: str) -> None:
    """``epics.prefix: "X AS:"`` was refused "prefix must not contain spaces (bluesky frames
    are space-separated)", the bus prefixes' reason, which has nothing to do with PV names
    (and a tab passed). Expected: what a PV name prefix may hold."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"XASFLOW__EPICS__PREFIX": prefix})
    assert "epics.prefix: Value error, a PV name prefix is ASCII without spaces" in str(exc.value)
    assert "bluesky" not in str(exc.value)
    assert load_config(None, {"XASFLOW__EPICS__PREFIX": "BL7:XAS:"}).epics.prefix == "BL7:XAS:"


def test_a_key_given_twice_in_the_file_is_refused(tmp_path: Path) -> None:
    """A second ``http:`` section (added at the end of a long file) replaced the first whole,
    silently: its ``port: 9100`` was lost and the daemon served on 8620; a key twice in one
    section kept the last. Expected: the file, line and key, and the line of the first; a
    merge (``<<: *anchor``) followed by keys overriding it is taken as YAML means it."""
    path = tmp_path / "site.yaml"
    path.write_text("http:\n  port: 9100\ninput:\n  prefix: raw\nhttp:\n  host: 127.0.0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, {})
    assert str(exc.value) == (
        f"{path}:5:1: not valid YAML: 'http' is given twice in one mapping (first on line 1): "
        "only the last would count, so keep one"
    )
    path.write_text("output:\n  prefix: a\n  enabled: false\n  prefix: b\n")
    with pytest.raises(ConfigError, match=r"site.yaml:4:3: .*'prefix' is given twice"):
        load_config(path, {})
    path.write_text(
        "channels:\n  i0: &ion [ic0]\n  it: *ion\n"
        "recommend:\n  recommender: &knobs {dwell: 2.0, fine_step: 0.5}\n"
        "analysis:\n  batching: {<<: {max_spectra: 8, target_docs: 4}, max_spectra: 32}\n"
    )
    cfg = load_config(path, {})
    assert cfg.channels.it == ("ic0",) and cfg.recommend.recommender.dwell == 2.0
    assert (cfg.analysis.batching.max_spectra, cfg.analysis.batching.target_docs) == (32, 4)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OUTPUT", "localhost"),
        ("INPUT", "tcp://proxy"),
        ("INPUT", "tcp://127.0.0.1:99999"),
        ("OUTPUT", "tcp://127.0.0.1:notaport"),
        ("INPUT", "tcp://[::1]"),
    ],
)
def test_a_bus_address_without_a_port_is_a_configuration_error(key: str, value: str) -> None:
    """``output.address: localhost`` passed ``serve --check`` and stopped ``serve`` with
    "cannot start the daemon: Invalid argument (addr='tcp://localhost')" (the input's: "0MQ
    input could not connect"); ``tcp://127.0.0.1:99999`` started a daemon that waited for
    ever on a port no proxy can have. Expected: a configuration error naming the setting."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, {f"XASFLOW__{key}__ADDRESS": value})
    assert str(exc.value).endswith(
        f"{key.lower()}.address: Value error, a TCP address ends in a port 1-65535: give "
        f"host:port (got {value!r})"
    )
    fine = {"XASFLOW__INPUT__ADDRESS": "tcp://[::1]:5578", "XASFLOW__OUTPUT__ADDRESS": "ipc://x"}
    cfg = load_config(None, fine)
    assert (cfg.input.address, cfg.output.address) == ("tcp://[::1]:5578", "ipc://x")
    # IPv6 without brackets passed as host "::" and port 1 (the reviewer's note)
    with pytest.raises(ConfigError, match=r"an IPv6 host goes in brackets: tcp://\[::1\]:5577"):
        load_config(None, {"XASFLOW__INPUT__ADDRESS": "tcp://::1"})


def test_kafka_fetch_wait_defaults_to_100_ms_and_the_consumer_settings_win(
    tmp_path: Path,
) -> None:
    """The consumer's fetch.wait.max.ms is 100 ms (Apache Kafka answers a waiting fetch when
    data arrive, so it only paces idle fetches); ``input.kafka.consumer``, from the file or
    XASFLOW__INPUT__KAFKA__CONSUMER, still overrides it (10 on Tansu, which waits it out)."""
    default = load_config(None, {}).input.kafka.to_settings(10).consumer_config()
    assert default["fetch.wait.max.ms"] == 100
    path = tmp_path / "xasflow.yaml"
    path.write_text("input:\n  kafka:\n    consumer: {fetch.wait.max.ms: 10}\n")
    from_file = load_config(path, {}).input.kafka.to_settings(10).consumer_config()
    assert from_file["fetch.wait.max.ms"] == 10
    env = {"XASFLOW__INPUT__KAFKA__CONSUMER": "{fetch.wait.max.ms: 5}"}
    from_env = load_config(path, env).input.kafka.to_settings(10).consumer_config()
    assert from_env["fetch.wait.max.ms"] == 5


def test_example_config_documents_the_defaults() -> None:
    from xasflow import paths

    example = paths.REPO_ROOT / "examples" / "xasflow.yaml"
    cfg = load_config(example, {})
    assert cfg.models.directory == paths.REPO_ROOT / "models"
    assert cfg.storage.directory == example.parent / "xasflow-store"
    defaults = DaemonConfig()
    for section in (
        "input",
        "channels",
        "analysis",
        "output",
        "http",
        "recommend",
        "epics",
        "queueserver",
    ):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert cfg.models == defaults.models
    assert cfg.storage.model_dump(exclude={"directory"}) == defaults.storage.model_dump(
        exclude={"directory"}
    )


def test_config_errors_name_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  adress: x\n  overflow: wait\nhttp:\n  port: 70000\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    text = str(err.value)
    assert str(path) in text
    assert "input.adress: unknown setting (did you mean 'address'?)" in text
    # near misses are named, in a file or an override; a key like no setting is not guessed at
    with pytest.raises(ConfigError, match=r"http\.prot: unknown setting \(did you mean 'port'\?\)"):
        load_config(None, {"XASFLOW__HTTP__PROT": "1"})
    with pytest.raises(ConfigError, match=r"htp: unknown setting \(did you mean 'http'\?\)"):
        load_config(None, {"XASFLOW__HTP__PORT": "1"})
    with pytest.raises(ConfigError, match=r"input\.colour: unknown setting$"):
        load_config(None, {"XASFLOW__INPUT__COLOUR": "red"})
    assert "input.overflow" in text and "'wait'" in text
    assert "http.port" in text
    with pytest.raises(ConfigError, match=r"XASFLOW__HTTP__PORT.*\n.*http\.port"):
        load_config(None, {"XASFLOW__HTTP__PORT": "eighty"})
    with pytest.raises(ConfigError, match="XASFLOW__SECTION__KEY"):
        load_config(None, {"XASFLOW__PORT": "1"})
    # one underscore after XASFLOW: ignored without a word before, the default port served
    with pytest.raises(ConfigError, match=r"XASFLOW_HTTP__PORT: .*\(XASFLOW__HTTP__PORT\)"):
        load_config(None, {"XASFLOW_HTTP__PORT": "8700"})
    assert load_config(None, {"XASFLOW_CACHE": "/tmp/c"}).http.port == 8620  # not a setting
    with pytest.raises(ConfigError, match="analyse its own results"):
        load_config(None, {"XASFLOW__INPUT__PREFIX": "a", "XASFLOW__OUTPUT__PREFIX": "a"})
    with pytest.raises(ConfigError, match="prefix must not contain spaces"):
        load_config(None, {"XASFLOW__INPUT__PREFIX": "a b"})
    with pytest.raises(ConfigError, match="not an element symbol"):
        load_config(None, {"XASFLOW__ANALYSIS__ELEMENT": "Copper"})
    with pytest.raises(ConfigError, match=r"analysis\.herfd: .*FWHM in eV"):
        load_config(None, {"XASFLOW__ANALYSIS__HERFD": "-1"})
    assert load_config(None, {"XASFLOW__ANALYSIS__HERFD": "1.2"}).analysis.herfd == 1.2
    assert load_config(None, {"XASFLOW__ANALYSIS__HERFD": "true"}).analysis.herfd is True
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.yaml", {})
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml", {})
    (tmp_path / "broken.yaml").write_text("input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(tmp_path / "broken.yaml", {})
    # one line, naming the file and where, not PyYAML's "<unicode string>"
    text = str(err.value)
    assert "\n" not in text and "<unicode string>" not in text
    assert text.startswith(f"{tmp_path / 'broken.yaml'}:2:1: not valid YAML: expected")
    assert text.endswith("(while parsing a flow sequence from line 1)")


def test_bundle_integrity_settings(tmp_path: Path) -> None:
    """models.require_digest / require_signature / trusted_keys: defaults, paths relative to
    the file, a key that is not a public key and signatures without keys are errors."""
    from xasflow.models.integrity import generate_keypair

    private, public = generate_keypair()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "facility.pub").write_bytes(public)
    (tmp_path / "keys" / "facility.key").write_bytes(private)
    defaults = DaemonConfig().models
    assert (defaults.require_digest, defaults.require_signature) == (True, False)
    assert defaults.trusted_keys == ()
    path = tmp_path / "xasflow.yaml"
    path.write_text("models:\n  require_signature: true\n  trusted_keys: [keys/facility.pub]\n")
    cfg = load_config(path, {})
    assert cfg.models.trusted_keys == (tmp_path / "keys" / "facility.pub",)
    assert cfg.models.require_signature and cfg.models.require_digest
    one = load_config(None, {"XASFLOW__MODELS__TRUSTED_KEYS": str(tmp_path / "keys/facility.pub")})
    assert one.models.trusted_keys == (tmp_path / "keys" / "facility.pub",)
    with pytest.raises(ConfigError, match=r"models: .*require_signature: true needs"):
        load_config(None, {"XASFLOW__MODELS__REQUIRE_SIGNATURE": "true"})
    path.write_text("models:\n  trusted_keys: [keys/facility.key]\n")  # the private half
    with pytest.raises(ConfigError, match=r"models\.trusted_keys: .*facility\.key: not a"):
        load_config(path, {})
    path.write_text("models:\n  trusted_keys: [keys/missing.pub]\n")
    with pytest.raises(ConfigError, match=r"missing\.pub: not a readable Ed25519 public key") as e:
        load_config(path, {})
    assert "(no such file)" in str(e.value) and "Errno" not in str(e.value)


@pytest.mark.parametrize("where", ["below_a_file", "a_file"])
def test_serve_check_warns_of_a_store_path_through_a_file(tmp_path: Path, where: str) -> None:
    """A store directory below a regular file (or the file itself) passed ``--check``, whose
    only test was a writable nearest existing ancestor: the daemon then refused to start
    ("Not a directory"). Expected: the warning ``--check`` gives a store it cannot create."""
    from xasflow.daemon.commands import check_paths
    from xasflow.daemon.config import DaemonConfig

    afile = tmp_path / "afile"
    afile.write_text("")
    store = afile / "sub" if where == "below_a_file" else afile
    config = DaemonConfig.model_validate({"storage": {"directory": str(store)}})
    assert any("cannot be created or written" in w for w in check_paths(config))
    fine = DaemonConfig.model_validate({"storage": {"directory": str(tmp_path / "new" / "s")}})
    assert not any("storage" in w for w in check_paths(fine))


def test_a_bundle_given_as_the_models_directory_is_named_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``models.directory: models/cu-k`` (the bundle, not the directory holding bundles) was
    "holds no bundle (no */manifest.json)" in ``--check`` and "no model bundle in .../cu-k"
    from the daemon, which then rejected every spectrum. Expected: both say it is a bundle and
    which directory to give."""
    from xasflow.daemon.commands import check_paths
    from xasflow.daemon.counters import Counters
    from xasflow.daemon.parts import build_analysis

    bundle = Path(__file__).resolve().parents[1] / "models" / "cu-k"
    config = DaemonConfig.model_validate({"models": {"directory": str(bundle), "watch": False}})
    said = (
        f"models.directory {bundle} is a bundle, not the directory of bundles: give the "
        f"directory holding it, {bundle.parent}"
    )
    assert check_paths(config) == [f"{said}: every spectrum would be rejected"]
    with caplog.at_level("WARNING", logger="xasflow.daemon.parts"):
        registry, _ = build_analysis(config, Counters())
    assert not registry.models()
    assert f"{said}: every spectrum will be rejected no_model" in caplog.messages


def test_serve_check_prints_effective_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    path = tmp_path / "x.yaml"
    port = free_port()
    path.write_text(f"http:\n  port: {port}\n")
    monkeypatch.setenv("XASFLOW__OUTPUT__ENABLED", "false")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_commands(sub)
    add_demo_command(sub)
    args = parser.parse_args(["serve", "--config", str(path), "--check"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert shown["http"]["port"] == port and shown["output"]["enabled"] is False
    assert shown["channels"]["if"][0] == "If"
    assert "warning" not in captured.err  # the repository's models/ holds the Cu bundle
    # a models directory that is not there passes the schema, but --check says what follows
    monkeypatch.setenv("XASFLOW__MODELS__DIRECTORY", str(tmp_path / "no-models"))
    assert args.func(args) == 1  # exit 0 before: a deploy script could not see it
    assert "no-models does not exist: every spectrum would be rejected" in capsys.readouterr().err
    # so do a taken HTTP port and an EPICS prefix that another IOC serves
    from xasflow.adapters.epics_ioc import XasIoc

    ca_port = free_port()
    monkeypatch.setenv("XASFLOW__EPICS__ENABLED", "true")
    monkeypatch.setenv("XASFLOW__EPICS__PORT", str(ca_port))
    with socket.socket() as taken, XasIoc("XAS:", port=ca_port, beacon_port=free_port()) as ioc:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        assert args.func(args) == 1
        err, served = capsys.readouterr().err, f"127.0.0.1:{ioc.tcp_port}"
    assert f"warning: http 127.0.0.1:{port}: Address already in use" in err
    assert f"warning: epics: XAS:BUNDLE_ID is already served by {served} (an IOC" in err
    args = parser.parse_args(["demo", "--scans", "2", "--fly"])
    assert (args.scans, args.fly, args.duration) == (2, True, 0.0)
    for bad in (["--fly-spectra", "0"], ["--scans", "-1"], ["--duration", "-5"]):
        with pytest.raises(SystemExit):  # a usage error naming the argument, no traceback
            parser.parse_args(["demo", *bad])
    assert "--fly-spectra: 0 is below 1" in capsys.readouterr().err


def test_queueserver_needs_credentials_to_be_enabled() -> None:
    with pytest.raises(ConfigError, match=r"queueserver.*zmq_public_key"):
        load_config(None, {"XASFLOW__QUEUESERVER__ENABLED": "true"})
    env = {
        "XASFLOW__QUEUESERVER__ENABLED": "true",
        "XASFLOW__QUEUESERVER__TRANSPORT": "http",
        "XASFLOW__QUEUESERVER__API_KEY": "0123",
    }
    cfg = load_config(None, env)
    assert cfg.queueserver.enabled and cfg.queueserver.api_key is not None
    assert cfg.queueserver.api_key.get_secret_value() == "0123"  # text, not the number 123
    assert "0123" not in cfg.model_dump_json()  # never shown by serve --check


def test_serve_unknown_log_level_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``serve --log-level verbose`` (or any word its help does not list) ran the daemon at
    INFO without a word, as the demo's did before it took choices. Expected: a usage error
    naming the choices; the listed levels in any case are taken, lower-cased."""
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="cmd", required=True))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", "--log-level", "verbose"])
    assert exc.value.code == 2
    assert "invalid choice: 'verbose'" in capsys.readouterr().err
    assert parser.parse_args(["serve", "--log-level", "DEBUG"]).log_level == "debug"
    assert parser.parse_args(["serve"]).log_level == "info"
