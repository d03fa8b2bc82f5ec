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
ENGINES_SERVICE = "forgedit.v1.Engines"  # server.lifecycle.ENGINES_SERVICE


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


def pod_specs(
    docs: list[dict[str, Any]], kinds: tuple[str, ...] = ("Deployment", "StatefulSet")
) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in kinds:
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
    # The probes' own health server, so application streams can never starve them.
    health_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    config = find(docs, "ConfigMap", "forgedit-server-config")["data"]
    assert int(config["FORGEDIT_HEALTH_PORT"]) == health_port
    assert c["readinessProbe"]["grpc"] == {"port": health_port, "service": SERVICE_NAME}
    assert c["livenessProbe"]["grpc"] == {"port": health_port, "service": ""}
    # Startup: the engines of every declared resolution are built and their canaries passed.
    assert c["startupProbe"]["grpc"] == {"port": health_port, "service": ENGINES_SERVICE}
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
    # The first start builds the engines before readiness: the startup probe asks whether they
    # are (not whether the process runs) and waits long enough for a TensorRT build.
    probe = server_container(docs)["startupProbe"]
    assert probe["grpc"]["service"] == ENGINES_SERVICE
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30 * 60
    # SD 1.x's native size, declared (the values parse: test_server_config_names_only_...).
    assert config["FORGEDIT_RESOLUTIONS"] == "512x512"


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
    assert settings.health_port == 50052 and settings.max_connection_age_s
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
    auth = pytest.importorskip("server.auth")
    entries = auth.token_entries(settings_mod.ServerSettings().auth_tokens)
    assert [e.admin for e in entries] == [False, True]  # an application's and an admin's
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= dict(pairs).keys()


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


