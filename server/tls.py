"""TLS files checked before gRPC reads them: gRPC reports a file that is not PEM, an
encrypted key or a key that is not the certificate's only as a failure to bind (server)
or to connect (client)."""

from __future__ import annotations

import ssl
from pathlib import Path


def pem_problems(certificates: dict[str, Path | None], key: tuple[str, Path | None] | None = None) -> list[str]:
    """What is wrong with these files, each named as the user set it: `certificates` by name
    (None: not set), and the private key of the first certificate, if given."""
    def pem(path: Path) -> str:
        return path.read_bytes().decode("latin-1")

    problems = [f"{name} {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                for name, path in certificates.items() if path and "-----BEGIN CERTIFICATE-----" not in pem(path)]
    key_name, key_path = key or (None, None)
    if key_path:
        key_text = pem(key_path)
        if "PRIVATE KEY-----" not in key_text:
            problems.append(f"{key_name} {key_path} holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
        elif "ENCRYPTED" in key_text:
            problems.append(f"{key_name} {key_path} is encrypted; gRPC needs it unencrypted "
                            f"(openssl pkey -in {key_path} -out KEY)")
    if problems or not key_path:
        return problems
    cert_name, cert_path = next(iter(certificates.items()))
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path, password=lambda: b"")  # no prompt
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            return [f"{key_name} {key_path} is not the private key of {cert_name} {cert_path}"]
        return [f"{cert_name} {cert_path} and {key_name} {key_path} cannot be loaded: {error}"]
    return []
