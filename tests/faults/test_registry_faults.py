"""Registry fault scenarios against a real ``mlflow server``, one fault per test, resources
checked afterwards (server processes gone, spool empty, exactly one version).

The server is started by each test on a free loopback port with its own SQLite store and
artifact folder, killed with SIGKILL where the scenario says so, and restarted on the same port
and stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from support.registry import MlflowServer, free_port, random_edit_model

from registry import EditModelRegistry, RegistryConfig

pytestmark = pytest.mark.mlflow_server

MODEL = "fault-edit-models"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    s = MlflowServer(tmp_path / "mlflow")
    s.start()
    yield s
    s.stop()
    assert not s.group_alive(), "mlflow server processes outlived stop()"


def config(data_dir: Path, uri: str) -> RegistryConfig:
    return RegistryConfig(
        data_dir=data_dir, tracking_uri=uri, registered_model=MODEL, experiment=MODEL
    )


def versions(server: MlflowServer) -> list[object]:
    """Read the server's own store directly (works while the server is dead)."""
    client = MlflowClient(server.backend_uri, server.backend_uri)
    try:
        return list(client.search_model_versions(f"name = '{MODEL}'"))
    except Exception as e:  # the registered model does not exist yet
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
            return []
        raise


def test_server_killed_mid_upload_then_spool_registers_exactly_once(
    server: MlflowServer, tmp_path: Path
) -> None:
    reg = EditModelRegistry(config(tmp_path / "replica", server.uri))
    reg._backend.experiment_id()  # experiment and registered model exist before the fault
    # ~64 MB of delta, so the upload is still going when the first file lands.
    em = random_edit_model(1, shapes={"unet.down_blocks.1.big.weight": (32 * 1024 * 1024,)})

    killed = threading.Event()

    def kill_when_upload_starts() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(p.is_file() for p in server.artifacts_dir.rglob("*")):
                server.kill()
                killed.set()
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_when_upload_starts)
    killer.start()
    result = reg.register(em, request_id="mid-upload")
    killer.join()
    assert killed.is_set(), "the upload finished before the server could be killed"
    assert result.spooled and result.version is None
    assert versions(server) == []  # no reader can see a partial model
    assert reg.fetch(result.edit_model_id).source == "spool"  # usable here meanwhile
    assert reg.flush_spool().registered == []  # still down

    server.start()  # same port, same store
    flushed = reg.flush_spool()
    assert flushed.registered == [result.edit_model_id] and flushed.remaining == 0
    found = versions(server)
    assert len(found) == 1
    # The interrupted run was finished, not duplicated.
    client = MlflowClient(server.uri, server.uri)
    exp = client.get_experiment_by_name(MODEL)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    other = EditModelRegistry(config(tmp_path / "other-replica", server.uri))
    fetched = other.load(result.edit_model_id)
    assert torch.equal(
        fetched.delta["unet.down_blocks.1.big.weight"], em.delta["unet.down_blocks.1.big.weight"]
    )
    assert reg.spool_size() == (0, 0)
    assert reg.register(em, request_id="mid-upload").version == 1
    assert len(versions(server)) == 1


TESTS = Path(__file__).resolve().parents[1]

REGISTER_WHILE_DOWN = textwrap.dedent(
    """
    import json, sys
    from registry import EditModelRegistry, RegistryConfig
    from support.registry import random_edit_model

    data_dir, uri, name = sys.argv[1:4]
    reg = EditModelRegistry(RegistryConfig(
        data_dir=data_dir, tracking_uri=uri, registered_model=name, experiment=name))
    result = reg.register(random_edit_model(7), request_id="survives-restart")
    print(json.dumps({"id": result.edit_model_id, "spooled": result.spooled}))
    """
)

RESTARTED = textwrap.dedent(
    """
    import json, sys, time
    from registry import EditModelRegistry, RegistryConfig

    data_dir, uri, name, model_id = sys.argv[1:5]
    reg = EditModelRegistry(RegistryConfig(
        data_dir=data_dir, tracking_uri=uri, registered_model=name, experiment=name,
        flush_initial_backoff_s=0.1))
    source = reg.fetch(model_id).source
    reg.start()
    deadline = time.monotonic() + 120
    while reg.spool_size()[0] and time.monotonic() < deadline:
        time.sleep(0.1)
    reg.close()
    info = reg.show(model_id)
    print(json.dumps({"source": source, "status": info.status, "version": info.version}))
    """
)


def run_script(script: str, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        timeout=240,
        # The child imports the tests' helpers (support.registry) from tests/.
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)},
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def test_a_spooled_model_survives_a_restart_of_the_registering_process(
    server: MlflowServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "replica"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    first = run_script(REGISTER_WHILE_DOWN, str(data_dir), dead, MODEL)
    assert first["spooled"] is True
    model_id = str(first["id"])
    assert (data_dir / "spool" / "entries" / model_id / "entry.json").is_file()

    second = run_script(RESTARTED, str(data_dir), server.uri, MODEL, model_id)
    assert second == {"source": "spool", "status": "registered", "version": 1}
    assert len(versions(server)) == 1
    assert list((data_dir / "spool" / "entries").iterdir()) == []

    fetched = EditModelRegistry(config(tmp_path / "elsewhere", server.uri)).load(model_id)
    expected = random_edit_model(7)
    assert all(torch.equal(fetched.delta[k], expected.delta[k]) for k in expected.delta)
