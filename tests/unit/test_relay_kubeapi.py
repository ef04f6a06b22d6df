"""The relay's kubeconfig reading, on a read-only root filesystem (its pod spec's default)."""

from __future__ import annotations

import base64
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from townsquare.relay.kubeapi import load_credentials


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed CA certificate, as a kubeconfig's certificate-authority."""
    path = tmp_path / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=test-ca",
         "-keyout", str(tmp_path / "ca.key"), "-out", str(path), "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return path


def kubeconfig(tmp_path: Path, cluster: dict[str, str]) -> Path:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                "clusters": [
                    {"name": "k", "cluster": {"server": "https://127.0.0.1:6443", **cluster}}
                ],
                "users": [{"name": "u", "user": {"token": "secret"}}],
            }
        )
    )
    return path


def no_temporary_directory(*_: object, **__: object) -> str:
    raise FileNotFoundError("No usable temporary directory found")


def test_a_kubeconfig_naming_files_needs_no_writable_directory(
    tmp_path: Path, certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_directory)
    credentials = load_credentials(
        str(kubeconfig(tmp_path, {"certificate-authority": str(certificate)}))
    )
    assert credentials.token == "secret"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)


def test_inline_certificates_are_written_to_a_scratch_directory(
    tmp_path: Path, certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inline = base64.b64encode(certificate.read_bytes()).decode()
    config = kubeconfig(tmp_path, {"certificate-authority-data": inline})
    assert isinstance(load_credentials(str(config)).ssl_context, ssl.SSLContext)
    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_directory)
    with pytest.raises(FileNotFoundError):
        load_credentials(str(config))
