"""Two watches feed the edge: shard-map ConfigMaps and the relays' EndpointSlices.

One watch per kind, filtered by labels on the API server, never one per room: an edge that
serves ten thousand rooms holds two connections. Each watch lists first (that is what
/readyz waits for), then follows changes from the list's resourceVersion, and lists again
when the server says that version is too old, forgetting what the new list lacks (the
deletions it missed). The map last seen stays in force while the API server or the
operator is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import structlog

from townsquare.api.names import relay_service_name
from townsquare.edge.admission import Endpoint, Gate
from townsquare.sharding import ShardMap

ROOM_LABEL = "townsquare.dev/room"
SHARD_MAPS = "app.kubernetes.io/component=shard-map,app.kubernetes.io/managed-by=townsquare"
RELAYS = "app.kubernetes.io/component=relay,app.kubernetes.io/managed-by=townsquare"
SHARD_MAP_KEY = "shardmap.json"
LISTENER_PORT = "listeners"

log = structlog.get_logger("townsquare.edge")


@dataclass(frozen=True)
class ApiServer:
    """Where the API server is and how to authenticate: from the pod's service account or
    a kubeconfig (the kubernetes client's loaders; only its configuration is used)."""

    host: str
    ssl: ssl.SSLContext | bool
    token: Callable[[], str | None]

    @classmethod
    def load(cls) -> ApiServer:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        context: ssl.SSLContext | bool = False
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
        return cls(
            host=configuration.host.rstrip("/"),
            ssl=context,
            token=lambda: configuration.get_api_key_with_prefix("authorization"),
        )


def _rooms_path(api: str, plural: str, namespace: str | None) -> str:
    return f"{api}/namespaces/{namespace}/{plural}" if namespace else f"{api}/{plural}"


class Watcher:
    """Keeps a Gate's maps and relay endpoints in step with the API server."""

    def __init__(self, server: ApiServer, gate: Gate, namespaces: Sequence[str] = ()) -> None:
        self.server = server
        self.gate = gate
        self.namespaces: list[str | None] = list(namespaces) or [None]
        """Namespaces served (None: all); each adds one watch per kind."""
        self.synced = {
            (what, namespace): asyncio.Event()
            for what in ("maps", "relays")
            for namespace in self.namespaces
        }

    @property
    def ready(self) -> bool:
        return all(event.is_set() for event in self.synced.values())

    async def run(self, session: aiohttp.ClientSession) -> None:
        follows = []
        for namespace in self.namespaces:
            maps = _rooms_path("/api/v1", "configmaps", namespace)
            slices = _rooms_path("/apis/discovery.k8s.io/v1", "endpointslices", namespace)
            follows += [
                self._follow(session, maps, SHARD_MAPS, "maps", namespace, self._on_map),
                self._follow(session, slices, RELAYS, "relays", namespace, self._on_slice),
            ]
        await asyncio.gather(*follows)

    def relisted(
        self, what: str, namespace: str | None, items: Sequence[Mapping[str, Any]]
    ) -> None:
        """A full list of maps or relay slices (of `namespace`, None: all): apply each, and
        forget what it no longer has, since the watch missed those deletions."""
        if what == "maps":
            for item in items:
                self._on_map("ADDED", item)
            self.gate.keep_maps({key for item in items if (key := _room_of(item))}, namespace)
        else:
            for item in items:
                self._on_slice("ADDED", item)
            self.gate.keep_slices(
                {
                    (*key, item["metadata"].get("name", ""))
                    for item in items
                    if (key := _room_of(item))
                },
                namespace,
            )

    def _on_map(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = _room_of(obj)
        if key is None:
            return
        namespace, room = key
        meta = obj["metadata"]
        if kind == "DELETED":
            self.gate.set_map(namespace, room, None)
            return
        document = (obj.get("data") or {}).get(SHARD_MAP_KEY)
        try:
            shard_map = ShardMap.from_dict(json.loads(document)) if document else None
        except (KeyError, TypeError, ValueError) as error:
            log.warning("unreadable shard map kept out", room=f"{namespace}/{room}", error=error)
            return
        if shard_map is not None:
            self.gate.set_map(namespace, room, shard_map, source=str(meta.get("uid", "")))

    def _on_slice(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = _room_of(obj)
        if key is None:
            return
        namespace, room = key
        meta = obj["metadata"]
        if meta["labels"].get("kubernetes.io/service-name") != relay_service_name(room):
            return
        endpoints = None if kind == "DELETED" else endpoints_of(obj)
        self.gate.set_slice(namespace, room, meta.get("name", ""), endpoints)

    async def _follow(
        self,
        session: aiohttp.ClientSession,
        path: str,
        selector: str,
        what: str,
        namespace: str | None,
        apply: Callable[[str, Mapping[str, Any]], None],
    ) -> None:
        """List, then watch from the list's version; again from a list on 410 Gone."""
        while True:
            try:
                items, version = await self._list(session, path, selector)
                self.relisted(what, namespace, items)
                self.synced[(what, namespace)].set()
                while version is not None:
                    version = await self._watch(session, path, selector, version, apply)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("watch interrupted; listing again", path=path, error=repr(error))
                await asyncio.sleep(1.0)

    def _headers(self) -> dict[str, str]:
        token = self.server.token()
        return {"Authorization": token} if token else {}

    async def _list(
        self,
        session: aiohttp.ClientSession,
        path: str,
        selector: str,
    ) -> tuple[list[Mapping[str, Any]], str | None]:
        """The items and the list's resourceVersion."""
        url = f"{self.server.host}{path}?{urlencode({'labelSelector': selector})}"
        async with session.get(url, headers=self._headers(), ssl=self.server.ssl) as response:
            response.raise_for_status()
            body = await response.json()
        return list(body.get("items") or []), str(body["metadata"]["resourceVersion"])

    async def _watch(
        self,
        session: aiohttp.ClientSession,
        path: str,
        selector: str,
        version: str,
        apply: Callable[[str, Mapping[str, Any]], None],
    ) -> str | None:
        """Follow one watch request; the version to resume from, or None to list again."""
        query = {
            "labelSelector": selector,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
        }
        url = f"{self.server.host}{path}?{urlencode(query)}"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=330)
        async with session.get(
            url, headers=self._headers(), ssl=self.server.ssl, timeout=timeout
        ) as response:
            if response.status == 410:
                return None
            response.raise_for_status()
            async for event in _lines(response.content):
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    return None if obj.get("code") == 410 else version
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    apply(kind, obj)
        return version


def _room_of(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, room) an object of a room belongs to, by its room label."""
    meta = obj.get("metadata") or {}
    room = (meta.get("labels") or {}).get(ROOM_LABEL)
    namespace = meta.get("namespace")
    return (namespace, room) if room and namespace else None


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON events, one a line; a line may be longer than aiohttp's own line limit."""
    buffer = b""
    async for chunk in stream.iter_any():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


def endpoints_of(endpoint_slice: Mapping[str, Any]) -> dict[str, Endpoint]:
    """Relay pods of one EndpointSlice: listener address and readiness."""
    port = next(
        (
            p.get("port")
            for p in endpoint_slice.get("ports") or []
            if p.get("name") == LISTENER_PORT
        ),
        None,
    )
    found: dict[str, Endpoint] = {}
    for endpoint in endpoint_slice.get("endpoints") or []:
        target = endpoint.get("targetRef") or {}
        addresses = endpoint.get("addresses") or []
        if target.get("kind") != "Pod" or not target.get("name") or not addresses:
            continue
        conditions = endpoint.get("conditions") or {}
        ready = bool(conditions.get("ready")) and not conditions.get("terminating")
        host = addresses[0]
        host = f"[{host}]" if ":" in host else host
        found[target["name"]] = Endpoint(f"{host}:{port}" if port else host, ready)
    return found
