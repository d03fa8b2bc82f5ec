"""The local cache is an optimisation: when the disk refuses to keep a freshly registered edit
model, the Edit still streams its images and the registered ID (never INTERNAL), a warning is
counted, nothing is left half-written, and the model is sampled by downloading it once the disk
is writable again. When the disk refuses to let go of a deleted model's copy, the deletion
still happens in the registry (the source of truth) and the copy is never served again."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from support import server as support

from server._proto import forgedit_pb2 as pb

COUNTER = "forgedit_registry_cache_write_errors_total"
DELETE_COUNTER = "forgedit_registry_cache_delete_errors_total"


def _cache_write_errors() -> float:
    return REGISTRY.get_sample_value(COUNTER) or 0.0


def _cache_delete_errors() -> float:
    return REGISTRY.get_sample_value(DELETE_COUNTER) or 0.0


@pytest.mark.slow
def test_cache_unwritable_after_registration_does_not_fail_the_edit(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with support.running_server(tmp_path, tiny_model_dir) as h:
        before = support.Resources.now()
        errors_before = _cache_write_errors()
        # Where the cache stages its copies is no longer a directory: every cache write fails
        # (a file in the way fails for root too, unlike permission bits).
        staging = h.data_dir / "registry" / "cache" / "tmp"
        shutil.rmtree(staging)
        staging.write_bytes(b"")

        edit = support.stream(h.stub.Edit, support.edit_request(support.encoded("PNG", (64, 64))))
        assert edit.code == grpc.StatusCode.OK, edit.details
        registered = edit.of("registered")[0]
        assert registered.version >= 1 and not registered.spooled
        assert len(edit.of("image")) == 1
        assert edit.of("completed")[0].edit_model_id == registered.edit_model_id
        assert _cache_write_errors() == errors_before + 1
        cached = h.data_dir / "registry" / "cache" / "models" / registered.edit_model_id
        assert not cached.exists()

        staging.unlink()
        staging.mkdir()
        sampled = support.stream(
            h.stub.Sample,
            pb.SampleRequest(
                edit_model_id=registered.edit_model_id,
                target_prompts=["A photo of a pear."],
                sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[1]),
            ),
        )
        assert sampled.code == grpc.StatusCode.OK, sampled.details
        assert cached.is_dir()  # downloaded and cached this time
        support.assert_nothing_left_behind(h)
        support.assert_resources_back(before)


@pytest.mark.slow
def test_delete_with_an_unwritable_cache_deletes_in_the_registry_and_never_serves_the_copy(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Issue 21.6: the registry is the source of truth. DeleteEditModel deletes there, then
    cleans the cache; a cache that refuses is logged and counted, not INTERNAL."""
    with support.running_server(tmp_path, tiny_model_dir) as h:
        edit = support.stream(h.stub.Edit, support.edit_request(support.encoded("PNG", (64, 64))))
        assert edit.code == grpc.StatusCode.OK, edit.details
        edit_model_id = edit.of("registered")[0].edit_model_id
        cached = h.data_dir / "registry" / "cache" / "models" / edit_model_id
        assert cached.is_dir()
        before = support.Resources.now()
        errors_before = _cache_delete_errors()
        # Removing a copy renames it into the cache's trash first: a file in the way refuses
        # every removal (for root too, unlike permission bits).
        trash = h.data_dir / "registry" / "cache" / "trash"
        shutil.rmtree(trash)
        trash.write_bytes(b"")

        _, deleted = support.unary(
            h.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=edit_model_id)
        )
        assert deleted.code == grpc.StatusCode.OK, deleted.details
        assert _cache_delete_errors() == errors_before + 1
        assert cached.is_dir()  # the disk refused; the copy is still there...
        # ... but the edit model is gone from the registry and is never served again.
        _, described = support.unary(
            h.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=edit_model_id)
        )
        assert described.code == grpc.StatusCode.NOT_FOUND, described.details
        listed, _ = support.unary(h.stub.ListEditModels, pb.ListEditModelsRequest())
        assert edit_model_id not in [m.edit_model_id for m in listed.edit_models]
        request = pb.SampleRequest(
            edit_model_id=edit_model_id,
            target_prompts=["A photo of a pear."],
            sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[1]),
        )
        assert support.stream(h.stub.Sample, request).code == grpc.StatusCode.NOT_FOUND

        # Once the disk lets go, the next use removes the copy.
        trash.unlink()
        trash.mkdir()
        assert support.stream(h.stub.Sample, request).code == grpc.StatusCode.NOT_FOUND
        assert not cached.exists()
        support.assert_nothing_left_behind(h)
        support.assert_resources_back(before)
