"""Deletion that deletes (issue 20.6), proved on MLflow's own storage: after ``delete``
returns, a scan of every row of every table of MLflow's database finds nothing of the edit
model (its ID, run ID, image hash, caption, request id, labels), and MLflow's artifact store
holds none of its files, nor does the replica's cache. A second edit model registered beside it
is found by the same scan and survives, so the scan can fail and the deletion is exact.

Against a real ``mlflow server`` (proxied artifacts), on SQLite and on PostgreSQL (Debian's
package, started in a temporary directory); the registry purges runs through the database URI
(``RegistryConfig.backend_store_uri``). About 40 s per backend on the shared 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from support.postgres import pg_bindir, running_postgres
from support.registry import MlflowServer, random_edit_model

from registry import EditModelNotFoundError, EditModelRegistry, RegistryConfig

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]

PNG = b"\x89PNG\r\n\x1a\n" + b"input image bytes"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[MlflowServer, str]]:
    """(a started mlflow server, its database URI)."""
    root = tmp_path / "mlflow"
    if request.param == "postgresql":
        if pg_bindir() is None:
            pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        with running_postgres() as uri:
            server = MlflowServer(root)
            server.backend_uri = uri
            server.start()
            try:
                yield server, uri
            finally:
                server.stop()
    else:
        server = MlflowServer(root)
        server.start()
        try:
            yield server, server.backend_uri
        finally:
            server.stop()


def every_row(uri: str) -> list[tuple[str, str]]:
    """(table, the row as text) for every row of every table of the database."""
    engine = sqlalchemy.create_engine(uri)
    rows = []
    try:
        with engine.connect() as db:
            for table in sqlalchemy.inspect(db).get_table_names():
                for row in db.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')):
                    rows.append((table, " | ".join(map(str, row))))
    finally:
        engine.dispose()
    return rows


def traces(rows: list[tuple[str, str]], needles: dict[str, str]) -> dict[str, list[str]]:
    """Which of ``needles`` (name: text) appear in which tables."""
    found: dict[str, list[str]] = {}
    for name, needle in needles.items():
        tables = sorted({t for t, row in rows if needle in row})
        if tables:
            found[name] = tables
    return found


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_deleted_edit_model_leaves_nothing_in_mlflow_or_the_cache(
    store: tuple[MlflowServer, str], tmp_path: Path
) -> None:
    server, db_uri = store
    config = RegistryConfig(
        data_dir=tmp_path / "replica",
        tracking_uri=server.uri,
        backend_store_uri=db_uri,
        http_timeout_s=30,
    )
    with EditModelRegistry(config) as reg:
        models = {}
        for name, seed in (("deleted", 1), ("kept", 2)):
            em = random_edit_model(seed)
            result = reg.register(
                em,
                request_id=f"request-{name}-{seed}",
                input_image=PNG,
                contact_sheet=PNG,
                labels={"customer": f"acme-{name}", "purpose": "tryout"},
                ttl_s=3600,
            )
            assert not result.spooled
            info = reg.show(result.edit_model_id)
            assert info.labels == {"customer": f"acme-{name}", "purpose": "tryout"}
            models[name] = {
                "edit model id": result.edit_model_id,
                "run id": str(info.run_id),
                "image sha256": em.image_sha256,
                "caption": em.source_prompt,
                "request id": f"request-{name}-{seed}",
                "label": f"acme-{name}",
            }
        gone, kept = models["deleted"], models["kept"]
        assert reg.fetch(gone["edit model id"]).source == "cache"
        artifacts = server.artifacts_dir
        assert any(gone["run id"] in f for f in files_under(artifacts))
        # The scan finds both before the deletion (so it can fail).
        rows = every_row(db_uri)
        assert set(traces(rows, gone)) == set(gone)
        assert set(traces(rows, kept)) == set(kept)

        reg.delete(gone["edit model id"])

        # MLflow's database: no row holds anything of it; the other model is whole.
        rows = every_row(db_uri)
        assert traces(rows, gone) == {}
        assert set(traces(rows, kept)) == set(kept)
        # MLflow's artifact store: none of its files; the other model's are there.
        stored = files_under(artifacts)
        assert [f for f in stored if gone["run id"] in f] == []
        assert any(kept["run id"] in f for f in stored)
        # This replica: no copy, no pending deletion; the ID is refused. (Left: the empty lock
        # files named by the ID, which hold no data: removing a lock file others may wait
        # on would break the lock.)
        data = config.data_dir
        leftovers = [
            f
            for f in files_under(data)
            if gone["edit model id"] in f and not f.startswith("locks/")
        ]
        assert leftovers == []
        assert reg.pending_deletions() == []
        with pytest.raises(EditModelNotFoundError):
            reg.fetch(gone["edit model id"])
        with pytest.raises(EditModelNotFoundError):
            reg.delete(gone["edit model id"])
        assert reg.fetch(kept["edit model id"]).source == "cache"
