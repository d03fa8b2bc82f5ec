"""The scale-out contract, on a real fleet (``scripts/fleet.sh``): PostgreSQL, ``mlflow server
--app-name basic-auth``, three ``forgedit-server`` replicas signing in as a non-admin MLflow
user, Prometheus with the project's rules; clients are the SDK over the balanced target
(``load_balancing="affinity"``) or on one replica's address.

One fleet for the module; the scenarios run in file order and each leaves every replica up
and ready. On the shared 2-core development machine (load average ~6) the module took 5.5
minutes: 80 s to start the fleet, 150 s for the rolling restart (three replica restarts of
~30 s each under load), 37 s for SIGKILL (one restart), 25 s to stop the fleet.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from support.fleet import LocalFleet, job_replica, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.mlflow_server]

REPLICAS = 3
PHOTO = Path(__file__).resolve().parents[2] / "samples" / "photos" / "cat.jpg"
PROMPT = "A photo of a cat wearing a hat."
QUICK = {"updates": 2, "batch_size": 1, "steps": 2, "gammas": [0.6], "seeds": [3]}
SWEEP = {"steps": 2, "gammas": [0.6], "seeds": [3]}


def _tools_missing() -> str | None:
    if shutil.which("prometheus") is None:
        return "prometheus"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) and not shutil.which(
        "postgres"
    ):
        return "postgresql"
    return None


@pytest.fixture(scope="module")
def fleet() -> Iterator[LocalFleet]:
    missing = _tools_missing()
    if missing and os.environ.get("CI") != "true":
        pytest.skip(f"Debian's {missing} is not installed (scripts/tools.sh installs it as root)")
    # Not under pytest's tmp_path: run as root, PostgreSQL runs as the postgres user, which
    # must be able to reach its data directory (pytest's base directory is private, 0700).
    root = Path(tempfile.mkdtemp(prefix="forgedit-fleet-"))
    root.chmod(0o711)
    # torch on the tiny model: the ONNX export of "auto" would cost each start seconds.
    f = LocalFleet(root, replica_env={"FORGEDIT_UNET_BACKEND": "torch"})
    try:
        f.up(REPLICAS)
        yield f
        left = f.down()
        assert not left, f"fleet processes still alive after down: {left}"
    finally:
        if (root / "state.json").exists():
            f.run("down")
        shutil.rmtree(root, ignore_errors=True)


def _photo(variant: int = 0) -> bytes:
    """The sample photo, or a copy of it with one pixel changed: another image (its own
    sha256), so that no other scenario's edit model is reused for it."""
    if not variant:
        return PHOTO.read_bytes()
    from PIL import Image

    image = Image.open(PHOTO).convert("RGB")
    image.putpixel((0, 0), (variant % 256, variant // 256 % 256, 7))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _pngs(result: object) -> list[bytes]:
    return [i.png for i in sorted(result.images, key=lambda i: i.index)]  # type: ignore[attr-defined]


def test_one_edit_is_listed_sampled_and_identical_on_every_replica(fleet: LocalFleet) -> None:
    with fleet.client() as balanced:
        result = balanced.edit(_photo(), PROMPT, **QUICK).result()
    edit_model_id = result.edit_model_id
    assert result.registered is not None and not result.registered.spooled
    images = []
    for i in range(REPLICAS):
        with fleet.client(i) as one:
            assert edit_model_id in [m.edit_model_id for m in one.list_edit_models()]
            assert one.get_edit_model(edit_model_id).edit_model_id == edit_model_id
            images.append(_pngs(one.sample(edit_model_id, PROMPT, **SWEEP).result()))
    assert len(images[0]) == 1
    assert images[1:] == images[:-1], "replicas sampled different images for the same seeds"
    # The replica that trained it sampled the same bytes in the Edit itself.
    assert _pngs(result) == images[0]


def test_the_replicas_sign_in_to_mlflow_as_a_user_that_sees_only_its_own(
    fleet: LocalFleet,
) -> None:
    """The bootstrap (deploy/mlflow/bootstrap.py, as the manifests' Job runs it) made the
    replicas' MLflow user: not an admin, MANAGE on the edit-model experiment and registered
    model, nothing else (the auth config grants nothing by default)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    with fleet.mlflow_admin() as admin:
        other = f"someone-elses-{time.time_ns()}"
        admin.create_experiment(other)
        auth = get_app_client("basic-auth", tracking_uri=fleet.env["MLFLOW_TRACKING_URI"])
        assert auth.get_user("forgedit-server").is_admin is False
        for kind, name in (
            ("experiment", admin.get_experiment_by_name("forgedit-edit-models").experiment_id),
            ("registered_model", "forgedit-edit-models"),
        ):
            granted = auth.get_user_permission("forgedit-server", kind, name)
            assert granted.permission == "MANAGE", (kind, granted.permission)
    password = (fleet.root / "secrets" / "mlflow-service-password").read_text().strip()
    names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(dict(zip(names, ("forgedit-server", password), strict=True)))
    try:
        service = MlflowClient(fleet.env["MLFLOW_TRACKING_URI"])
        assert service.get_experiment_by_name("forgedit-edit-models") is not None
        assert [e.name for e in service.search_experiments()] == ["forgedit-edit-models"]
        with pytest.raises(MlflowException, match="403"):
            service.get_experiment_by_name(other)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def test_affinity_keeps_each_edit_models_samples_on_one_replica(fleet: LocalFleet) -> None:
    """gRPC's ring hash on the SDK's forgedit-affinity header (grpcio 1.85.1, with the
    environment variable the SDK sets): every Sample of one edit model through the balanced
    target runs on the same replica. (How models spread over the replicas depends on their
    random IDs; BENCHMARKS.md, "Fleet", measures it.)"""
    with fleet.client(0) as c0:
        models = [c0.edit(_photo(40 + i), PROMPT, **QUICK).result().edit_model_id for i in range(3)]
    homes: dict[str, set[int]] = {}
    with fleet.client() as balanced:
        for edit_model_id in models:
            for _ in range(3):
                job = balanced.sample(edit_model_id, PROMPT, **SWEEP).result().job_id
                homes.setdefault(edit_model_id, set()).add(job_replica(fleet, job))
    assert all(len(replicas) == 1 for replicas in homes.values()), homes


@pytest.mark.parametrize("fresh_seed", [False, True], ids=["derived-seed", "fresh-seed"])
def test_a_retried_edit_on_another_replica_returns_the_same_edit_model(
    fleet: LocalFleet, fresh_seed: bool
) -> None:
    request_id = f"retry-elsewhere-{fresh_seed}-{time.time_ns()}"
    options = {**QUICK, "fresh_seed": fresh_seed, "request_id": request_id}
    photo = _photo(10 + fresh_seed)
    with fleet.client(0) as first, fleet.client(1) as second:
        a = first.edit(photo, PROMPT, **options).result()
        b = second.edit(photo, PROMPT, **options).result()
    assert b.edit_model_id == a.edit_model_id
    # The retry's images are the registered model's, whichever replica answered.
    assert _pngs(b) == _pngs(a)
    key = hashlib.sha256(request_id.encode()).hexdigest()
    assert len(fleet.versions(request_key=key)) == 1
    assert len(fleet.versions(edit_model_id=a.edit_model_id)) == 1


def test_a_deletion_on_one_replica_is_refused_by_every_replica_at_once(
    fleet: LocalFleet,
) -> None:
    from forgedit_client.errors import ForgeditRpcError

    with fleet.client(0) as c0:
        edit_model_id = c0.edit(_photo(20), PROMPT, **QUICK).result().edit_model_id
    for i in range(REPLICAS):  # every replica holds it, in memory and on disk
        with fleet.client(i) as c:
            c.sample(edit_model_id, PROMPT, **SWEEP).result()
        assert fleet.cached_on_disk(i, edit_model_id)
    with fleet.client(2) as c2:
        c2.delete_edit_model(edit_model_id)
    deleted_at = time.monotonic()
    refused_after = []
    for i in range(REPLICAS):
        with fleet.client(i) as c, pytest.raises(ForgeditRpcError) as refused:
            c.sample(edit_model_id, PROMPT, **SWEEP).result()
        refused_after.append(time.monotonic() - deleted_at)
        assert refused.value.code == grpc.StatusCode.NOT_FOUND, refused.value
        assert not fleet.cached_on_disk(i, edit_model_id)  # and its copies are gone
    # The first Sample after the delete is refused (README: "from the moment the delete
    # returns"); the times are the Samples' own round trips.
    print(f"deletion refused on every replica within {max(refused_after):.3f} s")


def test_prometheus_scrapes_every_replica_with_the_projects_rules(fleet: LocalFleet) -> None:
    up = fleet.prometheus('up{app="forgedit-server"}')
    assert sorted(s["metric"]["pod"] for s in up if s["value"][1] == "1") == [
        f"forgedit-server-{i}" for i in range(REPLICAS)
    ]
    rules = {r.get("name"): r for r in fleet.prometheus_rules()}
    assert {"ForgeditReplicaDown", "ForgeditJobFailures", "forgedit:queue_depth:sum"} <= set(rules)
    assert rules["ForgeditReplicaDown"]["duration"] == 300
    assert rules["ForgeditReplicaDown"]["state"] == "inactive"


def test_sigkill_mid_training_the_retry_completes_elsewhere_and_the_alert_rule_fires(
    fleet: LocalFleet,
) -> None:
    from forgedit_client import TrainingProgress
    from forgedit_client.errors import ForgeditRpcError

    request_id = f"killed-mid-training-{time.time_ns()}"
    # Long enough to be killed mid-way (seconds on the tiny model); the derived seed.
    options = {**QUICK, "updates": 60, "request_id": request_id}
    with fleet.client() as balanced:
        stream = balanced.edit(_photo(30), PROMPT, **options)
        for event in stream:
            if isinstance(event, TrainingProgress):
                break
        victim = job_replica(fleet, stream.job_id)
        fleet.kill(victim)
        try:
            # The re-attach finds no job where it ran: the SDK submits the request again
            # under the same request id, and the ring sends it to another replica.
            result = stream.result()
        except ForgeditRpcError as lost:
            pytest.fail(f"the SDK did not carry the Edit over to another replica: {lost}")
    assert result.completed and result.edit_model_id and stream.resubmits == 1
    job_replica(fleet, result.job_id, [i for i in range(REPLICAS) if i != victim])
    key = hashlib.sha256(request_id.encode()).hexdigest()
    assert [v.tags["forgedit.edit_model_id"] for v in fleet.versions(request_key=key)] == [
        result.edit_model_id
    ]

    # Prometheus, evaluating the project's rule over the fleet's own series, sees it.
    alert = 'ALERTS{alertname="ForgeditReplicaDown"}'
    assert wait_until(lambda: fleet.prometheus(alert), timeout=30) is not None
    (series,) = fleet.prometheus(alert)
    assert series["metric"]["pod"] == f"forgedit-server-{victim}"
    # Pending: the rule's expression holds over the fleet's series; it fires once that has
    # lasted its `for:` (5 minutes, the project's rule unchanged), not waited for here.
    assert series["metric"]["alertstate"] == "pending"

    fleet.start(victim)  # back, with nothing of this request in its spool
    assert len(fleet.versions(request_key=key)) == 1
    assert wait_until(lambda: not fleet.prometheus(alert), timeout=30) is not None


def test_rolling_restart_under_load_loses_no_accepted_job(fleet: LocalFleet) -> None:
    import asyncio

    from support.load import load_driver

    driver = load_driver()
    report = asyncio.run(
        driver.drive_fleet(
            fleet.root / "env",
            duration_s=20.0,
            sample_clients=2,
            edit_clients=1,
            max_requests=400,
            deadline_s=240.0,
            updates=2,
            rolling_restart=True,
        )
    )
    statuses = report["status"]
    assert report["restarted"] == list(range(REPLICAS)), report
    failed = {k: {c: n for c, n in v.items() if c != "OK"} for k, v in statuses.items()}
    assert not any(failed.values()), (failed, report["errors"])
    assert report["accepted_not_completed"] == 0
    # The restarts were felt and the SDK's retries carried the calls through them.
    assert report["sdk_retries"] > 0, report
