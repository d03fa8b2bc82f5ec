"""A local fleet on loopback, each part a real process: PostgreSQL (Debian's), ``mlflow server
--app-name basic-auth`` on it with proxied artifacts, N ``forgedit-server`` replicas, and
Prometheus scraping every replica with the project's rules. Run through ``scripts/fleet.sh``.

    up [--replicas N]     start everything, write DIR/env, return once every replica is ready
    down [--wipe]         stop everything by process id (and, with --wipe, delete DIR)
    status                what runs, as JSON
    stop|start|restart|kill REPLICA   one replica: SIGTERM (drain) / start / both / SIGKILL

Everything lives under DIR (``--dir``, default ``.forgedit-data/fleet``):

    env              FORGEDIT_SERVER, FORGEDIT_REPLICAS, FORGEDIT_TOKEN, FORGEDIT_LOAD_BALANCING,
                     MLFLOW_TRACKING_URI, PROMETHEUS_URL (shell-sourceable, mode 0600)
    state.json       ports and process ids (what ``down`` stops)
    secrets/         generated passwords and the token (0600), kept across up/down
    postgres/data    PGDATA (owned by the ``postgres`` user when run as root: PostgreSQL
                     refuses to run as root); its Unix socket is in that directory
    mlflow/          auth config (0600), proxied artifacts, log
    replica-N/       a replica's data directory (spool, cache) and log
    prometheus/      generated config, time series, log
    tiny-model/      the tiny model every replica serves (unless FORGEDIT_BASE_MODELS is set)

The MLflow side is set up as an operator would: PostgreSQL role ``mlflow`` owning databases
``mlflow`` (tracking and registry) and ``mlflow_auth`` (users); MLflow's admin is created on
first start; ``deploy/mlflow/bootstrap.py`` (also the Kubernetes Job) creates the experiment,
the registered model and the non-admin user ``forgedit-server`` with MANAGE on exactly those.
``default_permission = NO_PERMISSIONS``: the replicas see nothing else.

Replicas get every ``FORGEDIT_*`` variable of the caller's environment (e.g.
``FORGEDIT_UNET_BACKEND=torch``) except those the fleet sets itself (ports, data directory,
tokens, models unless given). Standard library plus grpcio and psycopg from ``.venv``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_DIR = REPO / ".forgedit-data" / "fleet"
RULES = REPO / "deploy" / "k8s" / "base" / "prometheus" / "forgedit-rules.yml"
BOOTSTRAP = REPO / "deploy" / "mlflow" / "bootstrap.py"
READINESS = "forgedit.v1.ForgeditService"
HOST = "127.0.0.1"
MLFLOW_ADMIN = "fleet-admin"
SERVICE_USER = "forgedit-server"  # the MLflow user the replicas sign in as (not an admin)
PRINCIPAL = "fleet"  # the principal of FORGEDIT_TOKEN
PG_SUPERUSER = "postgres"
PG_ROLE = "mlflow"
AUTH_CACHE_TTL_S = 60  # MLflow's cache of verified credentials (a changed password: <= 60 s)
# Variables the fleet sets for a replica; the caller's values of these are not passed on.
OWNED = {
    "FORGEDIT_DATA_DIR",
    "FORGEDIT_HOST",
    "FORGEDIT_GRPC_PORT",
    "FORGEDIT_HEALTH_PORT",
    "FORGEDIT_METRICS_PORT",
    "FORGEDIT_METRICS_HOST",
    "FORGEDIT_AUTH_TOKENS",
    "FORGEDIT_MLFLOW_TRACKING_URI",
    "FORGEDIT_CONFIG_FILE",
}


class FleetError(Exception):
    """Something the operator must look at; one line, naming the log to read."""


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A process the fleet started: its id and its start time (``/proc/PID/stat`` field 22),
    so that a recycled process id is never signalled."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, _start_time(pid) or 0)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            _reap()
            time.sleep(0.1)
        return True

    def stop(self, sig: int, grace: float, *, group: bool = False) -> None:
        """``sig``, then SIGKILL after ``grace`` seconds; with ``group``, the whole process
        group it leads (MLflow's workers)."""
        send = (lambda s: _killpg(self.pid, s)) if group else self.signal
        if self.alive():
            send(sig)
            if not self.wait_gone(grace):
                send(signal.SIGKILL)
                self.wait_gone(10.0)
        if group:
            deadline = time.monotonic() + 10.0
            while _group_alive(self.pid) and time.monotonic() < deadline:
                _killpg(self.pid, signal.SIGKILL)
                time.sleep(0.1)


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[19])


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap() -> None:
    """Collect exited children of this process (they are started without waiting)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _spawn(
    argv: list[str], log: Path, env: dict[str, str], *, user: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (it outlives this command), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            user=user,
            group=user and pwd.getpwnam(user).pw_gid,
            extra_groups=[] if user else None,
        )


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- state ---------------------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    grpc_port: int
    health_port: int
    metrics_port: int
    proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.grpc_port}"


@dataclass
class State:
    pg_port: int
    mlflow_port: int
    prometheus_port: int
    replicas: list[Replica]
    postgres: Proc | None = None
    mlflow: Proc | None = None
    prometheus: Proc | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        _write_private(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None

        def proc(d: dict[str, int] | None) -> Proc | None:
            return Proc(**d) if d else None

        replicas = [Replica(**{**r, "proc": proc(r.get("proc"))}) for r in raw.pop("replicas")]
        return cls(
            **{
                **raw,
                "replicas": replicas,
                "postgres": proc(raw.get("postgres")),
                "mlflow": proc(raw.get("mlflow")),
                "prometheus": proc(raw.get("prometheus")),
            }
        )

    def running(self) -> list[str]:
        parts = [("postgres", self.postgres), ("mlflow", self.mlflow)]
        parts += [("prometheus", self.prometheus)]
        parts += [(f"replica-{r.index}", r.proc) for r in self.replicas]
        return [name for name, p in parts if p is not None and p.alive()]


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while they are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


class Fleet:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.state_file = self.root / "state.json"
        self.env_file = self.root / "env"
        self.secrets = self.root / "secrets"
        self.pgdata = self.root / "postgres" / "data"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One fleet command at a time on this directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def secret(self, name: str) -> str:
        """A generated secret, kept across up/down (PostgreSQL's data outlives a run)."""
        self.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.secrets / name
        if not path.exists():
            _write_private(path, secrets.token_urlsafe(24))
        return path.read_text().strip()

    # -- up ----------------------------------------------------------------------------------

    def up(self, replicas: int, scrape_interval: str, timeout: float) -> State:
        old = State.load(self.state_file)
        if old is not None and old.running():
            raise FleetError(
                f"a fleet already runs here ({', '.join(old.running())}); run `down` first"
            )
        if old is not None:
            self.down(old)  # leftovers of a fleet that died: clear its state
        pg, ml, prom, *rest = _free_ports(3 + 3 * replicas)
        state = State(
            pg_port=pg,
            mlflow_port=ml,
            prometheus_port=prom,
            replicas=[
                Replica(i, rest[3 * i], rest[3 * i + 1], rest[3 * i + 2]) for i in range(replicas)
            ],
            extra={"scrape_interval": scrape_interval},
        )
        try:
            # The replicas load their models while MLflow starts: they call it only when a
            # request needs it, by which time the bootstrap below has made their user.
            models = self.base_models()
            for replica in state.replicas:
                self.start_replica(state, replica, models, wait=False)
            self.start_postgres(state)
            self.start_mlflow(state)
            self.bootstrap_mlflow(state)
            self.start_prometheus(state, scrape_interval)
            deadline = time.monotonic() + timeout
            for replica in state.replicas:
                self.wait_ready(state, replica, deadline)
            self.wait_prometheus(state, deadline)
            self.write_env(state)
        except BaseException:
            self.down(state)
            raise
        return state

    def start_postgres(self, state: State) -> None:
        """Debian's PostgreSQL on ``pg_port``, loopback only, its socket in PGDATA; the
        database cluster is created on first use (superuser password from secrets/)."""
        bindir = _pg_bindir()
        user = _pg_user()
        log = self.root / "postgres" / "postgres.log"
        (self.root / "postgres").mkdir(parents=True, exist_ok=True)
        superuser_pw = self.secret("postgres-password")
        if not (self.pgdata / "PG_VERSION").exists():
            shutil.rmtree(self.pgdata, ignore_errors=True)
            self.pgdata.mkdir(mode=0o700)
            pwfile = self.root / "postgres" / ".initdb-pw"
            _write_private(pwfile, superuser_pw + "\n")
            if user is not None:
                uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
                os.chown(self.pgdata, uid, gid)
                os.chown(pwfile, uid, gid)
            try:
                done = subprocess.run(
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(self.pgdata),
                        "-U",
                        PG_SUPERUSER,
                        f"--pwfile={pwfile}",
                        "--auth=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    user=user,
                    group=user and pwd.getpwnam(user).pw_gid,
                    extra_groups=[] if user else None,
                    cwd="/",
                    check=False,
                )
            finally:
                pwfile.unlink(missing_ok=True)
            if done.returncode != 0:
                shutil.rmtree(self.pgdata, ignore_errors=True)
                raise FleetError(
                    "initdb failed (the data directory and every folder above it must be "
                    f"reachable by the user {user or 'running this'}):\n"
                    + done.stdout.decode(errors="replace")[-1500:]
                )
        proc = _spawn(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.pgdata),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                f"port={state.pg_port}",
                "-c",
                f"unix_socket_directories={self.pgdata}",
                "-c",
                "max_connections=50",
                "-c",
                "shared_buffers=32MB",
            ],
            log,
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            user=user,
        )
        state.postgres = Proc.of(proc.pid)
        state.save(self.state_file)
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.pg_connect(state, "postgres") as db:
                    self.create_mlflow_databases(db)
                return
            except Exception as e:  # psycopg.OperationalError while it starts
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise FleetError(
                        f"PostgreSQL did not start ({type(e).__name__}); "
                        f"{log.relative_to(self.root)}:\n{_tail(log)}"
                    ) from None
                time.sleep(0.3)

    @contextlib.contextmanager
    def pg_connect(self, state: State, dbname: str) -> Iterator[Any]:
        import psycopg

        db = psycopg.connect(
            host=HOST,
            port=state.pg_port,
            dbname=dbname,
            user=PG_SUPERUSER,
            password=self.secret("postgres-password"),
            connect_timeout=5,
            autocommit=True,
        )
        try:
            yield db
        finally:
            db.close()

    def create_mlflow_databases(self, db: Any) -> None:
        """Role ``mlflow`` (login, password from secrets/) owning ``mlflow`` and
        ``mlflow_auth``; idempotent, and the password is reset to the stored one."""
        from psycopg import sql

        password = self.secret("mlflow-db-password")
        with db.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_ROLE,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(
                sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(PG_ROLE), sql.Literal(password)
                )
            )
            for name in ("mlflow", "mlflow_auth"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(
                        sql.SQL("CREATE DATABASE {} OWNER {}").format(
                            sql.Identifier(name), sql.Identifier(PG_ROLE)
                        )
                    )

    def db_uri(self, state: State, dbname: str) -> str:
        return (
            f"postgresql://{PG_ROLE}:{self.secret('mlflow-db-password')}"
            f"@{HOST}:{state.pg_port}/{dbname}"
        )

    def start_mlflow(self, state: State) -> None:
        """``mlflow server --app-name basic-auth`` on PostgreSQL, artifacts proxied to a local
        directory. Database URLs travel in the environment and the auth config (0600), never
        in the process's arguments."""
        home = self.root / "mlflow"
        (home / "artifacts").mkdir(parents=True, exist_ok=True)
        auth_ini = home / "basic_auth.ini"
        _write_private(
            auth_ini,
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {self.db_uri(state, 'mlflow_auth')}\n"
            f"admin_username = {MLFLOW_ADMIN}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
            # Each request's password check is a PBKDF2 hash (~0.5 s of CPU here): without
            # this cache every MLflow call of a replica costs that much (see deploy/README.md).
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FORGEDIT_"))}
        env.update(
            {
                "MLFLOW_BACKEND_STORE_URI": self.db_uri(state, "mlflow"),
                "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("mlflow-admin-password"),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("mlflow-flask-key"),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
            }
        )
        log = home / "mlflow.log"
        proc = _spawn(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                HOST,
                "--port",
                str(state.mlflow_port),
                "--workers",
                "1",
                "--serve-artifacts",
                "--artifacts-destination",
                str(home / "artifacts"),
            ],
            log,
            env,
        )
        state.mlflow = Proc.of(proc.pid)
        state.save(self.state_file)
        deadline = time.monotonic() + 120
        while not _http_ok(f"http://{HOST}:{state.mlflow_port}/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FleetError(
                    f"mlflow server did not become healthy; mlflow/mlflow.log:\n{_tail(log)}"
                )
            time.sleep(0.3)

    def bootstrap_mlflow(self, state: State) -> None:
        """deploy/mlflow/bootstrap.py as MLflow's admin: experiment, registered model, the
        service user and its two grants."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FORGEDIT_"))}
        env.update(
            {
                "MLFLOW_TRACKING_URI": f"http://{HOST}:{state.mlflow_port}",
                "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN,
                "MLFLOW_TRACKING_PASSWORD": self.secret("mlflow-admin-password"),
                "FORGEDIT_MLFLOW_USERNAME": SERVICE_USER,
                "FORGEDIT_MLFLOW_PASSWORD": self.secret("mlflow-service-password"),
                "FORGEDIT_BOOTSTRAP_WAIT_S": "60",
                "MLFLOW_DISABLE_TELEMETRY": "true",
            }
        )
        done = subprocess.run(
            [sys.executable, str(BOOTSTRAP)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        out = done.stdout.decode(errors="replace")
        (self.root / "mlflow" / "bootstrap.log").write_text(out)
        if done.returncode != 0:
            raise FleetError(f"the MLflow bootstrap failed:\n{out[-1500:]}")

    def base_models(self) -> dict[str, str]:
        """The replicas' model settings: the caller's, or the tiny model written once here."""
        if os.environ.get("FORGEDIT_BASE_MODELS"):
            return {}
        tiny = self.root / "tiny-model"
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from forgedit.zoo.tiny import ensure_tiny_model; "
                "ensure_tiny_model(sys.argv[1])",
                str(tiny),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace")[-1500:]
            raise FleetError(f"the tiny model could not be written:\n{output}")
        return {
            "FORGEDIT_BASE_MODELS": json.dumps({"tiny": str(tiny / "stable-diffusion")}),
            "FORGEDIT_BLIP_DIR": str(tiny / "blip"),
        }

    def replica_env(self, state: State, replica: Replica, models: dict[str, str]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MLFLOW_") and k.upper() not in OWNED
        }
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("MKL_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        tokens = [{"name": PRINCIPAL, "token": self.secret("forgedit-token")}]
        env.update(models)
        env.update(
            {
                "FORGEDIT_DATA_DIR": str(self.root / f"replica-{replica.index}" / "data"),
                "FORGEDIT_HOST": HOST,
                "FORGEDIT_GRPC_PORT": str(replica.grpc_port),
                "FORGEDIT_HEALTH_PORT": str(replica.health_port),
                "FORGEDIT_METRICS_PORT": str(replica.metrics_port),
                "FORGEDIT_METRICS_HOST": HOST,
                "FORGEDIT_AUTH_TOKENS": json.dumps(tokens),
                "MLFLOW_TRACKING_URI": f"http://{HOST}:{state.mlflow_port}",
                "MLFLOW_TRACKING_USERNAME": SERVICE_USER,
                "MLFLOW_TRACKING_PASSWORD": self.secret("mlflow-service-password"),
            }
        )
        return env

    def start_replica(
        self,
        state: State,
        replica: Replica,
        models: dict[str, str] | None = None,
        *,
        wait: bool = True,
        timeout: float = 300.0,
    ) -> None:
        if replica.proc is not None and replica.proc.alive():
            raise FleetError(f"replica {replica.index} runs already (pid {replica.proc.pid})")
        if models is None:
            models = self.base_models()
        log = self.root / f"replica-{replica.index}" / "server.log"
        proc = _spawn(
            [str(VENV_BIN / "forgedit-server")], log, self.replica_env(state, replica, models)
        )
        replica.proc = Proc.of(proc.pid)
        state.save(self.state_file)
        if wait:
            self.wait_ready(state, replica, time.monotonic() + timeout)

    def wait_ready(self, state: State, replica: Replica, deadline: float) -> None:
        """Until the replica's probe port says SERVING for the service (readiness)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        log = self.root / f"replica-{replica.index}" / "server.log"
        with grpc.insecure_channel(f"{HOST}:{replica.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=READINESS)
            while True:
                if replica.proc is None or not replica.proc.alive():
                    raise FleetError(
                        f"replica {replica.index} exited while starting; "
                        f"replica-{replica.index}/server.log:\n{_tail(log)}"
                    )
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(request, timeout=2).status == 1:  # SERVING
                        return
                if time.monotonic() > deadline:
                    raise FleetError(
                        f"replica {replica.index} was not ready in time; "
                        f"replica-{replica.index}/server.log:\n{_tail(log)}"
                    )
                time.sleep(0.3)

    def start_prometheus(self, state: State, scrape_interval: str) -> None:
        """Debian's Prometheus with the project's rule file, one target per replica labelled
        as the Kubernetes pod discovery labels them (app, pod, namespace)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise FleetError("prometheus is not installed (Debian: apt-get install prometheus)")
        home = self.root / "prometheus"
        (home / "data").mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "forgedit-pods",
                    "static_configs": [
                        {
                            "targets": [f"{HOST}:{r.metrics_port}"],
                            "labels": {
                                "app": "forgedit-server",
                                "namespace": "fleet",
                                "pod": f"forgedit-server-{r.index}",
                            },
                        }
                        for r in state.replicas
                    ],
                }
            ],
        }
        # JSON is YAML: no YAML library needed.
        (home / "prometheus.yml").write_text(json.dumps(config, indent=2) + "\n")
        proc = _spawn(
            [
                binary,
                f"--config.file={home / 'prometheus.yml'}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address={HOST}:{state.prometheus_port}",
                "--storage.tsdb.retention.time=1d",
            ],
            home / "prometheus.log",
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        state.prometheus = Proc.of(proc.pid)
        state.save(self.state_file)

    def wait_prometheus(self, state: State, deadline: float) -> None:
        log = self.root / "prometheus" / "prometheus.log"
        while not _http_ok(f"http://{HOST}:{state.prometheus_port}/-/ready"):
            if state.prometheus is None or not state.prometheus.alive():
                raise FleetError(f"prometheus exited; prometheus/prometheus.log:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise FleetError(f"prometheus not ready; prometheus/prometheus.log:\n{_tail(log)}")
            time.sleep(0.3)

    def write_env(self, state: State) -> None:
        addresses = ",".join(r.address for r in state.replicas)
        values = {
            # One gRPC target over every replica (the SDK CLI's --server).
            "FORGEDIT_SERVER": f"ipv4:{addresses}",
            "FORGEDIT_REPLICAS": addresses,
            "FORGEDIT_TOKEN": self.secret("forgedit-token"),
            "FORGEDIT_LOAD_BALANCING": "affinity",
            "FORGEDIT_FLEET_DIR": str(self.root),
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{state.mlflow_port}",
            "PROMETHEUS_URL": f"http://{HOST}:{state.prometheus_port}",
        }
        _write_private(self.env_file, "".join(f"export {k}='{v}'\n" for k, v in values.items()))

    # -- down --------------------------------------------------------------------------------

    def down(self, state: State | None = None) -> list[str]:
        """Stop every process of the fleet by its id (replicas drain first); return what is
        still alive afterwards (nothing, normally)."""
        state = state or State.load(self.state_file)
        if state is None:
            return []
        # Every replica drains at once (each waits for its own running jobs).
        running = [r.proc for r in state.replicas if r.proc is not None and r.proc.alive()]
        for proc in running:
            proc.signal(signal.SIGTERM)
        for replica in state.replicas:
            self.stop_replica(state, replica, save=False)
        if state.prometheus is not None:
            state.prometheus.stop(signal.SIGTERM, 20.0)
        if state.mlflow is not None:
            state.mlflow.stop(signal.SIGTERM, 15.0, group=True)
        if state.postgres is not None:
            state.postgres.stop(signal.SIGINT, 30.0)  # "fast" shutdown
        left = state.running()
        if state.mlflow is not None and _group_alive(state.mlflow.pid):
            left.append("mlflow workers")
        if not left:
            self.state_file.unlink(missing_ok=True)
            self.env_file.unlink(missing_ok=True)
        return left

    def stop_replica(self, state: State, replica: Replica, *, save: bool = True) -> None:
        """SIGTERM: the replica drains (running jobs get its grace period), then exits."""
        if replica.proc is not None:
            replica.proc.stop(signal.SIGTERM, 120.0)
            replica.proc = None
        if save:
            state.save(self.state_file)

    def kill_replica(self, state: State, replica: Replica) -> None:
        if replica.proc is not None:
            replica.proc.stop(signal.SIGKILL, 10.0)
            replica.proc = None
        state.save(self.state_file)


def _pg_bindir() -> Path:
    """Debian installs PostgreSQL's server programs under /usr/lib/postgresql/VERSION/bin."""
    given = os.environ.get("FORGEDIT_PG_BINDIR")
    if given:
        return Path(given)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).resolve().parent
    raise FleetError("PostgreSQL is not installed (Debian: apt-get install postgresql)")


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as Debian's ``postgres`` system
    user; otherwise as whoever runs the fleet."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise FleetError(
            "running as root, PostgreSQL needs the 'postgres' system user "
            "(Debian's postgresql package creates it)"
        ) from None
    return "postgres"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the fleet lives")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the fleet; return when every replica is ready")
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument("--scrape-interval", default="5s", help="Prometheus scrape and rule interval")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    down = sub.add_parser("down", help="stop everything by process id")
    down.add_argument("--wipe", action="store_true", help="then delete the fleet directory")
    sub.add_parser("status", help="ports and processes, as JSON")
    for name, what in (
        ("stop", "SIGTERM one replica (it drains) and wait for it to exit"),
        ("start", "start one replica again and wait until it is ready"),
        ("restart", "stop, then start one replica"),
        ("kill", "SIGKILL one replica"),
    ):
        one = sub.add_parser(name, help=what)
        one.add_argument("replica", type=int)
    args = parser.parse_args(argv)
    if args.command == "up" and not 1 <= args.replicas <= 16:
        parser.error("--replicas must be 1..16")

    fleet = Fleet(args.dir)
    try:
        with fleet.locked():
            if args.command == "up":
                state = fleet.up(args.replicas, args.scrape_interval, args.timeout)
                print(
                    f"fleet: {len(state.replicas)} replicas ready; source {_shown(fleet.env_file)}",
                    file=sys.stderr,
                )
                return 0
            if args.command == "down":
                left = fleet.down()
                if left:
                    print(f"fleet: still running: {', '.join(left)}", file=sys.stderr)
                    return 1
                if args.wipe:
                    shutil.rmtree(fleet.root)
                print("fleet: stopped", file=sys.stderr)
                return 0
            found = State.load(fleet.state_file)
            if found is None:
                raise FleetError(f"no fleet in {_shown(fleet.root)}; run `up` first")
            state = found
            if args.command == "status":
                print(json.dumps({**asdict(state), "running": state.running()}, indent=2))
                return 0
            if not 0 <= args.replica < len(state.replicas):
                raise FleetError(f"replica must be 0..{len(state.replicas) - 1}")
            replica = state.replicas[args.replica]
            if args.command in ("stop", "restart"):
                fleet.stop_replica(state, replica)
            if args.command == "kill":
                fleet.kill_replica(state, replica)
            if args.command in ("start", "restart"):
                fleet.start_replica(state, replica)
            return 0
    except FleetError as e:
        print(f"fleet: {e}", file=sys.stderr)
        return 1


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (no absolute paths in messages)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


if __name__ == "__main__":
    sys.exit(main())
