"""TLS and mutual TLS against a real server: certificates from a throwaway CA made here."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from support.server import AUTH, TOKEN

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.main import create_server
from server.settings import ServerSettings


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple | None = None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("test-ca", ca_key, ca=True)
    server_key, client_key = _key(), _key()
    files = {
        "ca": _pem(ca),
        "server_cert": _pem(_cert("localhost", server_key, (ca, ca_key), server=True)),
        "server_key": _pem(server_key),
        "client_cert": _pem(_cert("client", client_key, (ca, ca_key))),
        "client_key": _pem(client_key),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


class _Engine:
    """Enough of an engine for a server that only answers health and job lookups."""

    fingerprint = "f" * 64
    native_height = 64
    native_width = 64
    can_caption = False
    resolutions = ((64, 64),)

    def relative_step_cost(self, height: int, width: int) -> float:
        return 1.0

    def warmup(self) -> None:
        pass

    def settle(self, timeout: float | None = None) -> bool:
        return True


def _serve(tmp_path: Path, pki: dict[str, Path], mutual: bool) -> tuple:
    settings = ServerSettings(
        grpc_port=0,
        health_port=None,
        metrics_port=None,
        data_dir=tmp_path,
        auth_tokens=[SecretStr(TOKEN)],
        base_models={"tiny": tmp_path},
        tls_cert_file=pki["server_cert"],
        tls_key_file=pki["server_key"],
        tls_client_ca_file=pki["ca"] if mutual else None,
    )
    from registry import EditModelRegistry, RegistryConfig

    registry = EditModelRegistry(RegistryConfig(data_dir=tmp_path / "registry"))
    server, port = create_server(
        settings,
        engine_factory=lambda n, d: _Engine(),  # type: ignore[arg-type,return-value]
        registry=registry,
    )
    assert server.wait_ready(30)
    return server, port, registry


def _ready(channel: grpc.Channel) -> int:
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service="forgedit.v1.ForgeditService"), timeout=10)
        .status
    )


def test_tls_serves_only_over_tls(tmp_path: Path, pki: dict[str, Path]) -> None:
    server, port, registry = _serve(tmp_path, pki, mutual=False)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            assert _ready(channel) == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.ForgeditServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetJob(pb.GetJobRequest(job_id="job_x"), metadata=AUTH, timeout=10)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND  # authenticated, served
        with grpc.insecure_channel(f"localhost:{port}") as plain, pytest.raises(grpc.RpcError) as e:
            _ready(plain)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
        registry.close()


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    server, port, registry = _serve(tmp_path, pki, mutual=True)
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki["ca"].read_bytes(),
            private_key=pki["client_key"].read_bytes(),
            certificate_chain=pki["client_cert"].read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", with_cert) as channel:
            assert _ready(channel) == health_pb2.HealthCheckResponse.SERVING
        without = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with (
            grpc.secure_channel(f"localhost:{port}", without) as channel,
            pytest.raises(grpc.RpcError) as e,
        ):
            _ready(channel)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
        registry.close()
