"""The registry against the embedded MLflow store (SQLite + local artifacts, no sockets).

One SQLite store is shared by the module (creating one costs seconds); every test gets its own
registered model and experiment in it, and its own replica data directories. MLflow outages
are injected by switching the registry's ``MlflowClient`` to raise the connection error
``requests`` raises when a server is down.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from mlflow import MlflowClient
from prometheus_client import REGISTRY
from support.registry import random_edit_model, small_config

from forgedit.artifact import DELTA_FILE, MANIFEST_FILE, load_edit_model, sha256_file
from forgedit.errors import BaseModelMismatchError, EditModelError, InvalidInputError
from registry import (
    EditModelNotFoundError,
    EditModelRegistry,
    InvalidEditModelIdError,
    RegistryConfig,
    RegistryConflictError,
    RegistryIntegrityError,
    RegistryUnavailableError,
)
from registry.fsutil import tree_bytes
from registry.records import dedupe_key

PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("embedded-store")
    with EditModelRegistry(RegistryConfig(data_dir=root)) as reg:
        reg._backend.experiment_id()  # creates the SQLite schema once
        return reg.config.resolved_tracking_uri


@pytest.fixture()
def model_name() -> str:
    return f"edit-models-{uuid.uuid4().hex[:8]}"


class Replicas:
    """Registries that share the store and one registered model, each with its own data dir
    (its own spool and cache), as separate replicas would."""

    def __init__(self, root: Path, store: str, model_name: str) -> None:
        self.root, self.store, self.model_name = root, store, model_name
        self.made: list[EditModelRegistry] = []

    def __call__(self, name: str = "a", **overrides: Any) -> EditModelRegistry:
        config = RegistryConfig(
            data_dir=self.root / name,
            tracking_uri=self.store,
            registered_model=self.model_name,
            experiment=self.model_name,
            **overrides,
        )
        reg = EditModelRegistry(config)
        self.made.append(reg)
        return reg

    def versions(self, **tags: str) -> list[Any]:
        client = MlflowClient(self.store, self.store)
        clause = " and ".join(f"tags.`forgedit.{k}` = '{v}'" for k, v in tags.items())
        query = f"name = '{self.model_name}'" + (f" and {clause}" if clause else "")
        return list(client.search_model_versions(query))


@pytest.fixture()
def replicas(tmp_path: Path, store: str, model_name: str) -> Any:
    r = Replicas(tmp_path, store, model_name)
    yield r
    for reg in r.made:
        reg.close()


class DownSwitch:
    """Wraps an ``MlflowClient``: while ``down``, every call fails as if the server were gone."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")
            return attr(*args, **kwargs)

        return call


def switchable(reg: EditModelRegistry) -> DownSwitch:
    switch = DownSwitch(reg._backend.client)
    reg._backend.client = switch  # type: ignore[assignment]
    return switch


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cached_ids(reg: EditModelRegistry) -> list[str]:
    return reg._disk.ids()


def assert_same_tensors(a: Any, b: Any) -> None:
    assert a.delta.keys() == b.delta.keys()
    for k in a.delta:
        assert torch.equal(a.delta[k], b.delta[k])
    assert torch.equal(a.source_embedding, b.source_embedding)


# -- round trip ----------------------------------------------------------------------------


