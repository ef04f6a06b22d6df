"""The two reads the origin and test tools make of the Kubernetes API: a room's shard map
and a pod's IP. Never the relay's: a relay pod has no API access (see `topology`).

Deliberately not the operator's client (`townsquare.kube`) nor the `kubernetes` package:
the origin must keep serving while the operator restarts, start fast, and stay small, so it
speaks plain HTTPS with aiohttp using the kubeconfig (or a pod's service account).
"""

from __future__ import annotations

import base64
import functools
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from townsquare.relay.topology import SHARD_MAP_KEY, parse_map, relay_pod_name
from townsquare.sharding import ShardMap

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(RuntimeError):
    """No usable credentials: says which file or field was missing."""


@dataclass(frozen=True)
class Credentials:
    server: str
    ssl_context: ssl.SSLContext | bool
    token: str | None = None


def _materialize(
    entry: Mapping[str, Any], name: str, base: Path, workdir: Callable[[], Path]
) -> str | None:
    """A path for `name` (a file path or inline `<name>-data`), relative to the kubeconfig.

    Only inline data needs a scratch directory: a relay whose kubeconfig names files runs
    on a read-only root filesystem with no writable /tmp at all (its pod spec's default).
    """
    if entry.get(f"{name}-data"):
        path = workdir() / name
        path.write_bytes(base64.b64decode(entry[f"{name}-data"]))
        return str(path)
    if entry.get(name):
        return str(base / entry[name])
    return None


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    """Credentials from `kubeconfig` (default $KUBECONFIG), else the pod's service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        if not host or not (SERVICE_ACCOUNT / "token").exists():
            raise KubeConfigError("no KUBECONFIG and no in-cluster service account")
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token = (SERVICE_ACCOUNT / "token").read_text().strip()
        return Credentials(f"https://{host}:{port}", context, token)
    file = Path(path)
    try:
        document = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise KubeConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        current = document["current-context"]
        context_entry = _named(document["contexts"], current)["context"]
        cluster = _named(document["clusters"], context_entry["cluster"])["cluster"]
        user = _named(document.get("users") or [], context_entry.get("user", ""))
        user = (user or {}).get("user", {})
    except (KeyError, TypeError) as exc:
        raise KubeConfigError(f"{path}: missing {exc} in the current context") from None
    workdir = functools.cache(lambda: Path(tempfile.mkdtemp(prefix="townsquare-kube-")))
    base = file.parent
    server = str(cluster["server"])
    verify: ssl.SSLContext | bool = True
    if server.startswith("https"):
        if cluster.get("insecure-skip-tls-verify"):
            verify = False
        else:
            verify = ssl.create_default_context(
                cafile=_materialize(cluster, "certificate-authority", base, workdir)
            )
        cert = _materialize(user, "client-certificate", base, workdir)
        key = _materialize(user, "client-key", base, workdir)
        if cert and key:
            if verify is False:
                verify = ssl.create_default_context()
                verify.check_hostname = False
                verify.verify_mode = ssl.CERT_NONE
            assert isinstance(verify, ssl.SSLContext)
            verify.load_cert_chain(cert, key)
    return Credentials(server, verify, user.get("token"))


def _named(entries: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for entry in entries:
        if entry.get("name") == name:
            return entry
    raise KeyError(name)


class KubeReader:
    """GETs against the API server; None for a 404, KubeError for anything else."""

    def __init__(self, credentials: Credentials, timeout: float = 5.0) -> None:
        self.credentials = credentials
        headers = {"Accept": "application/json"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(ssl=credentials.ssl_context, limit=2),
        )

    async def get(self, path: str) -> dict[str, Any] | None:
        async with self._session.get(self.credentials.server + path) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                text = (await response.text())[:200]
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=text
                )
            document: dict[str, Any] = await response.json()
            return document

    async def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        found = await self.get(f"/api/v1/namespaces/{namespace}/configmaps/{name}")
        return None if found is None else dict(found.get("data") or {})

    async def pod_ip(self, namespace: str, name: str) -> str | None:
        found = await self.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        if found is None or found.get("metadata", {}).get("deletionTimestamp"):
            return None
        ip = found.get("status", {}).get("podIP")
        return str(ip) if ip else None

    async def close(self) -> None:
        await self._session.close()


class ConfigMapSource:
    """The shard map as the operator publishes it, read from the API server."""

    def __init__(self, reader: KubeReader, namespace: str, room: str) -> None:
        self.reader, self.namespace, self.name = reader, namespace, f"{room}-shards"

    async def read(self) -> ShardMap | None:
        data = await self.reader.config_map(self.namespace, self.name)
        return parse_map((data or {}).get(SHARD_MAP_KEY))


class PodResolver:
    """A relay's address: its pod's IP from the API server, and the room's relay port."""

    def __init__(self, reader: KubeReader, namespace: str, room: str, port: int) -> None:
        self.reader, self.namespace, self.room, self.port = reader, namespace, room, port

    async def relay_address(self, ordinal: int) -> tuple[str, int] | None:
        ip = await self.reader.pod_ip(self.namespace, relay_pod_name(self.room, ordinal))
        return (ip, self.port) if ip else None
