"""deploy/: the image, the compose stack and the systemd unit hang together.

No container runs here (there is no Docker engine), so the files are checked as files:
every pipeline validates with the environment it is given, every file a service mounts
exists, every port one file names is the port another listens on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from meterline import config as config_mod
from tests.deploy_files import DEPLOY, OPERATOR_SET, load_pipeline, pipeline_files, shell_default
from tests.helpers import ROOT

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PIPELINE_IN_IMAGE = "/etc/meterline/pipeline.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes; named volumes have a bare name as source."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]


def meterline_services() -> dict[str, dict]:
    return {name: s for name, s in services().items() if "build" in s}


def mounted_pipeline(service: dict):
    [source] = [s for s, target in mounts(service) if target == PIPELINE_IN_IMAGE]
    return COMPOSE_DIR / source


def service_pipeline(name: str):
    service = meterline_services()[name]
    environ = {k: shell_default(v) for k, v in service.get("environment", {}).items()}
    return load_pipeline(mounted_pipeline(service), environ)


# --- every shipped pipeline ------------------------------------------------------------
@pytest.mark.parametrize("path", pipeline_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_pipeline_file_validates_on_its_defaults(path):
    """With the one setting an operator must give: the admin token, wherever admin listens
    beyond loopback."""
    load_pipeline(path, {"METERLINE_ADMIN_TOKEN": OPERATOR_SET})


@pytest.mark.parametrize("path", [p for p in pipeline_files() if "0.0.0.0:8888" in p.read_text()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_pipeline_with_admin_beyond_loopback_needs_the_admin_token(path):
    with pytest.raises(config_mod.ConfigError, match="METERLINE_ADMIN_TOKEN"):
        load_pipeline(path, {})


def test_compose_refuses_to_start_the_daemons_without_an_admin_token():
    for name in meterline_services():
        token = services()[name]["environment"]["METERLINE_ADMIN_TOKEN"]
        assert token.startswith("${METERLINE_ADMIN_TOKEN:?"), name


def test_the_compose_services_pipelines_validate_with_their_environment():
    assert set(meterline_services()) == {"edge", "collector"}
    for name in meterline_services():
        service_pipeline(name)


# --- the image -------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_runs_as_a_non_root_user():
    users = [arg for op, arg in dockerfile_instructions() if op == "USER"]
    assert users and users[-1] not in ("root", "0"), users


def test_the_image_healthcheck_asks_the_admin_port_for_healthz():
    [check] = [arg for op, arg in dockerfile_instructions() if op == "HEALTHCHECK"]
    admin = load_pipeline(DEPLOY / "docker" / "pipeline.yaml",
                          {"METERLINE_ADMIN_TOKEN": OPERATOR_SET}).service.admin
    assert f"http://127.0.0.1:{admin.listen.port}/healthz" in check


def test_the_image_copies_only_files_the_repository_has():
    for op, arg in dockerfile_instructions():
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), source


def test_the_image_copies_every_package_the_wheel_installs():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {source for op, arg in dockerfile_instructions()
              if op == "COPY" and not arg.startswith("--from") for source in arg.split()[:-1]}
    assert {pattern.rstrip("*") for pattern in include} <= copied


def test_the_image_exposes_every_port_its_pipeline_listens_on():
    exposed = {int(p) for op, arg in dockerfile_instructions() if op == "EXPOSE"
               for p in arg.split()}
    loaded = load_pipeline(DEPLOY / "docker" / "pipeline.yaml",
                          {"METERLINE_ADMIN_TOKEN": OPERATOR_SET})
    listens = {c.config.listen.port for c in [*loaded.receivers.values(),
                                             *loaded.exporters.values()]
               if hasattr(c.config, "listen")}
    listens |= {int(loaded.receivers["otlp"].config.grpc.split(":")[-1]),
                int(loaded.receivers["otlp"].config.http.split(":")[-1]),
                loaded.service.admin.listen.port}
    assert listens <= exposed, listens - exposed


# --- the compose stack -----------------------------------------------------------------
def test_every_file_a_compose_service_mounts_or_builds_from_exists():
    for name, service in services().items():
        for source, _ in mounts(service):
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source}"
        if "build" in service:
            context = COMPOSE_DIR / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name


def test_every_named_volume_is_declared():
    declared = set(compose()["volumes"])
    for name, service in services().items():
        for source, _ in mounts(service):
            if not source.startswith(("/", ".")):
                assert source in declared, f"{name}: {source}"


def test_a_service_waited_for_as_healthy_has_a_healthcheck():
    for name, service in services().items():
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                other = services()[dependency]
                # the meterline image brings its own HEALTHCHECK
                assert "healthcheck" in other or "build" in other, f"{name} -> {dependency}"


def test_the_collector_reads_the_topic_the_edge_writes():
    edge = service_pipeline("edge").exporters["kafka"].config
    collector = service_pipeline("collector").receivers["kafka"].config
    assert edge.topic in collector.topics
    assert {b.split(":")[0] for b in [*edge.brokers, *collector.brokers]} <= set(services())


def test_the_edge_sends_spans_to_jaegers_otlp_grpc_port():
    otlp = service_pipeline("edge").exporters["otlp"].config
    assert (otlp.endpoint, otlp.protocol) == ("http://jaeger:4317", "grpc")


def test_the_collector_writes_to_the_clickhouse_service_with_its_password():
    clickhouse = service_pipeline("collector").exporters["clickhouse"].config
    assert clickhouse.endpoint == "http://clickhouse:8123"
    assert clickhouse.password == shell_default(
        services()["clickhouse"]["environment"]["CLICKHOUSE_PASSWORD"])


def prometheus_targets() -> dict[str, list[str]]:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {job["job_name"]: [t for s in job.get("static_configs", []) for t in s["targets"]]
            + [f"{n}:{d['port']}" for d in job.get("dns_sd_configs", []) for n in d["names"]]
            for job in config["scrape_configs"]}


def test_prometheus_scrapes_the_ports_the_pipelines_listen_on():
    targets = prometheus_targets()
    for target in targets["meterline-exporter"]:
        host, port = target.split(":")
        assert service_pipeline(host).exporters["prometheus"].config.listen.port == int(port)
    for target in targets["meterline-admin"]:
        host, port = target.split(":")
        assert service_pipeline(host).service.admin.listen.port == int(port)


def test_prometheus_mounts_its_config_beside_the_alert_rules_it_loads():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert all((DEPLOY / "prometheus" / f).is_file() for f in config["rule_files"])
    assert ("../prometheus", "/etc/prometheus") in mounts(services()["prometheus"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_the_prometheus_config_passes_promtool():
    result = subprocess.run(["promtool", "check", "config", "prometheus.yml"],
                            cwd=DEPLOY / "prometheus", capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_gets_the_variables_its_datasources_read_and_the_dashboards_path():
    grafana = services()["grafana"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    text = (provisioning / "datasources" / "datasources.yaml").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) <= set(grafana["environment"])
    [provider] = yaml.safe_load(
        (provisioning / "dashboards" / "meterline.yaml").read_text())["providers"]
    assert ("../grafana/dashboards", provider["options"]["path"]) in mounts(grafana)
    assert ("../grafana/provisioning", "/etc/grafana/provisioning") in mounts(grafana)


# --- systemd ---------------------------------------------------------------------------
def test_the_systemd_unit_validates_before_starting_and_reloads_with_sighup():
    unit = (DEPLOY / "systemd" / "meterline.service").read_text()
    assert re.search(r"^ExecStartPre=\S+meterline validate -c ", unit, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", unit, re.M)
    assert re.search(r"^User=meterline$", unit, re.M)
