"""Shared-token authentication on every call (API, reflection, standard health) and TLS with a self-signed
certificate made here; the sync and asyncio clients both pass, wrong or missing tokens get UNAUTHENTICATED."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from pdllm.cluster.api.in_process import InProcessBackend
from pdllm.cluster.api.server import ApiServer, ApiServerConfig
from pdllm.cluster.common.auth import TokenAuthInterceptor, make_channel, new_token, token_matches

from pdllm.client import ApiError, AsyncClient, Client, generate_via_server

SMALL = {"gen_length": 8, "block_length": 8, "steps": 8}
CONTEXT = "The pass key is 71432. Remember it."


def self_signed() -> tuple[bytes, bytes]:
    """A certificate for localhost and 127.0.0.1 and its key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def backend(tiny_llada):
    b = InProcessBackend.from_directory(str(tiny_llada), name="tiny")
    yield b
    b.close()


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture(scope="module")
def plain_server(backend, token):
    with ApiServer(backend, ApiServerConfig(port=0, auth_token=token)) as srv:
        yield srv


@pytest.fixture(scope="module")
def cert_and_key():
    return self_signed()


@pytest.fixture(scope="module")
def tls_server(backend, token, cert_and_key):
    cert, key = cert_and_key
    with ApiServer(backend, ApiServerConfig(port=0, auth_token=token, tls_cert=cert, tls_key=key)) as srv:
        yield srv


def test_token_compare():
    assert token_matches([("authorization", "Bearer abc")], "abc")
    assert token_matches([("x", "y"), ("Authorization", b"Bearer abc")], "abc")
    assert not token_matches([("authorization", "Bearer abd")], "abc")
    assert not token_matches([("authorization", "abc")], "abc")
    assert not token_matches([], "abc") and not token_matches(None, "abc")
    with pytest.raises(ValueError):
        TokenAuthInterceptor("")


def test_right_token_is_served(plain_server, token):
    with Client(plain_server.address, auth_token=token, timeout_s=30) as c:
        assert c.generate(CONTEXT, "q?", SMALL)["stats"]["steps"] == 8
        assert c.health()["serving"]


@pytest.mark.parametrize("bad", [None, "", "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated_everywhere(plain_server, token, bad):
    with Client(plain_server.address, auth_token=bad, timeout_s=10, retries=0) as c:
        for call in (
            lambda: c.generate(CONTEXT, "q?", SMALL),
            lambda: list(c.generate_stream(CONTEXT, "q?", SMALL)),
            c.health,
            c.model_info,
            lambda: c.get_batch("b1"),
            lambda: c.list_batches(),
        ):
            with pytest.raises(ApiError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with make_channel(plain_server.address, bad or None) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):
            ProtoReflectionDescriptorDatabase(channel).get_services()
    with Client(plain_server.address, auth_token=token, timeout_s=30) as c:  # and it keeps serving
        assert c.health()["serving"]


def test_reflection_with_token(plain_server, token):
    with make_channel(plain_server.address, token) as channel:
        assert "pdllm.v1.Pdllm" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_tls_with_token(tls_server, token, cert_and_key, tmp_path):
    cert, _ = cert_and_key
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert)
    with Client(tls_server.address, auth_token=token, tls_ca=ca_file, timeout_s=30) as c:
        assert c.generate(CONTEXT, "q?", SMALL)["stats"]["steps"] == 8
    out = generate_via_server(tls_server.address, CONTEXT, "q?", SMALL, auth_token=token, tls_ca=cert)
    assert set(out) >= {"answer", "stats"}
    with Client(tls_server.address, auth_token="wrong", tls_ca=cert, timeout_s=10, retries=0) as c:
        with pytest.raises(ApiError) as err:
            c.health()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_tls_server_refuses_plaintext_and_untrusted_ca(tls_server, token):
    with Client(tls_server.address, auth_token=token, timeout_s=2, retries=0) as c:
        with pytest.raises(ApiError) as err:
            c.health()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    other_ca, _ = self_signed()
    with Client(tls_server.address, auth_token=token, tls_ca=other_ca, timeout_s=2, retries=0) as c:
        with pytest.raises(ApiError) as err:
            c.health()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_async_client_plain_and_tls(plain_server, tls_server, token, cert_and_key):
    cert, _ = cert_and_key

    async def run() -> tuple[dict, list, dict, str]:
        async with AsyncClient(plain_server.address, auth_token=token, timeout_s=30) as c:
            unary = await c.generate(CONTEXT, "q?", SMALL)
            events = [e async for e in c.generate_stream(CONTEXT, "q?", SMALL)]
        async with AsyncClient(tls_server.address, auth_token=token, tls_ca=cert, timeout_s=30) as c:
            info = await c.model_info()
        async with AsyncClient(plain_server.address, auth_token="nope", timeout_s=5, retries=0) as c:
            try:
                await c.health()
                code = "OK"
            except ApiError as exc:
                code = exc.code.name
        return unary, events, info, code

    unary, events, info, code = asyncio.run(run())
    assert unary["stats"]["steps"] == 8
    assert events[-1]["type"] == "final" and events[-1]["answer"] == unary["answer"]
    assert info["name"] == "tiny"
    assert code == "UNAUTHENTICATED"


def test_aio_interceptor_guards_an_asyncio_service():
    """What the chunk-transfer service (grpc.aio) uses: the same token rule on an asyncio server."""
    from grpc_health.v1._async import HealthServicer
    from pdllm.cluster.common.auth import AioTokenAuthInterceptor, token_metadata

    async def run() -> tuple[str, str]:
        server = grpc.aio.server(interceptors=[AioTokenAuthInterceptor("s3cret")])
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                ok = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=token_metadata("s3cret"))
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=token_metadata("guess"))
                    denied = "OK"
                except grpc.aio.AioRpcError as exc:
                    denied = exc.code().name
        finally:
            await server.stop(0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(ok.status), denied

    assert asyncio.run(run()) == ("SERVING", "UNAUTHENTICATED")