def test_register_fetch_list_show_delete_round_trip(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    em = random_edit_model(1)
    result = a.register(em, request_id="req-1", input_image=PNG, contact_sheet=PNG)
    assert (result.version, result.deduped, result.spooled) == (1, False, False)
    model_id = result.edit_model_id

    info = a.show(model_id)
    assert info.status == "registered" and info.version == 1
    assert info.image_sha256 == em.image_sha256
    assert info.base_model_fingerprint == em.base_model_fingerprint
    assert info.config_fingerprint == em.training.fingerprint()
    assert info.training_mode == "joint" and info.request_id == "req-1"
    assert [i.edit_model_id for i in b.list_models().items] == [model_id]

    # The registering replica keeps its copy; another replica downloads and verifies.
    assert a.fetch(model_id).source == "cache"
    fetched = b.fetch(model_id)
    assert fetched.source == "download"
    assert b.fetch(model_id).source == "cache"
    assert fetched.manifest["base_model"]["fingerprint"] == em.base_model_fingerprint
    assert_same_tensors(load_edit_model(fetched.path), em)
    loaded = b.load(model_id, expected_base_fingerprint=em.base_model_fingerprint)
    assert_same_tensors(loaded, em)
    assert loaded.source_prompt == em.source_prompt
    with pytest.raises(BaseModelMismatchError):
        b.load(model_id, expected_base_fingerprint="c" * 64)

    # One run: flattened config as params, loss curve as step metrics, artifacts.
    client = MlflowClient(replicas.store, replicas.store)
    assert info.run_id is not None
    run = client.get_run(info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["mode"] == "joint"
    assert run.data.params["stages.0.updates"] == "3"
    assert run.data.params["seed"] == "1"
    assert run.data.tags["forgedit.edit_model_id"] == model_id
    assert run.data.tags["forgedit.request_id"] == "req-1"
    history = client.get_metric_history(info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(i, 1.0 / (i + 1)) for i in range(3)]
    assert "time_training" in run.data.metrics
    paths = {f.path for f in client.list_artifacts(info.run_id)}
    assert {"model", "inputs", "contact_sheet.png"} <= paths
    assert [f.path for f in client.list_artifacts(info.run_id, "inputs")] == [
        "inputs/input_image.png"
    ]
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(info.run_id, "model")}
    version = replicas.versions(edit_model_id=model_id)[0]
    assert version.source.endswith("/model") and version.run_id == info.run_id

    a.delete(model_id)
    for reg in (a, b):
        with pytest.raises(EditModelNotFoundError):
            reg.show(model_id)
        with pytest.raises(EditModelNotFoundError):
            reg.fetch(model_id)
    assert cached_ids(a) == [] and cached_ids(b) == []
    assert replicas.versions() == []
    assert client.get_run(info.run_id).info.lifecycle_stage == "deleted"
    artifact_dir = Path(run.info.artifact_uri.removeprefix("file://"))
    assert tree_bytes(artifact_dir) == 0
    with pytest.raises(EditModelNotFoundError):
        a.delete(model_id)


def test_a_contact_sheet_is_attached_after_sampling(replicas: Replicas) -> None:
    reg = replicas("a")
    client = MlflowClient(replicas.store, replicas.store)
    registered = reg.register(random_edit_model(70)).edit_model_id
    reg.add_contact_sheet(registered, PNG)
    run_id = reg.show(registered).run_id
    assert run_id is not None
    assert "contact_sheet.png" in {f.path for f in client.list_artifacts(run_id)}

    switch = switchable(reg)
    switch.down = True
    spooled = reg.register(random_edit_model(71)).edit_model_id
    reg.add_contact_sheet(spooled, PNG + b"v2")
    with pytest.raises(RegistryUnavailableError):
        reg.add_contact_sheet(registered, PNG)
    switch.down = False
    assert reg.flush_spool().registered == [spooled]
    run_id = reg.show(spooled).run_id
    assert run_id is not None
    local = Path(client.download_artifacts(run_id, "contact_sheet.png", str(replicas.root)))
    assert local.read_bytes() == PNG + b"v2"
    with pytest.raises(EditModelNotFoundError):
        reg.add_contact_sheet("em_" + "a" * 26, PNG)


def test_a_contact_sheet_keeps_its_encodings_suffix(replicas: Replicas) -> None:
    """A request's image format reaches the contact sheet: its name follows its bytes, and a
    spooled entry's sheet replaced in another format leaves one sheet, not two."""
    webp = b"RIFF\x10\x00\x00\x00WEBPVP8 fake image bytes"
    jpeg = b"\xff\xd8\xff\xe0fake image bytes"
    reg = replicas("a")
    client = MlflowClient(replicas.store, replicas.store)
    registered = reg.register(random_edit_model(72)).edit_model_id
    reg.add_contact_sheet(registered, webp)
    run_id = reg.show(registered).run_id
    assert run_id is not None
    assert "contact_sheet.webp" in {f.path for f in client.list_artifacts(run_id)}

    switch = switchable(reg)
    switch.down = True
    spooled = reg.register(random_edit_model(73)).edit_model_id
    reg.add_contact_sheet(spooled, PNG)
    reg.add_contact_sheet(spooled, jpeg)
    switch.down = False
    assert reg.flush_spool().registered == [spooled]
    run_id = reg.show(spooled).run_id
    assert run_id is not None
    sheets = {f.path for f in client.list_artifacts(run_id) if f.path.startswith("contact")}
    assert sheets == {"contact_sheet.jpg"}


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_compact_edit_models_round_trip_and_are_tagged(replicas: Replicas, fmt: str) -> None:
    """The registry records each edit model's delta format and stored delta bytes, and an int8
    edit model fetched on another replica loads to the same decoded Δ."""
    a, b = replicas("a"), replicas("b")
    em = random_edit_model(4, dtype=torch.float32, delta_format=fmt)  # type: ignore[arg-type]
    model_id = a.register(em).edit_model_id
    fetched = b.fetch(model_id)
    info = b.show(model_id)
    assert info.delta_format == fmt
    assert info.delta_bytes == (fetched.path / DELTA_FILE).stat().st_size > 0
    assert_same_tensors(load_edit_model(fetched.path), em)
    assert {i.delta_format for i in b.list_models().items} == {fmt}


def test_register_from_a_directory(replicas: Replicas, tmp_path: Path) -> None:
    em = random_edit_model(2)
    directory = em.save(tmp_path / "made-by-engine")
    result = replicas("a").register(directory)
    fetched = replicas("b").fetch(result.edit_model_id)
    for name in (DELTA_FILE, MANIFEST_FILE):
        assert sha256_file(fetched.path / name) == sha256_file(directory / name)


def test_a_corrupted_directory_is_refused_and_leaves_nothing(
    replicas: Replicas, tmp_path: Path
) -> None:
    reg = replicas("a")
    directory = random_edit_model(3).save(tmp_path / "bad")
    flip_byte(directory / DELTA_FILE)
    with pytest.raises(EditModelError, match="sha256"):
        reg.register(directory)
    assert reg.spool_size() == (0, 0)
    assert list((reg.config.data_dir / "spool" / "staging").iterdir()) == []
    assert replicas.versions() == []


# -- idempotency and dedupe -----------------------------------------------------------------


def test_same_request_id_returns_the_same_version(replicas: Replicas) -> None:
    reg = replicas("a")
    first = reg.register(random_edit_model(4), request_id="job-42")
    again = reg.register(random_edit_model(4), request_id="job-42")
    assert again == first
    # A second replica retrying the same request finds it too.
    assert replicas("b").register(random_edit_model(4), request_id="job-42") == first
    assert len(replicas.versions()) == 1


def test_retry_after_a_timeout_never_creates_a_second_version(replicas: Replicas) -> None:
    reg = replicas("a")
    real_create = reg._backend.create_version

    def create_then_time_out(*args: Any, **kwargs: Any) -> Any:
        real_create(*args, **kwargs)  # MLflow did it, but the answer never arrived
        raise RegistryUnavailableError("timed out")

    reg._backend.create_version = create_then_time_out  # type: ignore[method-assign]
    first = reg.register(random_edit_model(5), request_id="job-7")
    assert first.spooled and first.version is None
    reg._backend.create_version = real_create  # type: ignore[method-assign]

    retry = reg.register(random_edit_model(5), request_id="job-7")
    assert retry.edit_model_id == first.edit_model_id
    flushed = reg.flush_spool()
    assert flushed.registered == [first.edit_model_id] and flushed.remaining == 0
    versions = replicas.versions()
    assert [v.tags["forgedit.edit_model_id"] for v in versions] == [first.edit_model_id]
    assert reg.register(random_edit_model(5), request_id="job-7").version == 1


def test_reusing_a_request_id_for_another_model_is_a_conflict(replicas: Replicas) -> None:
    reg = replicas("a")
    reg.register(random_edit_model(6), request_id="job-1")
    with pytest.raises(RegistryConflictError, match="request id"):
        reg.register(random_edit_model(7), request_id="job-1")


def test_principal_scopes_request_ids_dedupe_and_listing(replicas: Replicas) -> None:
    reg = replicas("a")
    em = random_edit_model(12)
    alices = reg.register(em, request_id="p-1", principal="alice")
    assert reg.show(alices.edit_model_id).principal == "alice"
    # Bob's identical fine-tune is his own, never alice's; his second one dedupes to his.
    bobs = reg.register(random_edit_model(12), principal="bob")
    assert not bobs.deduped and bobs.edit_model_id != alices.edit_model_id
    assert reg.register(random_edit_model(12), principal="bob").edit_model_id == (
        bobs.edit_model_id
    )
    keys = (em.image_sha256, em.base_model_fingerprint, em.training.fingerprint())
    found = replicas("b").find_existing(*keys, em.source_prompt, principal="bob")
    assert found is not None and found.edit_model_id == bobs.edit_model_id
    # Alice's request id, reused by bob: a conflict that names nothing of hers.
    with pytest.raises(RegistryConflictError) as conflict:
        reg.register(random_edit_model(12), request_id="p-1", principal="bob")
    assert alices.edit_model_id not in str(conflict.value)
    listed = reg.list_models(principal="alice").items
    assert [m.edit_model_id for m in listed] == [alices.edit_model_id]
    assert {m.edit_model_id for m in reg.list_models().items} >= {
        alices.edit_model_id,
        bobs.edit_model_id,
    }
    with pytest.raises(InvalidInputError):
        reg.list_models(principal="x' or '1'='1")  # never reaches a filter string


def test_same_image_base_and_config_is_deduplicated(replicas: Replicas) -> None:
    reg = replicas("a")
    em = random_edit_model(8)
    first = reg.register(em, request_id="r1")
    second = reg.register(random_edit_model(8), request_id="r2")
    assert second.deduped and second.edit_model_id == first.edit_model_id
    found = replicas("b").find_existing(
        em.image_sha256, em.base_model_fingerprint, em.training.fingerprint(), em.source_prompt
    )
    assert found is not None and found.edit_model_id == first.edit_model_id

    other_seed = random_edit_model(8, config=small_config(seed=99))
    assert not reg.register(other_seed).deduped
    assert not reg.register(random_edit_model(8), dedupe=False).deduped
    no_image_hash = random_edit_model(8)
    no_image_hash.image_sha256 = ""  # nothing to deduplicate on: a new model each time
    assert not reg.register(no_image_hash).deduped
    assert not reg.register(no_image_hash).deduped
    other_base = random_edit_model(8, base_model_fingerprint="d" * 64)
    assert not reg.register(other_base).deduped
    assert replicas("c").find_existing(em.image_sha256, "e" * 64, "f" * 64, "x") is None
    # The source prompt initialises the learned embedding: another one is another model.
    other_prompt = random_edit_model(8)
    other_prompt.source_prompt = "A photo of something else entirely"
    assert not reg.register(other_prompt).deduped
    assert (
        replicas("c").find_existing(
            em.image_sha256, em.base_model_fingerprint, em.training.fingerprint(), "other prompt"
        )
        is None
    )
    assert len(replicas.versions()) == 7


# -- integrity ----------------------------------------------------------------------------


def stored_file(replicas: Replicas, reg: EditModelRegistry, model_id: str, name: str) -> Path:
    run_id = reg.show(model_id).run_id
    assert run_id is not None
    run = MlflowClient(replicas.store, replicas.store).get_run(run_id)
    root = Path(run.info.artifact_uri.removeprefix("file://"))
    return root / "model" / "artifacts" / "edit_model" / name


def test_a_corrupted_byte_in_the_store_is_detected_and_never_used(replicas: Replicas) -> None:
    a = replicas("a")
    model_id = a.register(random_edit_model(9)).edit_model_id
    flip_byte(stored_file(replicas, a, model_id, DELTA_FILE))
    b = replicas("b")
    with pytest.raises(RegistryIntegrityError, match="corrupted"):
        b.fetch(model_id)
    with pytest.raises(RegistryIntegrityError):
        b.load(model_id)
    assert cached_ids(b) == []
    assert list((b.config.data_dir / "cache" / "tmp").iterdir()) == []


def test_a_tampered_manifest_is_detected(replicas: Replicas) -> None:
    """Rewriting the manifest to match corrupted payload does not help: the version tag holds
    the manifest's own sha256."""
    a = replicas("a")
    model_id = a.register(random_edit_model(10)).edit_model_id
    manifest = stored_file(replicas, a, model_id, MANIFEST_FILE)
    manifest.write_text(manifest.read_text().replace("thing number", "thing numbe_"))
    with pytest.raises(RegistryIntegrityError):
        replicas("b").fetch(model_id)


def test_a_corrupted_download_is_discarded_and_retried(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    em = random_edit_model(11)
    model_id = a.register(em).edit_model_id
    real_download = b._backend.download_dir
    calls = []

    def corrupt_first(*args: Any, **kwargs: Any) -> Path:
        path = real_download(*args, **kwargs)
        calls.append(path)
        if len(calls) == 1:
            flip_byte(path / DELTA_FILE)
        return path

    b._backend.download_dir = corrupt_first  # type: ignore[method-assign]
    fetched = b.fetch(model_id)
    assert len(calls) == 2 and fetched.source == "download"
    assert_same_tensors(load_edit_model(fetched.path), em)


def test_a_corrupted_cached_copy_is_discarded_and_fetched_again(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b", memory_cache_models=0)
    em = random_edit_model(12)
    model_id = a.register(em).edit_model_id
    path = b.fetch(model_id).path
    flip_byte(path / DELTA_FILE)
    fetched = b.fetch(model_id)
    assert fetched.source == "download"
    assert_same_tensors(load_edit_model(fetched.path), em)
    flip_byte(fetched.path / DELTA_FILE)
    assert_same_tensors(b.load(model_id), em)
    # And the registering replica's own (adopted) copy is checked the same way.
    flip_byte(a.fetch(model_id).path / DELTA_FILE)
    assert a.fetch(model_id).source == "download"


# -- MLflow down: the spool ---------------------------------------------------------------


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


def test_mlflow_down_spools_then_registers_exactly_once(replicas: Replicas) -> None:
    reg = replicas("a")
    reg._backend.experiment_id()
    switch = switchable(reg)
    switch.down = True
    em = random_edit_model(13)
    result = reg.register(em, request_id="while-down", input_image=PNG)
    assert result.spooled and result.version is None
    model_id = result.edit_model_id
    # Usable here at once, and visible.
    fetched = reg.fetch(model_id)
    assert fetched.source == "spool"
    assert_same_tensors(reg.load(model_id), em)
    assert reg.show(model_id).status == "spooled"
    with pytest.raises(RegistryUnavailableError):
        reg.list_models()
    count, nbytes = reg.spool_size()
    assert count == 1 and nbytes > em.delta_bytes
    assert gauge("forgedit_registry_spooled_edit_models") == 1
    assert reg.register(em, request_id="while-down").edit_model_id == model_id
    assert reg.flush_spool().registered == []

    switch.down = False
    assert_same_tensors(reg.load(model_id), em)  # a memory hit, not yet in MLflow
    first_page = reg.list_models()
    assert first_page.items[0].edit_model_id == model_id
    assert first_page.items[0].status == "spooled"
    flushed = reg.flush_spool()
    assert flushed.registered == [model_id] and flushed.remaining == 0
    assert gauge("forgedit_registry_spooled_edit_models") == 0
    assert reg.show(model_id).status == "registered"
    assert reg.fetch(model_id).source == "cache"
    assert len(replicas.versions()) == 1
    assert replicas("b").fetch(model_id).source == "download"
    assert reg.flush_spool().registered == []
    assert len(replicas.versions()) == 1


def test_the_flusher_registers_when_mlflow_answers_again(replicas: Replicas) -> None:
    reg = replicas("a", flush_initial_backoff_s=0.05, flush_max_backoff_s=0.2)
    reg._backend.experiment_id()
    switch = switchable(reg)
    switch.down = True
    reg.start()
    model_id = reg.register(random_edit_model(14)).edit_model_id
    time.sleep(0.3)  # a few failed attempts, backing off
    switch.down = False
    deadline = time.monotonic() + 30
    while reg.spool_size()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reg.show(model_id).status == "registered"
    reg.close()
    assert reg._flusher._thread is None


def test_find_existing_while_mlflow_is_down_says_none_unless_spooled(replicas: Replicas) -> None:
    reg = replicas("a")
    reg._backend.experiment_id()
    em = random_edit_model(15)
    reg.register(em)
    switch = switchable(reg)
    switch.down = True
    keys = (em.image_sha256, em.base_model_fingerprint, em.training.fingerprint(), em.source_prompt)
    assert reg.find_existing(*keys) is None
    spooled = random_edit_model(16)
    model_id = reg.register(spooled).edit_model_id
    found = reg.find_existing(
        spooled.image_sha256,
        spooled.base_model_fingerprint,
        spooled.training.fingerprint(),
        spooled.source_prompt,
    )
    assert found is not None and found.edit_model_id == model_id and found.status == "spooled"
    assert dedupe_key(*keys) != dedupe_key(found.image_sha256, "x", "y", "z")


def test_a_cached_copy_is_served_while_mlflow_is_down(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    model_id = a.register(random_edit_model(17)).edit_model_id
    b.fetch(model_id)
    switchable(b).down = True
    assert b.fetch(model_id).source == "cache"
    c = replicas("c")  # a replica without a copy needs MLflow
    switchable(c).down = True
    with pytest.raises(RegistryUnavailableError):
        c.fetch(model_id)


# -- caches -------------------------------------------------------------------------------


def test_caches_are_bounded_lru(replicas: Replicas) -> None:
    a = replicas("a")
    ids = [a.register(random_edit_model(20 + i)).edit_model_id for i in range(3)]
    one = tree_bytes(a._disk.path(ids[0]))
    b = replicas("b", cache_max_bytes=int(2.5 * one), memory_cache_models=1)
    for model_id in ids:
        b.fetch(model_id)
        time.sleep(0.01)  # distinct mtimes
    assert sorted(cached_ids(b)) == sorted(ids[1:])
    b.fetch(ids[1])  # touch: now ids[2] is the least recently used
    time.sleep(0.01)
    assert b.fetch(ids[0]).source == "download"
    assert sorted(cached_ids(b)) == sorted([ids[0], ids[1]])
    b.load(ids[0])
    b.load(ids[1])
    assert b._memory.get(ids[0]) is None and b._memory.get(ids[1]) is not None


def test_a_model_deleted_elsewhere_is_not_served_from_a_cache(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b")
    model_id = a.register(random_edit_model(30)).edit_model_id
    b.load(model_id)
    a.delete(model_id)
    with pytest.raises(EditModelNotFoundError):
        b.load(model_id)
    with pytest.raises(EditModelNotFoundError):
        b.fetch(model_id)
    assert cached_ids(b) == []


# -- listing ------------------------------------------------------------------------------


def test_list_pages_and_filters(replicas: Replicas) -> None:
    reg = replicas("a")
    made = [
        reg.register(random_edit_model(40 + i, base_model_name=name))
        for i, name in enumerate(["base-a", "base-a", "base-b"])
    ]
    page1 = reg.list_models(page_size=2)
    assert len(page1.items) == 2 and page1.next_page_token
    page2 = reg.list_models(page_size=2, page_token=page1.next_page_token)
    listed = [i.edit_model_id for i in page1.items + page2.items]
    assert listed == [m.edit_model_id for m in reversed(made)]  # newest first
    assert page2.next_page_token is None
    assert {i.edit_model_id for i in reg.list_models(base_model="base-a").items} == {
        made[0].edit_model_id,
        made[1].edit_model_id,
    }
    image = random_edit_model(42).image_sha256
    assert [i.edit_model_id for i in reg.list_models(image_sha256=image).items] == [
        made[2].edit_model_id
    ]
    for bad in (
        {"base_model": "x' or '1'='1"},
        {"image_sha256": "zz"},
        {"page_size": 0},
        {"page_token": "../../x"},
    ):
        with pytest.raises(InvalidInputError):
            reg.list_models(**bad)


# -- bad IDs never reach storage ----------------------------------------------------------


class Exploding:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"storage touched ({name}) before the ID was validated")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "em_" + "é" * 26, "em_" + "a" * 500, ""])
def test_malformed_ids_are_refused_before_any_io(replicas: Replicas, bad: str) -> None:
    reg = replicas("a")
    for part in ("_backend", "_spool", "_disk", "_memory"):
        setattr(reg, part, Exploding())
    for call in (reg.fetch, reg.load, reg.show, reg.delete):
        with pytest.raises(InvalidEditModelIdError):
            call(bad)


def test_unknown_ids_are_not_found(replicas: Replicas) -> None:
    reg = replicas("a")
    unknown = "em_" + "a" * 26
    for call in (reg.fetch, reg.load, reg.show, reg.delete):
        with pytest.raises(EditModelNotFoundError, match=unknown):
            call(unknown)


def test_bad_register_arguments_are_refused(replicas: Replicas) -> None:
    reg = replicas("a")
    em = random_edit_model(50)
    with pytest.raises(InvalidInputError, match="request id"):
        reg.register(em, request_id="x" * 1000)
    with pytest.raises(InvalidInputError, match="control"):
        reg.register(em, request_id="a\nb")
    with pytest.raises(InvalidInputError, match="tag key"):
        reg.register(em, tags={"forgedit.edit_model_id": "em_x"})
    with pytest.raises(EditModelError):
        reg.register(Path(reg.config.data_dir / "nowhere"))
    assert replicas.versions() == []


def test_two_replicas_racing_on_one_request_id_leave_exactly_one_version(
    replicas: Replicas,
) -> None:
    """Both pass the "already registered?" check before either creates its version; the
    reconcile step makes every version but the oldest delete itself."""
    a, b = replicas("a"), replicas("b")
    barrier = threading.Barrier(2, timeout=60)
    for reg in (a, b):
        real = reg._backend.create_version

        def create_together(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            barrier.wait()
            return _real(*args, **kwargs)

        reg._backend.create_version = create_together  # type: ignore[method-assign]
    results: dict[str, Any] = {}

    def register(name: str, reg: EditModelRegistry) -> None:
        results[name] = reg.register(random_edit_model(60), request_id="raced", dedupe=False)

    threads = [threading.Thread(target=register, args=item) for item in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for reg in (a, b):
        reg.flush_spool()  # in case SQLite was busy and one of them spooled
    versions = replicas.versions()
    assert len(versions) == 1
    winner = versions[0].tags["forgedit.edit_model_id"]
    if not (results["a"].spooled or results["b"].spooled):
        assert results["a"].edit_model_id == results["b"].edit_model_id == winner
    client = MlflowClient(replicas.store, replicas.store)
    experiment = client.get_experiment_by_name(replicas.model_name)
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id])) == 1  # the loser's run is gone


def test_start_up_removes_only_dead_processes_leftovers(replicas: Replicas) -> None:
    data = replicas.root / "shared"
    dead, live = "entry.999999999.crashed", f"entry.{os.getppid()}.busy"
    for sub in ("spool/staging", "cache/tmp"):
        for name in (dead, live):
            (data / sub / name).mkdir(parents=True)
            (data / sub / name / "partial").write_bytes(b"x")
    replicas("shared")
    for sub in ("spool/staging", "cache/tmp"):
        assert sorted(p.name for p in (data / sub).iterdir()) == [live]


def test_a_fetch_racing_the_flusher_finds_the_model_in_the_cache(replicas: Replicas) -> None:
    """The flusher moves a spooled model's files into the cache just before removing the spool
    entry; a fetch in between waits for the publish and serves the cached copy."""
    reg = replicas("a")
    reg._backend.experiment_id()
    switch = switchable(reg)
    switch.down = True
    em = random_edit_model(80)
    model_id = reg.register(em).edit_model_id
    switch.down = False

    files_moved, release = threading.Event(), threading.Event()
    real_remove = reg._spool.remove

    def remove_later(edit_model_id: str) -> None:
        files_moved.set()  # the publisher moved the files into the cache a moment ago
        release.wait(30)
        real_remove(edit_model_id)

    reg._spool.remove = remove_later  # type: ignore[method-assign]
    flusher = threading.Thread(target=reg.flush_spool)
    flusher.start()
    assert files_moved.wait(30)
    threading.Timer(0.3, release.set).start()
    fetched = reg.fetch(model_id)  # entry still listed, files gone: waits, then the cache
    flusher.join(30)
    assert fetched.source == "cache"
    assert_same_tensors(load_edit_model(fetched.path), em)


class HungSwitch(DownSwitch):
    """While ``hung``, every call blocks until released, as against a stopped MLflow."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.hung = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = super().__getattr__(name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.hung.is_set():
                self.release.wait(60)
                raise requests.exceptions.ReadTimeout("Read timed out.")
            return attr(*args, **kwargs)

        return call


def test_a_cached_copy_is_served_while_mlflow_hangs(replicas: Replicas) -> None:
    a, b = replicas("a"), replicas("b", confirm_timeout_s=0.2, memory_cache_models=0)
    model_id = a.register(random_edit_model(18)).edit_model_id
    b.fetch(model_id)
    switch = HungSwitch(b._backend.client)
    b._backend.client = switch  # type: ignore[assignment]
    switch.hung.set()
    try:
        loaded: list[Any] = []
        loader = threading.Thread(target=lambda: loaded.extend(b.load(model_id) for _ in "xyz"))
        loader.start()
        loader.join(30)  # MLflow stays hung for 60 s: only the bounded confirmation returns
        assert not loader.is_alive() and len(loaded) == 3
        assert loaded[0].image_sha256 == random_edit_model(18).image_sha256
        hung = [t for t in threading.enumerate() if t.name == "registry-lookup"]
        assert len(hung) <= 2  # the lookups waiting for MLflow are bounded
        assert b.cached_info(model_id) is not None  # described locally, no MLflow needed
    finally:
        switch.release.set()


def test_a_delete_refused_while_mlflow_is_down_keeps_the_cached_copy(replicas: Replicas) -> None:
    a = replicas("a")
    model_id = a.register(random_edit_model(19)).edit_model_id
    assert model_id in cached_ids(a)
    info = a.cached_info(model_id)
    assert info is not None and info.status == "cached" and info.version is not None
    switchable(a).down = True
    with pytest.raises(RegistryUnavailableError):
        a.delete(model_id)
    assert model_id in cached_ids(a)
    assert a.load(model_id).image_sha256 == random_edit_model(19).image_sha256


def test_a_cached_copy_is_described_with_its_principal(replicas: Replicas) -> None:
    """Who made an edit model is a registry tag, not in the manifest; the cached copy (the
    registering replica's and a downloaded one) still says who, so that a service shows it to
    that principal while MLflow is down."""
    a, b = replicas("a"), replicas("b")
    model_id = a.register(random_edit_model(20), principal="alice").edit_model_id
    b.fetch(model_id)
    for replica in (a, b):
        info = replica.cached_info(model_id)
        assert info is not None and info.status == "cached"
        assert info.principal == "alice"


def test_a_cached_copy_is_described_while_a_loader_holds_its_lock(replicas: Replicas) -> None:
    """Issue 21.7: a loader holds the copy's lock while it asks MLflow whether the ID still
    exists (seconds, when MLflow hangs); describing the copy must not need that lock, or the
    caller falls back to MLflow."""
    a = replicas("a")
    model_id = a.register(random_edit_model(21), principal="alice").edit_model_id
    with a._disk.lock(model_id):  # as load() holds it, from another open file description
        info = a.cached_info(model_id)
    assert info is not None and info.status == "cached" and info.principal == "alice"
    assert info.edit_model_id == model_id


def test_a_copy_replaced_while_it_is_described_is_read_whole(replicas: Replicas) -> None:
    """``cached_info`` reads origin.json and the manifest without the lock, from one pinned
    directory: a copy renamed away in between (an eviction, a re-install) is still read whole,
    and a copy that is gone is simply not described."""
    a = replicas("a")
    model_id = a.register(random_edit_model(22)).edit_model_id
    with a._disk.pinned(model_id) as copy:
        assert copy is not None
        a._disk.discard(model_id)  # renamed into trash and deleted meanwhile
        assert not a._disk.has(model_id)
    with a._disk.pinned(model_id) as copy:
        assert copy is None
    assert a.cached_info(model_id) is None


def test_a_deleted_model_is_refused_without_mlflow_and_its_copy_removed_later(
    replicas: Replicas,
) -> None:
    """Issue 21.6: a delete removes the model from MLflow even when the disk refuses to remove
    the local copy; the copy is never served (also while MLflow is down), is counted, and goes
    at the next use once the disk lets go."""
    a = replicas("a")
    model_id = a.register(random_edit_model(23)).edit_model_id
    a.load(model_id)
    trash = a._disk.root / "trash"
    shutil.rmtree(trash)
    trash.write_bytes(b"")  # every removal renames into trash first: now each one fails
    errors = REGISTRY.get_sample_value("forgedit_registry_cache_delete_errors_total") or 0.0
    try:
        a.delete(model_id)
        assert (
            REGISTRY.get_sample_value("forgedit_registry_cache_delete_errors_total") == errors + 1
        )
        assert model_id in cached_ids(a)
        with pytest.raises(EditModelNotFoundError):
            a.show(model_id)
        switchable(a).down = True  # refused from what this replica knows, not from MLflow
        for use in (a.load, a.fetch, a.cached_info):
            with pytest.raises(EditModelNotFoundError):
                use(model_id)
        assert model_id in cached_ids(a)
    finally:
        trash.unlink()
        trash.mkdir()
    with pytest.raises(EditModelNotFoundError):
        a.load(model_id)
    assert cached_ids(a) == []


def test_register_and_find_existing_do_not_wait_out_a_hung_mlflow(replicas: Replicas) -> None:
    reg = replicas("a", lookup_timeout_s=0.2)
    reg._backend.experiment_id()
    switch = HungSwitch(reg._backend.client)
    reg._backend.client = switch  # type: ignore[assignment]
    switch.hung.set()
    model = random_edit_model(41)
    results: list[Any] = []

    def work() -> None:
        results.append(
            reg.find_existing(
                model.image_sha256,
                model.base_model_fingerprint,
                model.training.fingerprint(),
                model.source_prompt,
            )
        )
        results.append(reg.register(model, request_id="hung-1"))

    try:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join(30)  # MLflow stays hung for 60 s
        assert not worker.is_alive()
        found, registered = results
        assert found is None and registered.spooled and registered.version is None
    finally:
        switch.release.set()
    switch.hung.clear()
    assert reg.flush_spool().registered == [registered.edit_model_id]
    assert len(replicas.versions(request_id="hung-1")) == 1
