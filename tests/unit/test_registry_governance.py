"""Labels, expiry and deletion in the registry (issue 20.4-20.6), on the embedded MLflow store:
labels stored, returned and filtered with paging per principal; bad labels refused naming what
is accepted; an expired edit model refused like a deleted one on every path and swept; the
sweep never deleting what is not expired; a deletion or a sweep interrupted by a crash or an
MLflow outage finished later, with nothing left in MLflow's database.

The database and artifact store are checked in full by ``tests/service/test_registry_deletion``
(SQLite and PostgreSQL behind a real ``mlflow server``); here a purged run is one MLflow no
longer knows even as deleted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from support.registry import random_edit_model, switchable

from forgedit.errors import InvalidInputError
from registry import (
    EditModelNotFoundError,
    EditModelRegistry,
    RegistryConfig,
    RegistryUnavailableError,
)
from registry.records import LABEL_RULE
from registry.retention import RetentionSweeper


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("governance-store")
    with EditModelRegistry(RegistryConfig(data_dir=root)) as reg:
        reg._backend.experiment_id()
        return reg.config.resolved_tracking_uri


class Replicas:
    """Registries sharing one store and registered model, each with its own data directory."""

    def __init__(self, root: Path, store: str) -> None:
        self.root, self.store = root, store
        self.name = f"governed-{uuid.uuid4().hex[:8]}"
        self.made: list[EditModelRegistry] = []

    def __call__(self, name: str = "a", **overrides: Any) -> EditModelRegistry:
        reg = EditModelRegistry(
            RegistryConfig(
                data_dir=self.root / name,
                tracking_uri=self.store,
                registered_model=self.name,
                experiment=self.name,
                **overrides,
            )
        )
        self.made.append(reg)
        return reg

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.store, self.store)

    def runs_with(self, edit_model_id: str) -> list[Any]:
        """Every run of the ID MLflow still knows, deleted ones included."""
        exp = self.client.get_experiment_by_name(self.name)
        return list(
            self.client.search_runs(
                [exp.experiment_id],
                f"tags.`forgedit.edit_model_id` = '{edit_model_id}'",
                run_view_type=ViewType.ALL,
            )
        )


@pytest.fixture()
def replicas(tmp_path: Path, store: str) -> Iterator[Replicas]:
    r = Replicas(tmp_path, store)
    yield r
    for reg in r.made:
        reg.close()


def expire(seconds: float = 1.0) -> None:
    """Wait until a model registered with ``ttl_s=seconds`` just before has expired."""
    time.sleep(seconds + 0.05)


# -- labels ------------------------------------------------------------------------------------


def test_labels_are_stored_returned_and_filtered_with_paging_per_principal(
    replicas: Replicas,
) -> None:
    a, b = replicas("a"), replicas("b")
    ids = [
        a.register(
            random_edit_model(seed), labels={"team": "red", "n": str(seed)}, principal="alice"
        ).edit_model_id
        for seed in (1, 2, 3)
    ]
    blue = a.register(random_edit_model(4), labels={"team": "blue"}, principal="alice")
    bobs = a.register(random_edit_model(5), labels={"team": "red"}, principal="bob")

    assert b.show(ids[0]).labels == {"n": "1", "team": "red"}  # from MLflow, on another replica
    assert a.cached_info(ids[0]).labels == {"n": "1", "team": "red"}  # from the local copy

    # Filter and page: alice's red ones, one per page, newest first, none of bob's.
    seen, token = [], None
    while True:
        page = b.list_models(
            labels={"team": "red"}, principal="alice", page_size=1, page_token=token
        )
        seen += [m.edit_model_id for m in page.items]
        token = page.next_page_token
        if token is None:
            break
    assert seen == ids[::-1]
    both = b.list_models(labels={"team": "red", "n": "2"}, principal="alice").items
    assert [m.edit_model_id for m in both] == [ids[1]]
    assert [m.edit_model_id for m in b.list_models(labels={"team": "blue"}).items] == [
        blue.edit_model_id
    ]
    assert [
        m.edit_model_id for m in b.list_models(labels={"team": "red"}, principal="bob").items
    ] == [bobs.edit_model_id]
    assert b.list_models(labels={"team": "green"}).items == []


@pytest.mark.parametrize(
    ("labels", "named"),
    [
        ({f"k{i}": "v" for i in range(17)}, "17 labels given"),
        ({"Team": "red"}, "label key 'Team'"),
        ({"team name": "red"}, "label key 'team name'"),
        ({"-team": "red"}, "label key '-team'"),
        ({"k" * 64: "v"}, "label key 'kkkk"),
        ({"": "v"}, "label key ''"),
        ({"team": ""}, "has value ''"),
        ({"team": "red'); drop"}, 'has value "red\'); drop"'),
        ({"team": "v" * 64}, "has value 'vvvv"),
        ({"team": "red."}, "has value 'red.'"),
    ],
)
def test_bad_labels_are_refused_naming_what_is_accepted(
    replicas: Replicas, labels: dict[str, str], named: str
) -> None:
    reg = replicas("a")
    for call in (
        lambda: reg.register(random_edit_model(9), labels=labels),
        lambda: reg.list_models(labels=labels),
    ):
        with pytest.raises(InvalidInputError) as e:
            call()
        assert e.value.field == "labels"
        assert named in str(e.value) and LABEL_RULE in str(e.value)
    assert reg.list_models().items == [] and reg.spool_size() == (0, 0)


@pytest.mark.parametrize("ttl", [0, -5, 0.5, 10 * 366 * 24 * 3600])
def test_a_bad_time_to_live_is_refused(replicas: Replicas, ttl: float) -> None:
    reg = replicas("a")
    with pytest.raises(InvalidInputError, match=r"1\.\.315360000 seconds") as e:
        reg.register(random_edit_model(9), ttl_s=ttl)
    assert e.value.field == "ttl_seconds"


def test_deduplication_keeps_labels_and_expiry_apart(replicas: Replicas) -> None:
    reg = replicas("a")
    plain = reg.register(random_edit_model(6))
    labelled = reg.register(random_edit_model(6), labels={"team": "red"})
    expiring = reg.register(random_edit_model(6), labels={"team": "red"}, ttl_s=3600)
    again = reg.register(random_edit_model(6), labels={"team": "red"}, ttl_s=3600)
    assert len({plain.edit_model_id, labelled.edit_model_id, expiring.edit_model_id}) == 3
    assert again.deduped and again.edit_model_id == expiring.edit_model_id


# -- expiry ------------------------------------------------------------------------------------


def test_an_expired_model_is_refused_like_a_deleted_one_everywhere(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    em = random_edit_model(10)
    model_id = a.register(em, ttl_s=1).edit_model_id
    info = a.show(model_id)
    assert info.expires_at is not None and info.expires_at > time.time()
    a.load(model_id)  # in a's memory and disk cache
    b.load(model_id)  # downloaded into b's
    expire()

    switch = switchable(a)
    switch.down = True  # a refuses from its own copy's record, without MLflow
    for call in (a.fetch, a.load, a.cached_info):
        with pytest.raises(EditModelNotFoundError):
            call(model_id)
    switch.down = False
    for reg in (a, b):
        for call in (reg.fetch, reg.load, reg.cached_info, reg.show):
            with pytest.raises(EditModelNotFoundError):
                call(model_id)
        assert model_id not in [m.edit_model_id for m in reg.list_models().items]
    fresh = replicas("c")  # a replica that never saw it: MLflow's tags say expired
    with pytest.raises(EditModelNotFoundError):
        fresh.fetch(model_id)
    # Never reused: the same fine-tune with the same expiry is registered anew.
    training_fp = em.training.fingerprint()
    assert (
        a.find_existing(
            em.image_sha256, em.base_model_fingerprint, training_fp, em.source_prompt, ttl_s=1
        )
        is None
    )


def test_the_sweep_deletes_expired_models_and_nothing_else(replicas: Replicas) -> None:
    reg = replicas("a", sweep_batch=2)
    expired = [reg.register(random_edit_model(s), ttl_s=1).edit_model_id for s in (11, 12, 13)]
    later = reg.register(random_edit_model(14), ttl_s=3600).edit_model_id
    forever = reg.register(random_edit_model(15)).edit_model_id
    expire()
    # Bounded: one page of sweep_batch versions and at most sweep_batch deletions per round;
    # the next round goes on from there.
    swept: list[str] = []
    for _ in range(6):
        done = reg.sweep_expired()
        assert len(done) <= 2
        swept += done
    assert sorted(swept) == sorted(expired)
    assert reg.sweep_expired() == []
    for model_id in expired:
        assert replicas.runs_with(model_id) == []  # purged, not soft-deleted
        assert reg._disk.has(model_id) is False
    assert {reg.show(later).edit_model_id, reg.show(forever).edit_model_id} == {later, forever}
    assert len(replicas.runs_with(later)) == 1


def test_the_sweep_rechecks_expiry_right_before_deleting(replicas: Replicas) -> None:
    """A sweep whose view says "expired" (here: a clock two hours ahead) still deletes nothing
    that is not expired when the deletion re-reads the version under the ID's lock."""
    reg = replicas("a")
    model_id = reg.register(random_edit_model(16), ttl_s=3600).edit_model_id
    hasty = RetentionSweeper(
        reg.config, reg._backend, reg._spool, reg._deleter, clock=lambda: time.time() + 7200
    )
    assert hasty.sweep_once() == []
    assert reg.show(model_id).edit_model_id == model_id
    assert reg._deleter.delete(model_id, expired_only=True) is False


