"""deploy/kubernetes: well-formed manifests whose pipelines, ports and probes agree.

No cluster here: the manifests are parsed (and built with `kubectl kustomize` when kubectl
is installed), and each meterline container's pipeline is validated with the environment
the container gives it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy_files import DEPLOY, load_pipeline

KUBERNETES = DEPLOY / "kubernetes"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def documents() -> list[dict]:
    return [d for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "kustomization.yaml"
            for d in yaml.safe_load_all(path.read_text()) if d]


def of_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def meterline_containers() -> list[tuple[dict, dict]]:
    """(workload, container) of every container running the meterline image."""
    return [(w, c) for w in documents() if w["kind"] in WORKLOADS
            for c in w["spec"]["template"]["spec"]["containers"]
            if c["image"].startswith("meterline:")]


def container_pipeline(workload: dict, container: dict, tmp_path: Path):
    """The pipeline a container runs: its `-c` file, read from the ConfigMap mounted there,
    validated with the container's env (secrets stand in as placeholders)."""
    path = container["args"][container["args"].index("-c") + 1]
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in workload["spec"]["template"]["spec"]["volumes"]
                if v["name"] == mount["name"]]
    [configmap] = [c for c in of_kind("ConfigMap")
                   if c["metadata"]["name"] == volume["configMap"]["name"]]
    local = tmp_path / Path(path).name
    local.write_text(configmap["data"][Path(path).relative_to(mount["mountPath"]).as_posix()])
    environ = {e["name"]: e.get("value", "from-a-secret") for e in container.get("env", [])}
    return load_pipeline(local, environ)


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_every_manifest_has_an_api_version_a_kind_and_a_name():
    for d in documents():
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())["resources"]
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == present


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")
def test_kustomize_builds_the_manifests():
    result = subprocess.run(["kubectl", "kustomize", str(KUBERNETES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(documents())
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {
        "meterline"}


def test_there_is_a_sidecar_edge_and_a_collector_tier():
    kinds = {(w["kind"], len(w["spec"]["template"]["spec"]["containers"]))
             for w, _ in meterline_containers()}
    assert ("Deployment", 2) in kinds  # the application and meterline in one pod
    assert ("StatefulSet", 1) in kinds


def test_every_meterline_container_runs_a_pipeline_that_validates(tmp_path):
    loaded = [container_pipeline(w, c, tmp_path) for w, c in meterline_containers()]
    assert len(loaded) == 2


def test_probes_ask_the_admin_port_for_healthz_and_readyz(tmp_path):
    for workload, container in meterline_containers():
        admin = container_pipeline(workload, container, tmp_path).service.admin
        assert ports(container)["admin"] == admin.listen.port
        assert admin.listen.host == "0.0.0.0"  # the kubelet probes the pod's address
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"] == {"path": path, "port": "admin"}


def test_the_metrics_port_is_where_the_prometheus_exporter_listens(tmp_path):
    for workload, container in meterline_containers():
        exporters = container_pipeline(workload, container, tmp_path).exporters
        if "prometheus" in exporters:
            assert ports(container)["metrics"] == exporters["prometheus"].config.listen.port


def test_every_pod_runs_as_non_root_with_a_read_only_root_filesystem():
    for workload, container in meterline_containers():
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_pipelines_reload_when_the_configmap_changes(tmp_path):
    for workload, container in meterline_containers():
        assert container_pipeline(workload, container, tmp_path).service.watch_config
        # subPath mounts are never updated by the kubelet
        assert all("subPath" not in m for m in container["volumeMounts"])


def test_the_collectors_keep_their_queues_on_a_persistent_volume(tmp_path):
    [collector] = of_kind("StatefulSet")
    [container] = collector["spec"]["template"]["spec"]["containers"]
    data_dir = container_pipeline(collector, container, tmp_path).service.data_dir
    claims = {t["metadata"]["name"] for t in collector["spec"]["volumeClaimTemplates"]}
    [mount] = [m for m in container["volumeMounts"] if data_dir.startswith(m["mountPath"])]
    assert mount["name"] in claims


def test_the_autoscaler_scales_the_collectors():
    [hpa] = of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert any(d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
               for d in documents())


def test_the_service_monitor_scrapes_ports_its_services_have():
    [monitor] = of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [expression] = monitor["spec"]["selector"]["matchExpressions"]
    selected = [s for s in of_kind("Service")
                if s["metadata"]["labels"].get(expression["key"]) in expression["values"]]
    assert len(selected) == 2
    offered = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= offered


def test_every_service_targets_ports_its_pods_name():
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        pods = [w["spec"]["template"] for w in documents() if w["kind"] in WORKLOADS
                and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        named = {name for pod in pods for c in pod["spec"]["containers"] for name in ports(c)}
        assert pods, service["metadata"]["name"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named
