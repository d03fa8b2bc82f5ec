"""Labels, expiry and deletion through the service (issue 20.4-20.6): the gRPC API, the SDK
(sync and asyncio) and the CLI against a real server on a loopback port with the real tiny
engine and the embedded MLflow registry, whose retention sweep runs every half second.

Unhappy paths: bad labels and time-to-lives (INVALID_ARGUMENT naming the accepted values,
through gRPC, the SDK and the CLI, the server staying ready), an expired edit model (NOT_FOUND
for Get, Sample and Delete, left out of List, then swept), a delete during an MLflow outage
(before anything was decided: UNAVAILABLE and still served; part-way: UNAVAILABLE, refused
from then on, and completed by a retry). The server's default time-to-live applies where a
request leaves it unset. About 40 s on the shared 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from forgedit_client import AsyncForgeditClient, ForgeditClient, ForgeditRpcError
from forgedit_client.cli import main as cli_main
from support.registry import restore, switchable
from support.server import (
    TOKEN,
    Harness,
    assert_nothing_left_behind,
    edit_request,
    running_server,
    sample_photo,
    stream,
    unary,
    wait_for,
)

from registry import EditModelRegistry, RegistryConfig
from server._proto import forgedit_pb2 as pb

QUICK: dict[str, Any] = {"updates": 2, "batch_size": 1, "steps": 2, "seeds": [3], "gammas": [0.6]}
DEFAULT_TTL_S = 7200.0


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("governance")
    registry = EditModelRegistry(
        RegistryConfig(data_dir=tmp / "data" / "registry", sweep_interval_s=0.5)
    )
    registry.start()
    try:
        with running_server(
            tmp, tiny_model_dir, registry=registry, edit_model_ttl_s=DEFAULT_TTL_S
        ) as h:
            yield h
    finally:
        registry.close()


@pytest.fixture(scope="module")
def client(harness: Harness) -> Iterator[ForgeditClient]:
    with ForgeditClient(f"127.0.0.1:{harness.port}", token=TOKEN) as c:
        yield c


def edit(harness: Harness, **fields: Any) -> str:
    outcome = stream(harness.stub.Edit, edit_request(sample_photo(), **fields))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    return str(outcome.of("completed")[0].edit_model_id)


# -- labels ------------------------------------------------------------------------------------


def test_labels_through_grpc_get_and_list_with_paging(harness: Harness) -> None:
    ids = [
        edit(harness, labels={"team": "grpc", "run": str(i)}, training={"seed": 100 + i})
        for i in (1, 2)
    ]
    got, outcome = unary(harness.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=ids[0]))
    assert outcome.code == grpc.StatusCode.OK
    assert dict(got.edit_model.labels) == {"run": "1", "team": "grpc"}
    # The server's default time-to-live applies when the request leaves it unset.
    expires = got.edit_model.expire_time.ToDatetime().timestamp()
    created = got.edit_model.create_time.ToDatetime().timestamp()
    assert abs(expires - created - DEFAULT_TTL_S) < 120

    seen, token = [], ""
    while True:
        page, outcome = unary(
            harness.stub.ListEditModels,
            pb.ListEditModelsRequest(page_size=1, page_token=token, labels={"team": "grpc"}),
        )
        assert outcome.code == grpc.StatusCode.OK
        seen += [m.edit_model_id for m in page.edit_models]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    one, _ = unary(
        harness.stub.ListEditModels, pb.ListEditModelsRequest(labels={"team": "grpc", "run": "2"})
    )
    assert [m.edit_model_id for m in one.edit_models] == [ids[1]]


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"labels": {"Team": "red"}}, "labels", "label key 'Team'"),
        ({"labels": {"team": "red team"}}, "labels", "has value 'red team'"),
        ({"labels": {f"k{i}": "v" for i in range(17)}}, "labels", "at most 16 labels"),
        ({"ttl_seconds": 0}, "ttl_seconds", "1..315360000 seconds"),
    ],
)
def test_bad_labels_and_ttls_are_invalid_argument_naming_what_is_accepted(
    harness: Harness, fields: dict[str, Any], field: str, says: str
) -> None:
    outcome = stream(harness.stub.Edit, edit_request(sample_photo(), **fields))
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert outcome.field_violations() == [field]
    assert says in outcome.details
    assert outcome.events == []  # refused before a job existed
    if "labels" in fields:
        _, listed = unary(
            harness.stub.ListEditModels, pb.ListEditModelsRequest(labels=fields["labels"])
        )
        assert listed.code == grpc.StatusCode.INVALID_ARGUMENT
        assert listed.field_violations() == ["labels"]
    assert_nothing_left_behind(harness)


# -- expiry ------------------------------------------------------------------------------------


def test_an_expired_edit_model_is_refused_like_a_deleted_one_then_swept(harness: Harness) -> None:
    model_id = edit(harness, ttl_seconds=2, labels={"team": "expiring"}, training={"seed": 200})
    got, _ = unary(harness.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=model_id))
    assert got.edit_model.HasField("expire_time")
    time.sleep(2.1)
    _, gone = unary(harness.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=model_id))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    sample = stream(
        harness.stub.Sample, pb.SampleRequest(edit_model_id=model_id, target_prompts=["A bear."])
    )
    assert sample.code == grpc.StatusCode.NOT_FOUND
    listed, _ = unary(
        harness.stub.ListEditModels, pb.ListEditModelsRequest(labels={"team": "expiring"})
    )
    assert list(listed.edit_models) == []
    # The sweep (every 0.5 s here) deletes it for real: no run left in MLflow.
    backend = harness.registry._backend
    assert wait_for(lambda: backend.find_runs(model_id, deleted_too=True) == [], timeout=60)
    _, deleted = unary(
        harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=model_id)
    )
    assert deleted.code == grpc.StatusCode.NOT_FOUND
    assert_nothing_left_behind(harness)


# -- deletion during an MLflow outage ------------------------------------------------------------


def test_delete_during_an_mlflow_outage(harness: Harness) -> None:
    registry = harness.registry
    before = edit(harness, labels={"team": "outage"}, training={"seed": 300})
    cut = edit(harness, labels={"team": "outage"}, training={"seed": 301})
    mlflow = switchable(registry)
    try:
        # Down before anything is decided: UNAVAILABLE, and the model is still served.
        mlflow.down = True
        _, refused = unary(
            harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=before)
        )
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        assert "being deleted" not in refused.details
        sampled = stream(
            harness.stub.Sample,
            pb.SampleRequest(
                edit_model_id=before,
                target_prompts=["A bear."],
                sweep=pb.SweepOptions(steps=2, seeds=[1], gammas=[0.6]),
            ),
        )
        assert sampled.code == grpc.StatusCode.OK, sampled.details

        # Down part-way (after the version is gone): UNAVAILABLE saying so; refused from then
        # on; the retry after MLflow is back completes it.
        mlflow.down = False
        delete_version = registry._backend.delete_version

        def then_down(version: Any) -> None:
            delete_version(version)
            mlflow.down = True

        registry._backend.delete_version = then_down  # type: ignore[method-assign]
        _, partway = unary(
            harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=cut)
        )
        registry._backend.delete_version = delete_version  # type: ignore[method-assign]
        assert partway.code == grpc.StatusCode.UNAVAILABLE
        assert "is being deleted" in partway.details
        sample = stream(
            harness.stub.Sample, pb.SampleRequest(edit_model_id=cut, target_prompts=["A bear."])
        )
        assert sample.code == grpc.StatusCode.NOT_FOUND
        mlflow.down = False
        _, done = unary(harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=cut))
        assert done.code == grpc.StatusCode.OK
        assert registry.pending_deletions() == []
        assert registry._backend.find_runs(cut, deleted_too=True) == []
        _, done = unary(
            harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=before)
        )
        assert done.code == grpc.StatusCode.OK
    finally:
        mlflow.down = False
        restore(registry)
    assert_nothing_left_behind(harness)


# -- SDK and CLI -------------------------------------------------------------------------------


def test_sdk_labels_expiry_and_delete_sync_and_async(
    harness: Harness, client: ForgeditClient, photos_dir: Path
) -> None:
    photo = photos_dir / "cat.jpg"
    result = client.edit(
        photo, "A cat.", labels={"team": "sdk"}, ttl_seconds=600, train_seed=400, **QUICK
    ).result()
    info = client.get_edit_model(result.edit_model_id)
    assert info.labels == {"team": "sdk"}
    assert info.expire_time is not None and info.create_time is not None
    assert 500 < (info.expire_time - info.create_time).total_seconds() < 700
    assert info.to_dict()["labels"] == {"team": "sdk"}

    async def run() -> tuple[str, list[str]]:
        async with AsyncForgeditClient(f"127.0.0.1:{harness.port}", token=TOKEN) as c:
            done = await c.edit(
                photo, "A cat.", labels={"team": "sdk", "via": "aio"}, train_seed=401, **QUICK
            ).result()
            listed = [m.edit_model_id async for m in c.list_edit_models(labels={"team": "sdk"})]
            await c.delete_edit_model(done.edit_model_id)
            return done.edit_model_id, listed

    aio_id, listed = asyncio.run(run())
    assert listed == [aio_id, result.edit_model_id]
    assert [m.edit_model_id for m in client.list_edit_models(labels={"team": "sdk"})] == [
        result.edit_model_id
    ]
    with pytest.raises(ForgeditRpcError) as bad:
        client.edit(photo, "A cat.", labels={"team": "no spaces"}, **QUICK).result()
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad.value.field_violations] == ["labels"]
    client.delete_edit_model(result.edit_model_id)
    with pytest.raises(ForgeditRpcError) as gone:
        client.get_edit_model(result.edit_model_id)
    assert gone.value.code == grpc.StatusCode.NOT_FOUND


def test_cli_labels_ttl_list_show_delete(
    harness: Harness, photos_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = ["--server", f"127.0.0.1:{harness.port}", "--token", TOKEN, "--json"]
    quick = ["--updates", "2", "--batch-size", "1", "--steps", "2", "--seeds", "3"]
    quick += ["--gammas", "0.6", "--train-seed", "500"]
    photo = str(photos_dir / "cat.jpg")
    governance = ["--label", "team=cli", "--label", "stage=test", "--ttl", "900"]
    status = cli_main(
        [*conn, "edit", photo, "A cat.", "--out", str(tmp_path / "o"), *quick, *governance]
    )
    assert status == 0
    model_id = json.loads(capsys.readouterr().out)["edit_model_id"]
    assert cli_main([*conn, "models", "list", "--label", "team=cli"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["edit_model_id"] for m in listed] == [model_id]
    assert listed[0]["labels"] == {"stage": "test", "team": "cli"} and listed[0]["expire_time"]
    assert cli_main([*conn, "models", "list", "--label", "team=nobody"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli_main([*conn, "models", "delete", model_id]) == 0
    capsys.readouterr()
    assert cli_main([*conn, "models", "show", model_id]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err

    status = cli_main(
        [*conn, "edit", photo, "A cat.", "--out", str(tmp_path / "x"), "--label=Team=cli"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("forgedit: error: INVALID_ARGUMENT: ")
    assert "label key 'Team'" in err[0]
    with pytest.raises(SystemExit) as usage:  # argparse: not KEY=VALUE at all
        cli_main([*conn, "models", "list", "--label", "novalue"])
    assert usage.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert_nothing_left_behind(harness)