def test_the_a100_overlay_admits_a_default_two_stage_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default two_stage Edit (400 + 1000 updates of batch 1, the default sweep) on the
    configured hardware is estimated within the SDK's default Edit deadline, and its estimate
    fits in the drain grace period, so a rollout never cancels one."""
    settings_mod = pytest.importorskip("server.settings")
    import io
    from types import SimpleNamespace

    from forgedit_client.client import Timeouts
    from PIL import Image

    from server._proto import forgedit_pb2 as pb
    from server.catalog import ServedModels
    from server.estimator import Estimator
    from server.main import time_prior_key
    from server.plans import edit_plan
    from server.ports import BaseModelInfo
    from server.validation import Limits
    from server.wire import edit_call

    config = find(kustomize(BUILDS["a100"]), "ConfigMap", "forgedit-server-config")["data"]
    for key in list(__import__("os").environ):
        if key.startswith("FORGEDIT_"):
            monkeypatch.delenv(key)
    for key, value in config.items():
        if key.startswith("FORGEDIT_"):
            monkeypatch.setenv(key, value)
    settings = settings_mod.ServerSettings()
    key = time_prior_key(dict(settings.base_models), settings)
    assert key == "sd1-cuda"  # SD 1.5 on an A100
    prior = settings.time_prior(key)

    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, "PNG")
    name = next(iter(settings.base_models))
    plan = edit_plan(
        edit_call(
            pb.EditRequest(
                image=png.getvalue(),
                target_prompts=["A photo of a sitting dog."],
                training=pb.TrainingOptions(mode=pb.TRAINING_MODE_TWO_STAGE),
            )
        ),
        Limits.from_settings(settings),
        ServedModels.of(BaseModelInfo(name, "f" * 64, 512, 512, can_caption=True)),
    )
    assert plan.training.total_samples == 1400 and plan.sweep.num_images == 3
    job = SimpleNamespace(kind=pb.JOB_KIND_EDIT, plan=plan)
    estimate = Estimator(prior.training_sample_s, prior.image_step_s).estimate(job)  # type: ignore[arg-type]
    assert 110 <= estimate <= settings.grace_period_s
    assert Timeouts().edit is not None and estimate < Timeouts().edit


def _alerts() -> dict[str, str]:
    rules = yaml.safe_load((K8S / "base" / "prometheus" / "forgedit-rules.yml").read_text())
    return {
        rule["alert"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def test_every_alert_has_promtool_rule_tests_and_they_pass() -> None:
    tests = yaml.safe_load((K8S / "base" / "prometheus" / "forgedit-rules.test.yml").read_text())
    tested = {
        case["alertname"]
        for group in tests["tests"]
        for case in group.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a case where it fires, not only where it stays quiet
    }
    assert set(_alerts()) <= tested, f"alerts without a firing case: {set(_alerts()) - tested}"
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    out = subprocess.run(
        ["promtool", "test", "rules", "forgedit-rules.test.yml"],
        cwd=K8S / "base" / "prometheus",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_series_that_alerts_read_exist_at_zero_on_a_fresh_server() -> None:
    """A labelled counter that first appears at its first event has no rate until its second:
    every forgedit counter an alert selects must be exported (at 0) from start-up. (A gauge an
    alert reads, such as forgedit_unet_backend_degraded, is a state read as it is: it appears
    when its engine is built.)"""
    metrics_mod = pytest.importorskip("server.metrics")
    samples = [s for f in metrics_mod.Metrics().registry.collect() for s in f.samples]
    selectors = [
        (name, dict(re.findall(r'(\w+)="([^"]*)"', matchers or "")))
        for expr in _alerts().values()
        for name, matchers in re.findall(r"\b(forgedit_[a-z_]+)(?:\{([^}]*)\})?", expr)
        if name.endswith("_total")
    ]
    assert selectors
    for name, labels in selectors:
        matching = [
            s
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert matching, f"{name}{labels} is not exported before its first event"
        assert all(s.value == 0 for s in matching)


# -------------------------------------------------------------------- network and MLflow auth


def _policy_for(docs: list[dict[str, Any]], app: str) -> dict[str, Any]:
    (policy,) = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": app}
    ]
    return policy


def test_network_policies_confine_the_server_and_mlflow(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    server = _policy_for(docs, "forgedit-server")
    assert set(server["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    opened = {p["port"] for rule in server["spec"]["ingress"] for p in rule["ports"]}
    assert opened == {"grpc", "metrics"}  # never the probe port, never anything else
    (metrics_rule,) = [r for r in server["spec"]["ingress"] if r["ports"][0]["port"] == "metrics"]
    assert metrics_rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    mlflow = _policy_for(docs, "mlflow")
    assert set(mlflow["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert [rule["from"] for rule in mlflow["spec"]["ingress"]] == [
        [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "forgedit-server"}}},
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow-bootstrap"}}},
        ]
    ]
    bootstrap = _policy_for(docs, "mlflow-bootstrap")
    assert bootstrap["spec"]["ingress"] == []
    assert bootstrap["spec"]["egress"][0]["to"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
    ]
    postgres = _policy_for(docs, "mlflow-postgres")
    assert [rule["from"] for rule in postgres["spec"]["ingress"]] == [
        [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    ]


def test_mlflow_runs_basic_auth_and_the_server_signs_in_from_a_secret(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    pod = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (mlflow,) = pod["containers"]
    assert "--app-name=basic-auth" in mlflow["args"]
    env = {e["name"]: e for e in mlflow["env"]}
    for key in (
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-secrets", "key": key}
    # The auth config (with the database password) is written at start into memory, never
    # committed: the init container writes where MLFLOW_AUTH_CONFIG_PATH points.
    (init,) = pod["initContainers"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] in init["args"][0]
    server_env = {e["name"]: e for e in server_container(docs)["env"]}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert server_env[key]["valueFrom"]["secretKeyRef"] == {
            "name": "forgedit-server-secrets",
            "key": key,
        }
    template = (K8S / "extras" / "mlflow-secrets.example.env").read_text()
    assert "MLFLOW_AUTH_ADMIN_PASSWORD=" in template
    # Nobody, the servers included, gets anything MLflow does not grant explicitly.
    assert "default_permission = NO_PERMISSIONS" in init["args"][0]


def _env_file(name: str) -> dict[str, str]:
    lines = (K8S / "extras" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_the_server_signs_in_as_a_non_admin_user_the_bootstrap_job_creates(
    build: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = build
    job = find(docs, "Job", "mlflow-bootstrap")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].split("/")[-1].startswith("forgedit-mlflow:")
    assert container["command"] == ["python", "/opt/forgedit-mlflow/bootstrap.py"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    # Signs in as the admin; creates the user the servers sign in with.
    assert refs == {
        "MLFLOW_TRACKING_USERNAME": {"name": "mlflow-secrets", "key": "MLFLOW_AUTH_ADMIN_USERNAME"},
        "MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-secrets", "key": "MLFLOW_AUTH_ADMIN_PASSWORD"},
        "FORGEDIT_MLFLOW_USERNAME": {
            "name": "forgedit-server-secrets",
            "key": "MLFLOW_TRACKING_USERNAME",
        },
        "FORGEDIT_MLFLOW_PASSWORD": {
            "name": "forgedit-server-secrets",
            "key": "MLFLOW_TRACKING_PASSWORD",
        },
    }
    # Re-applied after it finished and was cleaned up: a Job's template is immutable.
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    dockerfile = (REPO / "deploy" / "mlflow.Dockerfile").read_text()
    assert "COPY mlflow/bootstrap.py /opt/forgedit-mlflow/bootstrap.py" in dockerfile
    # The templates name two different users: the servers are not MLflow's admin.
    admin = _env_file("mlflow-secrets.example.env")["MLFLOW_AUTH_ADMIN_USERNAME"]
    server = _env_file("forgedit-server-secrets.example.env")["MLFLOW_TRACKING_USERNAME"]
    assert admin != server
    for name, spec in pod_specs(docs, ("Job",)):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        (c,) = spec["containers"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
