"""deploy/ files agree with each other and with the daemon's configuration: the daemon's
YAML in its three homes, the compose mounts and paths, the image, the Kubernetes manifests,
the systemd unit's hardening. (tests/test_deploy.py runs the tools and a real daemon.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    DEPLOY,
    TOKEN,
    alert_rules,
    dashboard,
    env_file,
    load_yaml,
    rendered_k8s,
    unit_file,
)

from xasflow import paths
from xasflow.daemon.config import ConfigError, env_overrides, load_config


def test_daemon_configs_in_deploy_are_valid() -> None:
    """deploy/xasflow.yaml, the ConfigMap's copy and the systemd env file load; off loopback
    the daemon refuses to start without a token."""
    env = {"XASFLOW__HTTP__TOKEN": TOKEN}
    cfg = load_config(DEPLOY / "xasflow.yaml", environ=env)
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 8620)
    assert cfg.input.address == "tcp://proxy:5578" and cfg.output.address == "tcp://proxy:5577"
    assert cfg.models.directory == Path("/opt/xasflow/models")
    assert cfg.storage.directory == Path("/var/lib/xasflow/store")
    with pytest.raises(ConfigError, match="token"):
        load_config(DEPLOY / "xasflow.yaml", environ={})
    kafka = load_config(
        DEPLOY / "xasflow.yaml",
        environ={**env, "XASFLOW__INPUT__KIND": "kafka", "XASFLOW__OUTPUT__KIND": "kafka"},
    )
    assert (kafka.input.kind, kafka.output.kind) == ("kafka", "kafka")
    assert kafka.input.kafka.bootstrap_servers == "kafka:29092"
    assert kafka.output.kafka.topic == "xasflow.analysis.documents"

    configmap = load_yaml(DEPLOY / "k8s" / "configmap.yaml")
    k8s = yaml.safe_load(configmap["data"]["xasflow.yaml"])
    assert k8s["input"]["address"].endswith(".svc.cluster.local:5578")
    assert k8s["storage"] == {"directory": "/var/lib/xasflow/store"}

    unit_env = env_file(DEPLOY / "systemd" / "xasflow.env.example")
    # installed unedited, it serves on every interface with no token: refused, saying so (it
    # held a placeholder token before, which a daemon would have accepted: a public secret)
    assert "XASFLOW__HTTP__TOKEN" not in unit_env
    with pytest.raises(ConfigError, match=r"not a loopback address: set http\.token"):
        load_config(DEPLOY / "xasflow.yaml", environ=unit_env)
    unit_env["XASFLOW__HTTP__TOKEN"] = TOKEN
    cfg = load_config(DEPLOY / "xasflow.yaml", environ=unit_env)
    assert cfg.input.address == "tcp://127.0.0.1:5578"
    sections = set(env_overrides(unit_env))
    assert cfg.http.token is not None and sections == {
        "http",
        "input",
        "output",
        "storage",
        "models",
    }


def test_compose_files_agree_with_each_other() -> None:
    """Mounts exist, the tiled service reads the daemon's store path, Prometheus loads the
    alert rules, Grafana's provider path and datasource uid match the dashboard."""
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert {"proxy", "kafka", "xasflow", "tiled", "prometheus", "grafana"} <= set(services)
    for svc in services.values():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{port}: publish on loopback only"
    store = str(
        load_config(DEPLOY / "xasflow.yaml", {"XASFLOW__HTTP__TOKEN": TOKEN}).storage.directory
    )
    tiled_cmd = services["tiled"]["command"]
    assert tiled_cmd[:3] == ["serve", "catalog", f"{store}/catalog.db"]
    assert tiled_cmd[tiled_cmd.index("-r") + 1] == f"sqlite:///{store}/tables.sqlite"
    readme = " ".join((paths.REPO_ROOT / "README.md").read_text().replace("\\\n", " ").split())
    assert " ".join(["tiled", *tiled_cmd[:5]]) in readme, "README's tiled command differs"
    assert f"xasflow-store:{store}" in services["tiled"]["volumes"]
    assert f"xasflow-store:{store}" in services["xasflow"]["volumes"]

    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("."))
    assert mounts["./prometheus/alerts.yml"] in prom["rule_files"]
    assert "/prometheus/xasflow-token" in " ".join(services["prometheus"]["command"])
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "xasflow")
    assert job["authorization"]["credentials_file"] == "/prometheus/xasflow-token"

    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "xasflow.yml")
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    source = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {p["datasource"]["uid"] for p in dashboard()["panels"]}
    assert uids == {source["datasources"][0]["uid"]}


