"""Principals against a real server: each token has a name; jobs and edit models record who
made them; another principal sees neither (NOT_FOUND, worded as for nothing at all, and absent
from listings) unless its token is an admin's; a request id cannot reach another principal's
job or edit model. Runs the real tiny engine and the real embedded MLflow registry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support import server as support

from server._proto import forgedit_pb2 as pb

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
ADMIN = "ops-token-0123456789"


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


ALICE, BOB, OPS = auth(TOKENS["alice"]), auth(TOKENS["bob"]), auth(ADMIN)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Any]:
    tokens = [{"name": name, "token": token} for name, token in TOKENS.items()]
    tokens.append({"name": "ops", "token": ADMIN, "admin": True})
    with support.running_server(
        tmp_path_factory.mktemp("server-principals"), tiny_model_dir, tokens=tokens
    ) as h:
        yield h


@pytest.fixture(scope="module")
def alices(harness: Any) -> tuple[str, str]:
    """(job id, edit model id) of one Edit made by alice."""
    request = support.edit_request(support.sample_photo(), request_id="alice-1")
    made = support.stream(harness.stub.Edit, request, metadata=ALICE)
    assert made.code == grpc.StatusCode.OK, made.details
    return made.events[0].job_id, made.of("completed")[0].edit_model_id


def test_jobs_and_edit_models_record_their_principal(harness: Any, alices: tuple) -> None:
    job_id, edit_model_id = alices
    got, outcome = support.unary(
        harness.stub.GetJob, pb.GetJobRequest(job_id=job_id), metadata=ALICE
    )
    assert outcome.code == grpc.StatusCode.OK and got.job.principal == "alice"
    model, outcome = support.unary(
        harness.stub.GetEditModel,
        pb.GetEditModelRequest(edit_model_id=edit_model_id),
        metadata=ALICE,
    )
    assert outcome.code == grpc.StatusCode.OK and model.edit_model.principal == "alice"


def test_another_principal_sees_nothing_of_them(harness: Any, alices: tuple) -> None:
    job_id, edit_model_id = alices
    unknown_job = "job_" + "0" * 32
    s = harness.stub
    for call, request in (
        (s.GetJob, pb.GetJobRequest(job_id=job_id)),
        (s.CancelJob, pb.CancelJobRequest(job_id=job_id)),
        (s.GetEditModel, pb.GetEditModelRequest(edit_model_id=edit_model_id)),
        (s.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=edit_model_id)),
    ):
        _, outcome = support.unary(call, request, metadata=BOB)
        assert outcome.code == grpc.StatusCode.NOT_FOUND, (call, outcome.details)
    for call, request in (
        (s.WatchJob, pb.WatchJobRequest(job_id=job_id)),
        (s.WatchJob, pb.WatchJobRequest(request_id="alice-1")),
        (s.Sample, pb.SampleRequest(edit_model_id=edit_model_id, target_prompts=["A pear."])),
    ):
        outcome = support.stream(call, request, metadata=BOB, timeout=30)
        assert outcome.code == grpc.StatusCode.NOT_FOUND and not outcome.events, outcome.details
    # Worded exactly as for a job that does not exist (only the id differs).
    _, theirs = support.unary(s.GetJob, pb.GetJobRequest(job_id=job_id), metadata=BOB)
    _, nobody = support.unary(s.GetJob, pb.GetJobRequest(job_id=unknown_job), metadata=BOB)
    assert theirs.details.replace(job_id, "X") == nobody.details.replace(unknown_job, "X")
    listed, _ = support.unary(s.ListEditModels, pb.ListEditModelsRequest(), metadata=BOB)
    assert edit_model_id not in {m.edit_model_id for m in listed.edit_models}
    # Still there for alice: bob's delete did nothing.
    mine, _ = support.unary(s.ListEditModels, pb.ListEditModelsRequest(), metadata=ALICE)
    assert edit_model_id in {m.edit_model_id for m in mine.edit_models}


def test_another_principals_request_id_is_answered_as_an_unknown_one(
    harness: Any, alices: tuple
) -> None:
    """Issue 21.5: WatchJob by another principal's request id must not reveal the job id it
    names; the answer is the one for a request id nobody used (only the id differs)."""
    job_id, _ = alices
    s = harness.stub
    theirs = support.stream(s.WatchJob, pb.WatchJobRequest(request_id="alice-1"), metadata=BOB)
    nobody = support.stream(s.WatchJob, pb.WatchJobRequest(request_id="nobody-1"), metadata=BOB)
    assert theirs.code == nobody.code == grpc.StatusCode.NOT_FOUND
    assert job_id not in theirs.details, theirs.details
    assert theirs.details.replace("alice-1", "X") == nobody.details.replace("nobody-1", "X")
    mine, nothing = (o.detail(error_details_pb2.ResourceInfo) for o in (theirs, nobody))
    assert job_id not in str(mine)
    assert str(mine).replace("alice-1", "X") == str(nothing).replace("nobody-1", "X")
    # The same for a job id: another principal's is worded as one that does not exist.
    unknown = "job_" + "0" * 32
    theirs = support.stream(s.WatchJob, pb.WatchJobRequest(job_id=job_id), metadata=BOB)
    nobody = support.stream(s.WatchJob, pb.WatchJobRequest(job_id=unknown), metadata=BOB)
    assert theirs.details.replace(job_id, "X") == nobody.details.replace(unknown, "X")


def test_a_request_id_cannot_reach_another_principals_work(harness: Any, alices: tuple) -> None:
    job_id, edit_model_id = alices
    request = support.edit_request(support.sample_photo(), request_id="alice-1")
    outcome = support.stream(harness.stub.Edit, request, metadata=BOB, timeout=60)
    assert outcome.code == grpc.StatusCode.ALREADY_EXISTS, outcome.details
    assert job_id not in outcome.details and edit_model_id not in outcome.details
    assert not outcome.events


def test_an_admin_sees_everyones(harness: Any, alices: tuple) -> None:
    job_id, edit_model_id = alices
    got, outcome = support.unary(harness.stub.GetJob, pb.GetJobRequest(job_id=job_id), metadata=OPS)
    assert outcome.code == grpc.StatusCode.OK and got.job.principal == "alice"
    listed, _ = support.unary(harness.stub.ListEditModels, pb.ListEditModelsRequest(), metadata=OPS)
    assert edit_model_id in {m.edit_model_id for m in listed.edit_models}
    watched = support.stream(
        harness.stub.WatchJob, pb.WatchJobRequest(job_id=job_id), metadata=OPS, timeout=30
    )
    assert watched.code == grpc.StatusCode.OK and watched.kinds()[-1] == "completed"


def test_the_same_fine_tune_is_not_shared_across_principals(harness: Any, alices: tuple) -> None:
    """Alice's edit model would be reused for the very same fine-tune (seeded): for bob it is
    trained and registered anew, his own, and alice's stays hers."""
    _, alices_model = alices
    request = support.edit_request(support.sample_photo())
    made = support.stream(harness.stub.Edit, request, metadata=BOB)
    assert made.code == grpc.StatusCode.OK, made.details
    assert made.of("training"), "bob's edit must be fine-tuned, not alice's reused"
    (registered,) = made.of("registered")
    assert not registered.deduplicated and registered.edit_model_id != alices_model
    again = support.stream(harness.stub.Edit, request, metadata=BOB)
    assert again.code == grpc.StatusCode.OK and not again.of("training")  # his own is reused
    assert again.of("completed")[0].edit_model_id == registered.edit_model_id


def test_the_sdk_reports_the_principal(harness: Any, alices: tuple) -> None:
    from forgedit_client import ForgeditClient

    job_id, edit_model_id = alices
    with ForgeditClient(f"127.0.0.1:{harness.port}", token=TOKENS["alice"]) as client:
        assert client.get_job(job_id).principal == "alice"
        assert client.get_edit_model(edit_model_id).principal == "alice"
