"""Defaults that make one fine-tune serve every edit, against real servers (real tiny engine,
real embedded MLflow registry): the content-derived training seed reuses a stored fine-tune
and makes a retried request idempotent on another replica, the server's precision is the
request's default, and GetEditModel/ListEditModels say how to reproduce a stored model."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from support.server import Harness, assert_nothing_left_behind, running_server, stream, unary

from forgedit.config import TrainingConfig
from server._proto import forgedit_pb2 as pb


def _photo() -> bytes:
    rng = np.random.default_rng(11)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _request(prompt: str = "A photo of a fig.", **training: object) -> pb.EditRequest:
    return pb.EditRequest(
        image=_photo(),
        target_prompts=[prompt],
        training=pb.TrainingOptions(updates=2, batch_size=1, **training),  # type: ignore[arg-type]
        sweep=pb.SweepOptions(steps=2, gammas=[0.6], seeds=[3]),
    )


@pytest.fixture(scope="module")
def replica_a(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, registry: object
) -> Iterator[Harness]:
    with running_server(
        tmp_path_factory.mktemp("replica-a"),
        tiny_model_dir,
        registry=registry,  # type: ignore[arg-type]
        precision="fast",
    ) as h:
        yield h


@pytest.fixture(scope="module")
def replica_b(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, registry: object
) -> Iterator[Harness]:
    with running_server(
        tmp_path_factory.mktemp("replica-b"),
        tiny_model_dir,
        registry=registry,  # type: ignore[arg-type]
        precision="fast",
    ) as h:
        yield h


@pytest.fixture(scope="module")
def first(replica_a: Harness) -> pb.CompletedEvent:
    request = _request()
    request.request_id = "defaults-1"
    outcome = stream(replica_a.stub.Edit, request)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert "training" in outcome.kinds()
    return outcome.of("completed")[0]


def test_a_stored_edit_model_says_how_to_reproduce_it(
    replica_a: Harness, first: pb.CompletedEvent
) -> None:
    got, outcome = unary(
        replica_a.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=first.edit_model_id)
    )
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    model = got.edit_model
    assert model.train_seed == first.train_seed != 0
    training = TrainingConfig.from_dict(json.loads(model.training_config_json))
    assert training.seed == first.train_seed
    assert [(s.updates, s.batch_size) for s in training.stages] == [(2, 1)]
    # The request left precision unset: the server's FORGEDIT_PRECISION trained it.
    assert training.precision == "fast"
    listed, _ = unary(
        replica_a.stub.ListEditModels, pb.ListEditModelsRequest(image_sha256=model.image_sha256)
    )
    (same,) = listed.edit_models
    assert same.train_seed == model.train_seed
    assert same.training_config_json == model.training_config_json


def test_the_same_image_reuses_its_fine_tune_by_default(
    replica_a: Harness, first: pb.CompletedEvent
) -> None:
    outcome = stream(replica_a.stub.Edit, _request("A photo of a plum."))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert "training" not in outcome.kinds()
    registered = outcome.of("registered")[0]
    assert registered.deduplicated and registered.edit_model_id == first.edit_model_id
    assert outcome.of("completed")[0].train_seed == first.train_seed
    assert_nothing_left_behind(replica_a)


def test_a_retried_request_is_idempotent_on_another_replica(
    replica_b: Harness, first: pb.CompletedEvent
) -> None:
    """Replica B never saw job 'defaults-1' (as after an expiry or a restart): it answers with
    the model replica A stored instead of training again and reporting a conflict."""
    retry = _request()
    retry.request_id = "defaults-1"
    outcome = stream(replica_b.stub.Edit, retry)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert "training" not in outcome.kinds()
    assert outcome.of("completed")[0].edit_model_id == first.edit_model_id
    assert outcome.of("completed")[0].train_seed == first.train_seed
    assert_nothing_left_behind(replica_b)


def test_fresh_seed_trains_a_new_edit_model(replica_a: Harness, first: pb.CompletedEvent) -> None:
    outcome = stream(replica_a.stub.Edit, _request(fresh_seed=True))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert "training" in outcome.kinds()
    completed = outcome.of("completed")[0]
    assert completed.edit_model_id != first.edit_model_id
    assert completed.train_seed != first.train_seed
    conflicting = stream(replica_a.stub.Edit, _request(fresh_seed=True, seed=1))
    assert conflicting.code == grpc.StatusCode.INVALID_ARGUMENT
    assert conflicting.field_violations() == ["training.fresh_seed"]
    assert_nothing_left_behind(replica_a)