def test_dockerfile_and_dockerignore() -> None:
    """CPU torch, the daemon extras, a non-root user, the bundles, a health check; everything
    the Dockerfile copies from the context is let through by .dockerignore."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert '"/src[daemon,kafka]"' in text and "COPY models /opt/xasflow/models" in text
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text
    ignore = (paths.REPO_ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for line in text.splitlines():
        if line.startswith("COPY") and "--from" not in line:
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for src in sources:
                assert src.rstrip("/") in allowed, f"{src} is excluded by .dockerignore"
                assert (paths.REPO_ROOT / src).exists(), src


def test_k8s_manifests() -> None:
    """Non-root read-only pod probed on the open /readyz and /livez, one replica on the PVC, and a
    NetworkPolicy that admits only the scraper and lets out only DNS and the bus."""
    docs = {p.stem: load_yaml(p) for p in (DEPLOY / "k8s").glob("*.yaml")}
    kust = docs.pop("kustomization")
    assert sorted(kust["resources"]) == sorted(f"{n}.yaml" for n in docs)
    spec = docs["deployment"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    from xasflow.daemon.http import LIVEZ, OPEN_PATHS, READYZ

    probes = {
        p: container[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    # liveness, readiness, startup: a daemon whose every bundle was refused answers /readyz
    # 503, so a startup probe there restart-looped it before XasflowNoModelLoaded could fire
    assert [probes[p]["path"] for p in sorted(probes)] == [LIVEZ, READYZ, LIVEZ]
    assert all(p["path"] in OPEN_PATHS and p["port"] == "http" for p in probes.values())
    assert {"name": "http", "containerPort": 8620, "protocol": "TCP"} in container["ports"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == docs["pvc"]["metadata"]["name"]
    policy = docs["networkpolicy"]["spec"]
    assert [p["port"] for r in policy["ingress"] for p in r["ports"]] == [8620]
    egress_ports = {p["port"] for r in policy["egress"] for p in r["ports"]}
    assert egress_ports == {53, 5577, 5578, 9092}
    endpoint = docs["podmonitor"]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"


def test_systemd_unit_hardening() -> None:
    """The settings the unit promises: own user, strict FS, only the state dir writable."""
    service = dict(unit_file(DEPLOY / "systemd" / "xasflow.service")["Service"])
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/xasflow",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "Restart": "on-failure",
        "Type": "notify",  # the daemon sends READY=1 (tests/test_deploy.py)
        "NotifyAccess": "main",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert "/opt/xasflow/models" in service["ReadOnlyPaths"].split()
    assert "ExecStartPost" not in service and "MemoryDenyWriteExecute" not in service


def test_grafana_dashboard_layout() -> None:
    """Panels have unique ids, a query each, and do not overlap on the 24-column grid."""
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels) >= 10
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        assert any(t.get("expr") for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in (
        "throughput",
        "latency",
        "rejected",
        "out-of-domain",
        "loss",
        "queue",
        "models",
        "kafka",
    ):
        assert topic in titles, topic


def test_the_rejection_reasons_an_alert_names_are_ones_the_daemon_gives() -> None:
    """An alert's runbook naming reasons to look for ("by reason (...)") names real ones: it
    said edge, noise and channels, which no stage gives (no_edge, weak_edge, bad_channel)."""
    from xasflow.daemon.pipeline import known_rejections

    known = {reason for _, reason in known_rejections()}
    rules = [
        r for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]
    ]
    named = {
        (rule["alert"], word.strip().rstrip("."))
        for rule in rules
        for listed in re.findall(
            r"by reason \(([^)]*)\)", rule["annotations"].get("description", "")
        )
        for word in listed.split(",")
        if word.strip().strip(".")
    }
    assert named, "no alert names rejection reasons: the check checks nothing"
    assert {(alert, word) for alert, word in named if word not in known} == set()


def test_the_assembly_alert_covers_every_refusal_but_the_normal_ones() -> None:
    """XasflowAssemblyRejecting lists assembly reasons by name: each is one the assembler
    gives, and every other is one normal operation makes (a Kafka redelivery, a scan the user
    aborted, a run open at a stop), so a reason added to the assembler is either alerted on or
    named here as normal (a name spelled wrong, or a new refusal, was silently unwatched)."""
    from xasflow.daemon.assembly import REASONS

    (rule,) = [r for r in alert_rules() if r["alert"] == "XasflowAssemblyRejecting"]
    (listed,) = re.findall(r'stage="assembly", reason=~"([^"]+)"', rule["expr"])
    alerted = set(listed.split("|"))
    assert alerted <= REASONS, sorted(alerted - REASONS)
    normal = {"duplicate_start", "duplicate_event", "late_document"}  # Kafka redelivers
    normal |= {"incomplete_run", "missing_stop"}  # aborted; open when the daemon stopped
    assert REASONS - alerted == normal


def test_the_loss_panel_shows_documents_dropped_on_an_internal_error() -> None:
    """Grafana's loss panel draws what the processing loop dropped on an unexpected error
    (xasflow_internal_errors_total, alerted on by XasflowInternalErrors) beside the events,
    input documents and store rows lost: a bug dropping documents is loss too."""
    (panel,) = [p for p in dashboard()["panels"] if p["title"].startswith("Loss by cause")]
    exprs = " ".join(t["expr"] for t in panel["targets"])
    for metric in (
        "xasflow_events_lost_total",
        "xasflow_input_dropped_total",
        "xasflow_store_rows_total",
        "xasflow_internal_errors_total",
    ):
        assert metric in exprs, metric


def test_k8s_renders_into_one_consistent_pod(tmp_path: Path) -> None:
    """What ``kubectl apply -k deploy/k8s`` would send, rendered by kubectl's own kustomize:
    every object in the namespace; the Service, PodMonitor and NetworkPolicy select the pod;
    each mount has its volume; the daemon reads the ConfigMap's config at the path its
    ``--config`` names, and that config loads, keeps the catalog on the PVC, serves HTTP on
    the Service's port and reaches the bus on ports the NetworkPolicy lets out."""
    objs = {d["kind"]: d for d in rendered_k8s()}
    namespace = objs.pop("Namespace")["metadata"]["name"]
    assert all(o["metadata"]["namespace"] == namespace for o in objs.values())
    deploy = objs["Deployment"]["spec"]
    pod_labels = deploy["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deploy["selector"]["matchLabels"],
        "Service": objs["Service"]["spec"]["selector"],
        "PodMonitor": objs["PodMonitor"]["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": objs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    }
    assert {k: v.items() <= pod_labels.items() for k, v in selectors.items()} == dict.fromkeys(
        selectors, True
    )
    pod = deploy["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    source = mounts[str(config_path.parent)]["configMap"]["name"]
    assert source == objs["ConfigMap"]["metadata"]["name"]
    config_file = tmp_path / config_path.name
    config_file.write_text(objs["ConfigMap"]["data"][config_path.name])
    cfg = load_config(config_file, environ={"XASFLOW__HTTP__TOKEN": TOKEN})
    claim = mounts[str(cfg.storage.directory)]["persistentVolumeClaim"]["claimName"]
    assert claim == objs["PersistentVolumeClaim"]["metadata"]["name"]
    assert str(cfg.models.directory) not in mounts  # the image's own bundles, not a volume
    (port,) = [p for p in container["ports"] if p["name"] == "http"]
    service_port = objs["Service"]["spec"]["ports"][0]
    assert port["containerPort"] == cfg.http.port == service_port["port"]
    assert service_port["targetPort"] == port["name"]
    egress = {p["port"] for r in objs["NetworkPolicy"]["spec"]["egress"] for p in r["ports"]}
    bus = {int(a.rsplit(":", 1)[1]) for a in (cfg.input.address, cfg.output.address)}
    assert bus <= egress


def test_k8s_objects_pass_the_kubernetes_openapi_schemas() -> None:
    """Each rendered object validates, strictly (no unknown fields), against kubernetes-validate's
    bundled schemas of Kubernetes 1.32, offline (the package is 108 MB: not in the test extra,
    skipped where absent). The PodMonitor is a Prometheus Operator CRD with no bundled schema:
    it is required to be the only one skipped."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    unschemed = []
    for obj in rendered_k8s():
        try:
            kv.validate(obj, "1.32", strict=True)
        except kv.SchemaNotFoundError:
            unschemed.append(obj["kind"])
    assert unschemed == ["PodMonitor"]
