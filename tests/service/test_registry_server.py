"""The registry against both back ends: the embedded SQLite store and a real ``mlflow server``
process on a free loopback port (one server for the module, stopped by PID at the end).

Each test gets its own registered model and experiment, and its own replica data directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from support.registry import MlflowServer, random_edit_model

from forgedit.artifact import DELTA_FILE, load_edit_model
from registry import (
    EditModelNotFoundError,
    EditModelRegistry,
    RegistryConfig,
    RegistryIntegrityError,
)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()
    assert not server.group_alive(), "mlflow server processes outlived stop()"


@pytest.fixture(scope="module")
def embedded_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("embedded-store")
    with EditModelRegistry(RegistryConfig(data_dir=root)) as reg:
        reg._backend.experiment_id()
        return reg.config.resolved_tracking_uri


@pytest.fixture(
    params=["embedded", pytest.param("server", marks=pytest.mark.mlflow_server)],
)
def backend(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(tracking URI, the directory under which the store keeps artifact bytes)."""
    if request.param == "server":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        return server.uri, server.artifacts_dir
    uri: str = request.getfixturevalue("embedded_store")
    return uri, Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"


class Replicas:
    def __init__(self, root: Path, uri: str) -> None:
        self.root, self.uri = root, uri
        self.name = f"edit-models-{uuid.uuid4().hex[:8]}"
        self.made: list[EditModelRegistry] = []

    def config(self, name: str) -> RegistryConfig:
        return RegistryConfig(
            data_dir=self.root / name,
            tracking_uri=self.uri,
            registered_model=self.name,
            experiment=self.name,
        )

    def __call__(self, name: str = "a") -> EditModelRegistry:
        reg = EditModelRegistry(self.config(name))
        self.made.append(reg)
        return reg

    def version_count(self) -> int:
        client = MlflowClient(self.uri, self.uri)
        return len(client.search_model_versions(f"name = '{self.name}'"))


@pytest.fixture()
def replicas(tmp_path: Path, backend: tuple[str, Path]) -> Iterator[Replicas]:
    r = Replicas(tmp_path, backend[0])
    yield r
    for reg in r.made:
        reg.close()


def test_round_trip(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    em = random_edit_model(1)
    png = b"\x89PNG\r\n\x1a\nimage"
    result = a.register(em, request_id="rt", input_image=png, contact_sheet=png)
    assert result.version == 1 and not result.spooled
    model_id = result.edit_model_id
    assert [i.edit_model_id for i in b.list_models().items] == [model_id]
    assert b.show(model_id).request_id == "rt"
    fetched = b.fetch(model_id)
    assert fetched.source == "download"
    got = load_edit_model(fetched.path, expected_base_fingerprint=em.base_model_fingerprint)
    assert all(torch.equal(got.delta[k], em.delta[k]) for k in em.delta)
    run_id = b.show(model_id).run_id
    assert run_id is not None
    client = MlflowClient(replicas.uri, replicas.uri)
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == em.loss_curve
    b.delete(model_id)
    with pytest.raises(EditModelNotFoundError):
        a.fetch(model_id)
    assert replicas.version_count() == 0
    if replicas.uri.startswith("http"):
        # A tracking server, and the registry not given its database: soft-deleted, bytes gone
        # (with the database URI the run is purged: tests/service/test_registry_deletion.py).
        assert client.get_run(run_id).info.lifecycle_stage == "deleted"
        assert client.list_artifacts(run_id) == []
    else:  # the embedded store is a database the registry reaches: purged
        with pytest.raises(MlflowException, match="not found"):
            client.get_run(run_id)


def test_idempotent_retry_and_dedupe(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    first = a.register(random_edit_model(2), request_id="job-1")
    assert b.register(random_edit_model(2), request_id="job-1") == first
    deduped = b.register(random_edit_model(2), request_id="job-2")
    assert deduped.deduped and deduped.edit_model_id == first.edit_model_id
    assert not b.register(random_edit_model(3), request_id="job-3").deduped
    assert replicas.version_count() == 2


FETCH_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from registry import EditModelRegistry, RegistryConfig

    args = json.loads(sys.argv[1])
    reg = EditModelRegistry(RegistryConfig(
        data_dir=args["data_dir"], tracking_uri=args["uri"],
        registered_model=args["name"], experiment=args["name"]))
    real_download = reg._backend.download_dir

    def slow_download(*a, **k):
        # Widen the window in which the other process asks for the same ID.
        Path(args["marker"] + "." + str(__import__("os").getpid())).write_text("downloading")
        time.sleep(1.0)
        return real_download(*a, **k)

    reg._backend.download_dir = slow_download
    go = Path(args["go"])
    while not go.exists():
        time.sleep(0.005)
    fetched = reg.fetch(args["id"])
    print(json.dumps({"source": fetched.source, "path": str(fetched.path)}))
    """
)


def test_two_processes_fetching_the_same_id_download_once(
    replicas: Replicas, tmp_path: Path
) -> None:
    model_id = replicas("registrar").register(random_edit_model(4)).edit_model_id
    go = tmp_path / "go"
    marker = tmp_path / "downloading"
    args = {
        "data_dir": str(tmp_path / "shared-replica"),
        "uri": replicas.uri,
        "name": replicas.name,
        "go": str(go),
        "marker": str(marker),
        "id": model_id,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FETCH_SCRIPT, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.write_text("go")
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-2000:]
        outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert sorted(o["source"] for o in outputs) == ["cache", "download"]
    assert len(list(tmp_path.glob("downloading.*"))) == 1  # one process downloaded
    assert outputs[0]["path"] == outputs[1]["path"]


def test_a_corrupted_artifact_byte_is_detected(
    replicas: Replicas, backend: tuple[str, Path]
) -> None:
    a = replicas("a")
    model_id = a.register(random_edit_model(5)).edit_model_id
    run_id = a.show(model_id).run_id
    assert run_id is not None
    stored = [p for p in backend[1].rglob(DELTA_FILE) if run_id in p.parts]
    assert len(stored) == 1
    data = bytearray(stored[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    stored[0].write_bytes(bytes(data))
    b = replicas("b")
    with pytest.raises(RegistryIntegrityError):
        b.fetch(model_id)
    assert b._disk.ids() == []


@pytest.mark.mlflow_server
def test_pyfunc_loads_through_the_tracking_server(
    mlflow_server: MlflowServer,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A data scientist's path: MLFLOW_TRACKING_URI + models:/NAME/VERSION over HTTP."""
    import base64

    import mlflow.pyfunc
    import numpy as np
    from PIL import Image

    from forgedit.config import Stage, TrainingConfig
    from forgedit.engine import Engine

    base_dir = tiny_model_dir / "stable-diffusion"
    engine = Engine.load(base_dir)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8))
    config = TrainingConfig.for_mode(
        "joint",
        height=64,
        width=64,
        seed=1,
        stages=(Stage("joint", updates=1, batch_size=1, unet_lr=6e-5, text_lr=1e-3),),
    )
    edit_model = engine.finetune(image, "A photo of noise", config, image_sha256="a" * 64)
    replicas = Replicas(tmp_path, mlflow_server.uri)
    result = replicas("a").register(edit_model)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("FORGEDIT_BASE_MODEL_DIR", str(base_dir))  # the env fallback
    model = mlflow.pyfunc.load_model(f"models:/{replicas.name}/{result.version}")
    out = model.predict([{"prompt": "a photo of green noise", "steps": 1, "gammas": [0.6]}])
    assert len(out) == 1 and out["gamma"][0] == 0.6
    png = base64.b64decode(out["png_base64"][0])
    assert png.startswith(b"\x89PNG")