def test_a_sweep_interrupted_by_a_restart_finishes_in_the_next_process(
    replicas: Replicas,
) -> None:
    class ProcessDied(BaseException):
        """What the registry sees of a SIGKILL: nothing after this point runs."""

    first = replicas("a")
    model_id = first.register(random_edit_model(17), ttl_s=1).edit_model_id
    expire()

    def die(run: Any) -> None:
        raise ProcessDied

    first._backend.delete_run = die  # type: ignore[method-assign]
    with pytest.raises(ProcessDied):
        first.sweep_expired()
    # What the crash left: the version gone, the run (params, caption tag) still in MLflow,
    # and the tombstone that says the deletion was decided.
    assert replicas.client.search_model_versions(f"name = '{replicas.name}'") == []
    assert len(replicas.runs_with(model_id)) == 1
    assert first.pending_deletions() == [model_id]
    first.close()

    # The next process on the same data directory refuses the ID at once and finishes.
    second = replicas("a", sweep_interval_s=0.2)
    with pytest.raises(EditModelNotFoundError):
        second.show(model_id)
    second.start()
    deadline = time.monotonic() + 60
    while second.pending_deletions() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second.pending_deletions() == []
    assert replicas.runs_with(model_id) == []


# -- deletion during an MLflow outage ------------------------------------------------------------


