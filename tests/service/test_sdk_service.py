"""The SDK and the ``forgedit`` CLI against a real server on a free loopback port (the real tiny
engine and the embedded MLflow registry, started by the server's own test harness).

Covers: typed event streams and results for Edit and Sample, the asyncio client, models and
jobs calls, status mapping (INVALID_ARGUMENT with field violations, UNAUTHENTICATED,
NOT_FOUND), the CLI's files/exit codes/JSON, and the SDK re-attaching by itself after the
connection is cut mid-stream (through a loopback TCP proxy that drops every connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from forgedit_client import (
    Accepted,
    AsyncForgeditClient,
    Captioned,
    Completed,
    ForgeditClient,
    ForgeditRpcError,
    Heartbeat,
    ImageReady,
    InvalidOptionError,
    OutputOptions,
    Preview,
    Registered,
    RetryPolicy,
    TrainingProgress,
)
from forgedit_client.cli import main as cli_main
from PIL import Image
from support.server import TOKEN, Harness, assert_nothing_left_behind, running_server

QUICK: dict[str, Any] = {"updates": 2, "batch_size": 1, "train_seed": 7, "steps": 2, "seeds": [3]}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Harness]:
    with running_server(tmp_path_factory.mktemp("sdk-service"), tiny_model_dir) as h:
        yield h


@pytest.fixture(scope="module")
def client(harness: Harness) -> Iterator[ForgeditClient]:
    with ForgeditClient(f"127.0.0.1:{harness.port}", token=TOKEN) as c:
        yield c


@pytest.fixture(scope="module")
def photo(photos_dir: Path) -> Path:
    return photos_dir / "coffee.jpg"


@pytest.fixture(scope="module")
def edited(client: ForgeditClient, photo: Path) -> tuple[list[Any], Any]:
    """One Edit through the SDK, shared by the tests that read it."""
    stream = client.edit(photo, "A photo of a pear.", gammas=[0.5, 0.7], **QUICK)
    events = list(stream)
    return events, stream.result()


def test_edit_yields_typed_events_and_a_result(edited: tuple[list[Any], Any]) -> None:
    events, result = edited
    assert isinstance(events[0], Accepted) and isinstance(events[-1], Completed)
    # The first look comes before the caption: a preview, never a result.
    steps = [e for e in events if not isinstance(e, Heartbeat)]
    assert isinstance(steps[1], Preview) and isinstance(steps[2], Captioned)
    assert steps[1].kind == "training_free" and steps[1].format == "png"
    assert result.previews == [steps[1]] and steps[1] not in result.images
    assert [type(e).__name__ for e in events if isinstance(e, TrainingProgress)] == [
        "TrainingProgress"
    ] * 2
    registered = [e for e in events if isinstance(e, Registered)]
    assert len(registered) == 1 and registered[0].edit_model_id == result.edit_model_id
    assert result.completed and result.train_seed == 7 and len(result.losses) == 2
    assert result.source_prompt  # BLIP (tiny) caption
    assert sorted(i.params.gamma for i in result.images) == [0.5, 0.7]
    for image in result.images:
        with Image.open(io.BytesIO(image.png)) as img:
            assert img.format == "PNG" and img.size == (image.width, image.height)
    assert result.timings is not None and result.timings.total_seconds > 0


def test_sample_by_id_and_models_calls(
    client: ForgeditClient, edited: tuple[list[Any], Any]
) -> None:
    _, result = edited
    again = client.sample(result.edit_model_id, ["A photo of a lemon."], steps=2, seeds=[5])
    sampled = again.result()
    assert sampled.completed and len(sampled.images) == 3  # server default: 3 gammas
    assert {i.params.seed for i in sampled.images} == {5}
    assert sampled.train_seed is None  # nothing was trained

    info = client.get_edit_model(result.edit_model_id)
    assert info.edit_model_id == result.edit_model_id and info.training_mode == "joint"
    ids = [m.edit_model_id for m in client.list_edit_models(page_size=1)]
    assert result.edit_model_id in ids


def test_watch_job_replays_a_finished_job(
    client: ForgeditClient, edited: tuple[list[Any], Any]
) -> None:
    events, result = edited
    job = client.get_job(result.job_id)
    assert job.state == "succeeded" and job.edit_model_id == result.edit_model_id
    replay = client.watch_job(result.job_id, after_sequence=3)
    replayed = [e for e in replay if not isinstance(e, Heartbeat)]
    assert replayed[0].sequence == 4
    # Heartbeats fill live silences and repeat the last sequence number; a replay of a
    # finished job has no silences, so compare the job's own events only.
    live = [e.sequence for e in events if e.sequence > 3 and not isinstance(e, Heartbeat)]
    assert [e.sequence for e in replayed] == live


def test_server_errors_become_one_typed_error(
    harness: Harness, client: ForgeditClient, photo: Path
) -> None:
    with pytest.raises(ForgeditRpcError) as bad:
        client.edit(photo, "A photo of a pear.", steps=0, updates=2).result()
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.field_violations and "steps" in bad.value.field_violations[0].field

    with pytest.raises(ForgeditRpcError) as missing:
        client.get_edit_model("em-does-not-exist")
    assert missing.value.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)

    with (
        ForgeditClient(f"127.0.0.1:{harness.port}", token="wrong") as intruder,
        pytest.raises(ForgeditRpcError) as denied,
    ):
        list(intruder.list_edit_models())
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert_nothing_left_behind(harness)


def test_async_client_edits_and_samples(harness: Harness, photo: Path) -> None:
    async def run() -> tuple[Any, Any]:
        async with AsyncForgeditClient(f"127.0.0.1:{harness.port}", token=TOKEN) as c:
            stream = c.edit(photo.read_bytes(), "A photo of a plum.", gammas=[0.6], **QUICK)
            kinds = [type(e).__name__ async for e in stream]
            result = await stream.result()
            sampled = await c.sample(
                result.edit_model_id, "A photo of a fig.", steps=2, gammas=[0.6], seeds=[1]
            ).result()
            return kinds, (result, sampled)

    kinds, (result, sampled) = asyncio.run(run())
    assert kinds[0] == "Accepted" and kinds[-1] == "Completed"
    assert len(result.images) == 1 and len(sampled.images) == 1


def test_sdk_previews_and_image_formats_sync_and_async(
    harness: Harness, client: ForgeditClient, photo: Path, tmp_path: Path
) -> None:
    stream = client.edit(
        photo,
        "A photo of a fig.",
        image_format="webp",
        image_quality=50,
        x0_every=1,
        gammas=[0.6],
        **QUICK,
    )
    result = stream.result()
    (image,) = result.images
    assert image.format == "webp" and image.suffix == ".webp"
    with Image.open(io.BytesIO(image.data)) as img:
        assert img.format == "WEBP"
    with pytest.raises(ValueError, match="not png"):
        _ = image.png
    kinds = sorted((p.kind, p.index, p.step) for p in result.previews)
    assert kinds == [("training_free", 0, 10), ("x0", 0, 1), ("x0", 0, 2)]
    assert result.previews[0].save(tmp_path / "p.webp").read_bytes() == result.previews[0].data

    async def run() -> Any:
        async with AsyncForgeditClient(f"127.0.0.1:{harness.port}", token=TOKEN) as c:
            stream = c.edit(
                photo.read_bytes(),
                "A photo of a fig.",
                output=OutputOptions(format="jpeg"),
                training_free_preview=False,
                gammas=[0.6],
                **QUICK,
            )
            events = [e async for e in stream]
            return events, await stream.result()

    events, jpeg = asyncio.run(run())
    assert not [e for e in events if isinstance(e, Preview)]
    assert [i.format for i in jpeg.images] == ["jpeg"]
    with Image.open(io.BytesIO(jpeg.images[0].data)) as img:
        assert img.format == "JPEG"

    # Bad choices: caught by the SDK when it can tell, else by the server, naming the field.
    with pytest.raises(InvalidOptionError, match="accepted: png, webp, jpeg"):
        client.edit(photo, "A photo of a fig.", image_format="gif")
    with pytest.raises(ForgeditRpcError) as refused:
        client.sample(
            result.edit_model_id, "A photo of a fig.", training_free_preview=True
        ).result()
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in refused.value.field_violations] == ["preview.training_free"]
    with pytest.raises(ForgeditRpcError) as lossless:
        client.edit(photo, "A photo of a fig.", image_quality=80, **QUICK).result()
    assert [v.field for v in lossless.value.field_violations] == ["output.quality"]
    assert_nothing_left_behind(harness)


# ------------------------------------------------------------------------------------ CLI


def test_cli_edit_writes_images_sheet_and_json(
    harness: Harness, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = cli_main(
        [
            "--server",
            f"127.0.0.1:{harness.port}",
            "--token",
            TOKEN,
            "--json",
            "edit",
            str(photo),
            "A photo of a pear.",
            "--out",
            str(out),
            "--updates",
            "2",
            "--batch-size",
            "1",
            "--train-seed",
            "7",
            "--steps",
            "2",
            "--gammas",
            "0.5,0.7",
            "--forget",
            "donotforget,encoderkv",
            "--seeds",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["edit_model_id"] and len(summary["images"]) == 4
    names = sorted(p.name for p in out.iterdir())
    assert "contact_sheet.png" in names and "results.json" in names
    assert "preview.png" in names and summary["preview"] == "preview.png"
    assert sorted(summary["files"].values()) == sorted(n for n in names if n[0].isdigit())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 0 and sheet.height > 0
    assert (
        json.loads((out / "results.json").read_text())["edit_model_id"] == summary["edit_model_id"]
    )

    # The same edit model, re-sampled from the CLI, then listed and shown.
    status = cli_main(
        [
            "--server",
            f"127.0.0.1:{harness.port}",
            "--token",
            TOKEN,
            "sample",
            summary["edit_model_id"],
            "A photo of a lemon.",
            "--out",
            str(tmp_path / "again"),
            "--steps",
            "2",
            "--gammas",
            "0.6",
            "--json",
        ]
    )
    assert status == 0
    assert len(json.loads(capsys.readouterr().out)["images"]) == 1
    status = cli_main(
        [
            "--server",
            f"127.0.0.1:{harness.port}",
            "--token",
            TOKEN,
            "--json",
            "models",
            "show",
            summary["edit_model_id"],
        ]
    )
    assert status == 0
    assert json.loads(capsys.readouterr().out)["edit_model_id"] == summary["edit_model_id"]


def test_cli_writes_the_format_asked_and_the_latest_x0_preview_per_image(
    harness: Harness, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "jpeg"
    args = ["--server", f"127.0.0.1:{harness.port}", "--token", TOKEN, "--json", "edit"]
    args += [str(photo), "A photo of a pear.", "--out", str(out), "--updates", "2"]
    args += ["--batch-size", "1", "--steps", "2", "--gammas", "0.5,0.7", "--seeds", "3"]
    status = cli_main([*args, "--image-format", "jpeg", "--x0-every", "1", "--no-preview"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out)
    names = sorted(p.name for p in out.iterdir())
    assert sorted(summary["files"].values()) == [n for n in names if n.endswith(".jpg")]
    assert len(summary["files"]) == 2 and "preview" not in summary
    assert not [n for n in names if n.startswith("preview.")]
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["x0-000.jpg", "x0-001.jpg"]
    with Image.open(out / "previews" / "x0-000.jpg") as shown:
        assert shown.format == "JPEG" and shown.size == (8, 8)
    with Image.open(out / "contact_sheet.png") as sheet:  # built here, from the JPEGs
        assert sheet.format == "PNG"

    status = cli_main([*args, "--image-quality", "50"])  # with png, the default
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert "INVALID_ARGUMENT" in err[0] and "output.quality" in err[0]


def test_cli_reports_invalid_input_in_one_line_with_exit_2(
    harness: Harness, photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(
        [
            "--server",
            f"127.0.0.1:{harness.port}",
            "--token",
            TOKEN,
            "edit",
            str(photo),
            "A photo of a pear.",
            "--out",
            str(tmp_path),
            "--steps",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("forgedit: error: INVALID_ARGUMENT: ")
    status = cli_main(
        ["--server", f"127.0.0.1:{harness.port}", "--token", "wrong", "models", "list"]
    )
    assert status == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# ------------------------------------------------------------------- re-attach after a drop


class DroppingProxy:
    """A loopback TCP proxy to ``target_port`` whose ``drop()`` resets every open connection
    (as a failing load balancer or network would); new connections are accepted again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.drop()


