"""MLflow unreachable: an Edit still streams its images, its edit model is spooled (the
``registered`` event says so) and can be sampled by ID on this replica at once; listing says
UNAVAILABLE with a retry hint instead of failing opaquely."""

from __future__ import annotations

from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from support import server as support

from server._proto import forgedit_pb2 as pb


def test_edit_with_mlflow_down_spools_and_still_streams_images(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from registry import EditModelRegistry, RegistryConfig

    port = support.free_port()  # nothing listens there
    registry = EditModelRegistry(
        RegistryConfig(
            data_dir=tmp_path / "data" / "registry",
            tracking_uri=f"http://127.0.0.1:{port}",
            http_timeout_s=2,
            http_max_retries=0,
            flush_initial_backoff_s=60.0,
        )
    )
    try:
        with support.running_server(tmp_path, tiny_model_dir, registry=registry) as h:
            outcome = support.stream(h.stub.Edit, support.edit_request(support.sample_photo()))
            assert outcome.code == grpc.StatusCode.OK, outcome.details
            registered = outcome.of("registered")[0]
            assert registered.spooled and registered.version == 0
            assert len(outcome.of("image")) == 1

            sampled = support.stream(
                h.stub.Sample,
                pb.SampleRequest(
                    edit_model_id=registered.edit_model_id,
                    target_prompts=["A photo of a pear."],
                    sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[1]),
                ),
            )
            assert sampled.code == grpc.StatusCode.OK, sampled.details

            _, listed = support.unary(
                h.stub.ListEditModels, pb.ListEditModelsRequest(page_token="abc")
            )
            assert listed.code == grpc.StatusCode.UNAVAILABLE, listed.details
            assert listed.detail(error_details_pb2.RetryInfo) is not None
            assert h.scheduler.wait_idle(30)
            assert not any(h.temp_dir.iterdir())
            spool = h.data_dir / "registry" / "spool"
            assert len(list((spool / "entries").iterdir())) == 1
            assert not any((spool / "staging").iterdir())
    finally:
        registry.close()