def test_a_delete_cut_off_by_an_outage_is_refused_at_once_and_completed_later(
    replicas: Replicas,
) -> None:
    reg = replicas("a")
    model_id = reg.register(random_edit_model(18), labels={"team": "red"}).edit_model_id
    switch = switchable(reg)
    delete_version = reg._backend.delete_version

    def delete_version_then_outage(version: Any) -> None:
        delete_version(version)
        switch.down = True  # MLflow goes away between the version and the run

    reg._backend.delete_version = delete_version_then_outage  # type: ignore[method-assign]
    with pytest.raises(RegistryUnavailableError, match="is being deleted") as e:
        reg.delete(model_id)
    assert "retry the delete to confirm" in str(e.value)
    # Committed: refused here while MLflow is still down, the copy gone, the run still there.
    for call in (reg.fetch, reg.load, reg.show, reg.cached_info):
        with pytest.raises(EditModelNotFoundError):
            call(model_id)
    assert reg._disk.has(model_id) is False
    assert len(replicas.runs_with(model_id)) == 1
    with pytest.raises(RegistryUnavailableError, match="is being deleted"):
        reg.delete(model_id)  # a retry during the outage says the same

    switch.down = False
    reg.delete(model_id)  # the retry completes it
    assert replicas.runs_with(model_id) == [] and reg.pending_deletions() == []
    with pytest.raises(EditModelNotFoundError):
        reg.delete(model_id)


def test_a_delete_before_mlflow_answers_changes_nothing(replicas: Replicas) -> None:
    reg = replicas("a")
    model_id = reg.register(random_edit_model(19)).edit_model_id
    switchable(reg).down = True
    with pytest.raises(RegistryUnavailableError) as e:
        reg.delete(model_id)
    assert "being deleted" not in str(e.value)
    assert reg.pending_deletions() == []
    assert reg.load(model_id).image_sha256 == random_edit_model(19).image_sha256


def test_a_spooled_model_deleted_during_an_outage_is_gone_here_and_purged_later(
    replicas: Replicas,
) -> None:
    reg = replicas("a")
    switch = switchable(reg)
    switch.down = True
    model_id = reg.register(random_edit_model(20), labels={"team": "red"}).edit_model_id
    assert reg.show(model_id).status == "spooled"
    with pytest.raises(RegistryUnavailableError, match="is being deleted"):
        reg.delete(model_id)
    assert reg.spool_size() == (0, 0)
    with pytest.raises(EditModelNotFoundError):
        reg.fetch(model_id)
    switch.down = False
    assert reg.sweep_expired() == []  # finishes the pending deletion (nothing was published)
    assert reg.pending_deletions() == []
    assert replicas.runs_with(model_id) == []