def test_sdk_reattaches_by_itself_after_the_connection_drops(harness: Harness, photo: Path) -> None:
    proxy = DroppingProxy(harness.port)
    try:
        with ForgeditClient(
            f"127.0.0.1:{proxy.port}",
            token=TOKEN,
            retry=RetryPolicy(max_attempts=8, initial_backoff=0.1, max_backoff=0.5),
        ) as c:
            # detach: the job must outlive its first connection for a re-attach to find it.
            stream = c.edit(
                photo,
                "A photo of a quince.",
                detach=True,
                gammas=[0.5, 0.6],
                **{**QUICK, "updates": 6},
            )
            events = []
            for event in stream:
                events.append(event)
                if isinstance(event, TrainingProgress) and event.update == 1:
                    proxy.drop()
            result = stream.result()
    finally:
        proxy.close()
    # Each event once, in order (a heartbeat repeats the latest sequence: it is not one).
    sequences = [e.sequence for e in events if not isinstance(e, Heartbeat)]
    assert sequences == sorted(set(sequences))
    assert isinstance(events[-1], Completed) and result.completed
    assert len([e for e in events if isinstance(e, ImageReady)]) == 2
    assert stream.reattaches >= 1 and stream.gaps == 0
    assert_nothing_left_behind(harness)


