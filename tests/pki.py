"""Certificates for the DICOM TLS tests, made by the openssl command line in the test's folder.

Real X.509 as a hospital's CA issues them: a self-signed CA, and leaf certificates it signs for
127.0.0.1 and localhost, usable by a server and a client. Keys are RSA 2048 (DCMTK's default
BCP 195 profile negotiates RSA suites) and written 0600, as a deployment keeps them.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Credentials:
    """A certificate and its private key, as PEM files."""

    certificate: Path
    private_key: Path


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        pytest.fail("openssl is not installed (Debian package openssl)")
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {args[0]} failed: {done.stderr}"


def certificate_authority(folder: Path, name: str) -> Credentials:
    """A self-signed CA called `name`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = Credentials(folder / f"{name}.crt", folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", str(ca.private_key), "-out", str(ca.certificate),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    ca.private_key.chmod(0o600)
    return ca


def issue(
    ca: Credentials, folder: Path, name: str, alt_names: str = "IP:127.0.0.1,DNS:localhost"
) -> Credentials:
    """A certificate with common name `name`, signed by `ca`, for TLS servers and clients."""
    leaf = Credentials(folder / f"{name}.crt", folder / f"{name}.key")
    request, extensions = folder / f"{name}.csr", folder / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={alt_names}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(leaf.private_key), "-out", str(request),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.certificate), "-CAkey", str(ca.private_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(leaf.certificate),
    )  # fmt: skip
    leaf.private_key.chmod(0o600)
    return leaf


@dataclass(frozen=True)
class Pki:
    """The test's trust world: the hospital CA, an outsider CA, and certificates of each."""

    ca: Credentials
    server: Credentials
    client: Credentials
    other_ca: Credentials
    outsider: Credentials


def make_pki(folder: Path) -> Pki:
    """CA and outsider CA, a server and a client certificate of the CA, and one of the outsider."""
    ca = certificate_authority(folder, "hospital-ca")
    other_ca = certificate_authority(folder, "other-ca")
    return Pki(
        ca=ca,
        server=issue(ca, folder, "dicomnode-server"),
        client=issue(ca, folder, "pacs-client"),
        other_ca=other_ca,
        outsider=issue(other_ca, folder, "outsider-client"),
    )
