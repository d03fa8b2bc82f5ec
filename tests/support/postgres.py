"""A throwaway PostgreSQL from Debian's packages, for tests that need MLflow on a real
PostgreSQL: a fresh cluster in a temporary directory, loopback only, on a free port.

Test-only: ``trust`` authentication on 127.0.0.1 (nothing else can connect). As root it runs as
Debian's ``postgres`` system user (PostgreSQL refuses to run as root), so the directory must be
reachable by that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from support.registry import free_port


def pg_bindir() -> Path | None:
    """Debian installs PostgreSQL's server programs under /usr/lib/postgresql/VERSION/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def _user() -> str | None:
    if os.geteuid() != 0:
        return None
    pwd.getpwnam("postgres")  # KeyError: Debian's package creates this user
    return "postgres"


@contextlib.contextmanager
def running_postgres(database: str = "mlflow") -> Iterator[str]:
    """A started PostgreSQL with an empty ``database``; yields its SQLAlchemy URI. Its files
    live in a fresh directory under the system's temporary directory (pytest's own is private
    to root, where the ``postgres`` user cannot reach), removed afterwards."""
    import psycopg

    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    user = _user()
    root = Path(tempfile.mkdtemp(prefix="forgedit-test-pg-", dir="/tmp"))
    pgdata = root / "pgdata"
    pgdata.mkdir(mode=0o700)
    if user is not None:
        for path in (root, pgdata):
            os.chown(path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    run_as = {"user": user, "group": user and pwd.getpwnam(user).pw_gid, "cwd": "/"}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        check=True,
        **run_as,  # type: ignore[arg-type]
    )
    port = free_port()
    log = open(root / "postgres.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(pgdata),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={port}",
            "-c",
            f"unix_socket_directories={pgdata}",
            "-c",
            "shared_buffers=16MB",
            "-c",
            "fsync=off",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **run_as,  # type: ignore[arg-type]
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
                ) as db:
                    db.execute(f'CREATE DATABASE "{database}"')
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start; see postgres.log") from None
                time.sleep(0.3)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # "fast" shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