# --------------------------------------------------------------------------- TLS and mTLS


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate,
    as PEM files in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, issuer: Any, issuer_key: Any, *, ca: bool, san: Any = None) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca_cert = issue("forgedit test CA", None, None, ca=True)
    server_key, server_cert = issue(
        "localhost",
        ca_cert.subject,
        ca_key,
        ca=False,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = issue("sdk-client", ca_cert.subject, ca_key, ca=False)
    files = {}
    for name, obj in (("ca", ca_cert), ("server", server_cert), ("client", client_cert)):
        files[f"{name}_cert"] = directory / f"{name}.crt"
        files[f"{name}_cert"].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    for name, key in (("server", server_key), ("client", client_key)):
        files[f"{name}_key"] = directory / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return files


def test_mutual_tls_with_token_as_call_credentials(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from forgedit_client import TlsConfig

    pki = make_pki(tmp_path)
    with running_server(
        tmp_path / "tls",
        tiny_model_dir,
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca_cert"],
    ) as h:
        target = f"localhost:{h.port}"
        tls = TlsConfig.from_files(pki["ca_cert"], pki["client_cert"], pki["client_key"])
        with ForgeditClient(target, token=TOKEN, tls=tls) as c:
            assert isinstance(list(c.list_edit_models()), list)  # token + client cert accepted
        with (
            ForgeditClient(target, token="wrong", tls=tls) as c,
            pytest.raises(ForgeditRpcError) as denied,
        ):
            list(c.list_edit_models())
        assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Without a client certificate the handshake fails: UNAVAILABLE, not retried forever.
        no_cert = TlsConfig.from_files(pki["ca_cert"])
        with (
            ForgeditClient(
                target,
                token=TOKEN,
                tls=no_cert,
                retry=RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.05),
            ) as c,
            pytest.raises(ForgeditRpcError) as refused,
        ):
            list(c.list_edit_models())
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        # The CLI's --ca/--cert/--key reach the same channel.
        status = cli_main(
            [
                "--server",
                target,
                "--token",
                TOKEN,
                "--ca",
                str(pki["ca_cert"]),
                "--cert",
                str(pki["client_cert"]),
                "--key",
                str(pki["client_key"]),
                "--json",
                "models",
                "list",
            ]
        )
        assert status == 0 and isinstance(json.loads(capsys.readouterr().out), list)


def test_cancel_during_training_ends_the_stream_cancelled_and_frees_the_device(
    harness: Harness, client: ForgeditClient, photo: Path
) -> None:
    # A deadline, so a server that never ends a cancelled job fails this test instead of
    # hanging it.
    stream = client.edit(photo, "A photo of a pear.", timeout=90, **{**QUICK, "updates": 400})
    for event in stream:
        if isinstance(event, TrainingProgress):
            assert stream.job_id
            client.cancel_job(stream.job_id)
            break
    with pytest.raises(ForgeditRpcError) as ended:
        stream.result()  # the rest of the stream: it ends with the job's final status
    assert ended.value.code == grpc.StatusCode.CANCELLED
    assert client.get_job(ended.value.job_id or "").state == "cancelled"
    assert_nothing_left_behind(harness)
