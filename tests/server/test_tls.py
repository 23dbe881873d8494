import subprocess

import grpc
import pytest

from parley.v1 import translate_pb2 as pb
from parley.v1 import translate_pb2_grpc as pb_grpc
from server.client import main as client_main
from server.config import parse_config
from tests.server.conftest import request


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=parley-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def secure_stub(server, certs, client_cert: bool):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "client.key").read_bytes() if client_cert else None,
        certificate_chain=(certs / "client.pem").read_bytes() if client_cert else None,
    )
    return pb_grpc.TranslatorStub(grpc.secure_channel(f"localhost:{server.server.port}", credentials))


def test_tls(start_server, certificates):
    server = start_server(tls_cert=certificates / "server.pem", tls_key=certificates / "server.key")
    response = secure_stub(server, certificates, client_cert=False).Translate(request("Hello."), timeout=10)
    assert response.translations[0].hypotheses
    with pytest.raises(grpc.RpcError) as error:  # plaintext to a TLS port
        server.stub().Translate(request("Hello."), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(start_server, certificates):
    server = start_server(tls_cert=certificates / "server.pem", tls_key=certificates / "server.key",
                          tls_client_ca=certificates / "ca.pem")
    assert secure_stub(server, certificates, client_cert=True).ListModels(pb.ListModelsRequest(), timeout=10).models
    with pytest.raises(grpc.RpcError) as error:
        secure_stub(server, certificates, client_cert=False).ListModels(pb.ListModelsRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("cert,key,client_ca,message", [
    ("server.key", "server.pem", None, "tls_cert {d}/server.key holds no PEM certificate"),
    ("server.pem", "server.pem", None, "tls_key {d}/server.pem holds no PEM private key"),
    ("server.pem", "client.key", None, "tls_key {d}/client.key is not the private key of tls_cert {d}/server.pem"),
    ("server.pem", "encrypted.key", None, "tls_key {d}/encrypted.key is encrypted; gRPC needs it unencrypted"),
    ("server.pem", "server.key", "ca.key", "tls_client_ca {d}/ca.key holds no PEM certificate"),
])
def test_unusable_tls_files_are_explained_before_the_start(certificates, capsys, cert, key, client_ca, message):
    """gRPC itself would say only 'Failed to bind to address'."""
    if not (certificates / "encrypted.key").exists():
        openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key",
                cwd=certificates)
    flags = ["--tls-cert", str(certificates / cert), "--tls-key", str(certificates / key)]
    if client_ca:
        flags += ["--tls-client-ca", str(certificates / client_ca)]
    with pytest.raises(SystemExit):
        parse_config(flags, {})
    assert message.format(d=certificates) in capsys.readouterr().err
    parse_config(["--tls-cert", str(certificates / "server.pem"), "--tls-key", str(certificates / "server.key"),
                  "--tls-client-ca", str(certificates / "ca.pem")], {})  # the right files pass


@pytest.mark.parametrize("flags,message", [
    (["--tls-ca", "server.key"], "--tls-ca {d}/server.key holds no PEM certificate"),
    (["--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-ca", "ca.pem", "--tls-cert", "client.pem", "--tls-key", "server.key"],
     "--tls-key {d}/server.key is not the private key of --tls-cert {d}/client.pem"),
])
def test_the_client_explains_unusable_tls_files(certificates, capsys, flags, message):
    flags = [f if f.startswith("--") else str(certificates / f) for f in flags]
    with pytest.raises(SystemExit) as exit:
        client_main(flags + ["--address", "127.0.0.1:1", "Hello."])
    assert exit.value.code == 2 and message.format(d=certificates) in capsys.readouterr().err
