"""deploy/k8s builds and says what we mean: ``kubectl kustomize`` on the base and every overlay,
schema validation (``kubernetes-validate``, strict, offline schemas) against the oldest and
newest Kubernetes we support, and the properties a reviewer would otherwise check by eye:
probes on the right health services, GPU requests, pinned images, non-root pods, a grace period
longer than the server's drain, no committed secrets, settings the server actually has, and
Prometheus rules over metrics the server actually exports.

Skips (with the reason) when kubectl, kubernetes-validate, yamllint or promtool is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BUILDS = {"base": K8S / "base", "a100": K8S / "overlays" / "a100", "cpu": K8S / "overlays" / "cpu"}
# 1.30: the first release with the preStop `sleep` action on by default.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SERVICE_NAME = "forgedit.v1.ForgeditService"


def kustomize(directory: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(BUILDS))
def build(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(BUILDS[request.param])


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    sts = find(docs, "StatefulSet", "forgedit-server")
    (container,) = [
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "forgedit-server"
    ]
    return container


# --------------------------------------------------------------------------------- schemas


def test_every_resource_passes_strict_schema_validation(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    _, docs = build
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc}")


def test_the_validator_would_catch_a_typo() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    docs = kustomize(BUILDS["base"])
    sts = json.loads(json.dumps(find(docs, "StatefulSet", "forgedit-server")))
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(sts, KUBERNETES_VERSIONS[-1], strict=True)


def test_yaml_is_lint_clean() -> None:
    if shutil.which("yamllint") is None and not (REPO / ".venv/bin/yamllint").exists():
        pytest.skip("yamllint is not installed")
    exe = shutil.which("yamllint") or str(REPO / ".venv/bin/yamllint")
    out = subprocess.run(
        [exe, "-c", str(REPO / "deploy/.yamllint.yaml"), str(REPO / "deploy")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------ forgedit-server


def test_probes_use_grpc_health_liveness_overall_readiness_the_service(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    c = server_container(docs)
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": SERVICE_NAME}
    assert c["livenessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert c["startupProbe"]["grpc"]["service"] == ""
    # Startup may take minutes (model load + warm-up) before liveness starts counting.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_grace_period_outlasts_the_servers_drain(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    config = find(docs, "ConfigMap", "forgedit-server-config")["data"]
    pod = find(docs, "StatefulSet", "forgedit-server")["spec"]["template"]["spec"]
    drain = float(config["FORGEDIT_GRACE_PERIOD_S"])
    pre_stop = server_container(docs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    # server.main: drain = grace for running jobs + up to 5 s for open streams to close.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 5 + 5


def test_gpu_overlay_requests_one_a100_and_cpu_overlays_none(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = build
    c = server_container(docs)
    pod = find(docs, "StatefulSet", "forgedit-server")["spec"]["template"]["spec"]
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    if name == "a100":
        assert limits["nvidia.com/gpu"] == 1 and requests["nvidia.com/gpu"] == 1
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        values = terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
        assert values and all("A100" in v for v in values)
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        config = find(docs, "ConfigMap", "forgedit-server-config")["data"]
        assert json.loads(config["FORGEDIT_DEVICES"]) == ["cuda:0"]
        assert ":" in c["image"] and "cuda" in c["image"].rsplit(":", 1)[1]
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in pod
        assert "cpu" in c["image"].rsplit(":", 1)[1]


def test_gpu_overlay_samples_on_tensorrt_with_plans_on_a_persistent_volume(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = build
    config = find(docs, "ConfigMap", "forgedit-server-config")["data"]
    sts = find(docs, "StatefulSet", "forgedit-server")
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in server_container(docs)["volumeMounts"]}
    if name != "a100":
        assert "FORGEDIT_UNET_BACKEND" not in config  # the server's default, auto
        assert "engines" not in claims
        return
    assert config["FORGEDIT_UNET_BACKEND"] == "tensorrt"
    # Plans live where the server caches them (data_dir/engines), on their own claim.
    assert mounts["engines"] == config["FORGEDIT_DATA_DIR"] + "/engines"
    assert claims["engines"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The first start builds the engines before readiness: the startup probe waits long enough.
    probe = server_container(docs)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30 * 60


def test_server_config_names_only_settings_the_server_has(
    build: tuple[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings_mod = pytest.importorskip("server.settings")
    _, docs = build
    config = find(docs, "ConfigMap", "forgedit-server-config")["data"]
    fields = {f"FORGEDIT_{n.upper()}" for n in settings_mod.ServerSettings.model_fields}
    unknown = {k for k in config if k.startswith("FORGEDIT_")} - fields
    assert not unknown, f"settings the server does not have: {sorted(unknown)}"
    # And the values parse (JSON lists/maps, numbers) into the real settings object.
    for key in list(__import__("os").environ):
        if key.startswith("FORGEDIT_") or key == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(key)
    for key, value in config.items():
        if key.startswith("FORGEDIT_"):
            monkeypatch.setenv(key, value)
    settings = settings_mod.ServerSettings()
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"
    assert settings.grpc_port == 50051 and settings.metrics_port == 9464
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"


def test_secret_templates_parse_as_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_mod = pytest.importorskip("server.settings")
    template = K8S / "extras" / "forgedit-server-secrets.example.env"
    pairs = [
        line.split("=", 1)
        for line in template.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    for key, value in pairs:
        monkeypatch.setenv(key, value)
    assert len(settings_mod.ServerSettings().auth_tokens) == 1


def test_services_select_the_pods_and_name_their_ports(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    labels = {
        name: spec_labels
        for name, spec_labels in (
            (d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"])
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
        )
    }
    ports = {
        name: {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        for name, spec in pod_specs(docs)
    }
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [
            n
            for n, lab in labels.items()
            if all(lab.get(k) == v for k, v in svc["spec"]["selector"].items())
        ]
        assert selected, f"Service {svc['metadata']['name']} selects no pods"
        for port in svc["spec"]["ports"]:
            assert any(port["targetPort"] in ports[n] for n in selected), port
    grpc_svc = find(docs, "Service", "forgedit-server")
    assert grpc_svc["spec"]["clusterIP"] == "None"  # headless: gRPC balances per call
    assert find(docs, "StatefulSet", "forgedit-server")["spec"]["serviceName"] == (
        "forgedit-server"
    )
    pdb = find(docs, "PodDisruptionBudget", "forgedit-server")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels["forgedit-server"].items()


def test_hpa_scales_the_server_on_queue_depth(build: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = build
    hpa = find(docs, "HorizontalPodAutoscaler", "forgedit-server")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "forgedit-server",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "forgedit_queue_depth"
    assert hpa["spec"]["maxReplicas"] == {"a100": 8, "cpu": 2, "base": 4}[name]


# ------------------------------------------------------------------------- every workload


def test_images_are_pinned(build: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = build
    for name, spec in pod_specs(docs):
        for c in spec["containers"] + spec.get("initContainers", []):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{name}: image {image!r} is not pinned"


def test_pods_run_as_non_root_with_no_privileges_and_resource_limits(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    for name, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
            assert "readinessProbe" in c and "livenessProbe" in c, name


def test_no_secret_is_committed(build: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = build
    assert not [d for d in docs if d["kind"] == "Secret"]
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"(?i)(password|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{16,}", text)
    # The pods that need credentials reference Secrets created out of band.
    refs = {
        ref["secretRef"]["name"]
        for _, spec in pod_specs(docs)
        for c in spec["containers"]
        for ref in c.get("envFrom", [])
        if "secretRef" in ref
    }
    assert refs == {"forgedit-server-secrets"}


# ------------------------------------------------------------------------------ Prometheus


def exported_metric_names() -> set[str]:
    metrics_mod = pytest.importorskip("server.metrics")
    registry = metrics_mod.Metrics().registry
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # Histograms expose _bucket/_sum/_count only once observed; counters _total.
    for family in registry.collect():
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_prometheus_rules_and_hpa_use_metrics_the_server_exports() -> None:
    exported = exported_metric_names()
    rules = (K8S / "base" / "prometheus" / "forgedit-rules.yml").read_text()
    used = set(re.findall(r"\bforgedit_[a-z_]+\b", rules)) | {"forgedit_queue_depth"}
    assert used and not used - exported, f"unknown metrics: {sorted(used - exported)}"
    adapter = (K8S / "extras" / "prometheus-adapter-values.yaml").read_text()
    assert "forgedit_queue_depth" in adapter


def test_promtool_accepts_the_rules_and_config(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    src = K8S / "base" / "prometheus"
    rules = subprocess.run(
        ["promtool", "check", "rules", str(src / "forgedit-rules.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The config names its rule file by its in-pod path; check it beside a local copy.
    shutil.copy(src / "forgedit-rules.yml", tmp_path)
    config = (
        (src / "prometheus.yml")
        .read_text()
        .replace("/etc/prometheus/forgedit-rules.yml", str(tmp_path / "forgedit-rules.yml"))
    )
    (tmp_path / "prometheus.yml").write_text(config)
    checked = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    if "kubernetes_sd_configs not found" in checked.stdout + checked.stderr:
        pytest.skip("this promtool build has no Kubernetes service discovery (Debian strips it)")
    assert checked.returncode == 0, checked.stdout + checked.stderr
