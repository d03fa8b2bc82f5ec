"""The local fleet (``scripts/fleet.sh``) as the fleet tests and the fleet benchmark drive it:
started and stopped through the script itself, with its env file, its processes, the SDK over
the balanced target or one replica, Prometheus' HTTP API and MLflow (as its admin) for what
the fleet holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FLEET_SH = REPO / "scripts" / "fleet.sh"


class LocalFleet:
    """One fleet directory. ``up``/``down`` run ``fleet.sh``; the other methods read what
    ``up`` wrote (``env``, ``state.json``, ``secrets/``)."""

    def __init__(self, root: Path, *, replica_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.replica_env = replica_env or {}
        self.env: dict[str, str] = {}

    # -- the script -------------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.replica_env}
        done = subprocess.run(
            ["bash", str(FLEET_SH), "--dir", str(self.root), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"fleet.sh {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done

    def up(self, replicas: int = 3, scrape_interval: str = "1s") -> None:
        self.run("up", "--replicas", str(replicas), "--scrape-interval", scrape_interval)
        self.env = read_env(self.root / "env")

    def down(self) -> list[int]:
        """Stop the fleet; return the ids of the fleet's processes still alive (none)."""
        pids = self.pids()
        self.run("down")
        return [pid for pid in pids if _alive(pid)]

    def kill(self, replica: int) -> None:
        self.run("kill", str(replica))

    def start(self, replica: int) -> None:
        self.run("start", str(replica))

    def restart(self, replica: int) -> None:
        self.run("restart", str(replica))

    # -- what it runs -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.root / "state.json").read_text()))

    def pids(self) -> list[int]:
        state = self.state()
        procs = [state.get(k) for k in ("postgres", "mlflow", "prometheus")]
        procs += [r.get("proc") for r in state["replicas"]]
        return [p["pid"] for p in procs if p]

    @property
    def replicas(self) -> list[str]:
        return self.env["FORGEDIT_REPLICAS"].split(",")

    def replica_data(self, replica: int) -> Path:
        return self.root / f"replica-{replica}" / "data"

    def cached_on_disk(self, replica: int, edit_model_id: str) -> bool:
        return (
            self.replica_data(replica) / "registry" / "cache" / "models" / edit_model_id
        ).is_dir()

    def client(self, replica: int | None = None, **kwargs: Any) -> Any:
        """The SDK over every replica (``affinity``), or on one replica's address."""
        from forgedit_client import ForgeditClient

        if replica is None:
            kwargs.setdefault("load_balancing", self.env["FORGEDIT_LOAD_BALANCING"])
            target = self.env["FORGEDIT_SERVER"]
        else:
            target = self.replicas[replica]
        return ForgeditClient(target, token=self.env["FORGEDIT_TOKEN"], **kwargs)

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        url = f"{self.env['PROMETHEUS_URL']}/api/v1/query?" + urllib.parse.urlencode(
            {"query": query}
        )
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def prometheus_rules(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.env['PROMETHEUS_URL']}/api/v1/rules", timeout=10) as r:
            body = json.load(r)
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    @contextlib.contextmanager
    def mlflow_admin(self) -> Iterator[Any]:
        """An ``MlflowClient`` signed in as MLflow's admin, to count what the fleet holds (the
        replicas sign in as the non-admin service user). MLflow reads credentials from the
        environment on every request: they are set for the block only."""
        from mlflow import MlflowClient

        password = (self.root / "secrets" / "mlflow-admin-password").read_text().strip()
        names = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        saved = {n: os.environ.get(n) for n in names}
        os.environ.update(dict(zip(names, ("fleet-admin", password), strict=True)))
        try:
            yield MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def versions(self, **tags: str) -> list[Any]:
        """Model versions of the edit-model registered model carrying ``forgedit.<tag>``."""
        clauses = ["name = 'forgedit-edit-models'"]
        clauses += [f"tags.`forgedit.{k}` = '{v}'" for k, v in tags.items()]
        with self.mlflow_admin() as client:
            return list(client.search_model_versions(" and ".join(clauses), max_results=1000))


def read_env(path: Path) -> dict[str, str]:
    """The ``export NAME='value'`` lines of the fleet's env file."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def job_replica(fleet: LocalFleet, job_id: str, replicas: Sequence[int] | None = None) -> int:
    """The replica that holds job ``job_id`` (GetJob answers there only)."""
    from forgedit_client.errors import ForgeditRpcError

    for i in replicas if replicas is not None else range(len(fleet.replicas)):
        with fleet.client(i) as c:
            try:
                c.get_job(job_id, timeout=5)
            except ForgeditRpcError:
                continue
            return i
    raise LookupError(f"no replica holds {job_id}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> float | None:
    """Seconds until ``predicate()`` held, or None if it never did within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None
