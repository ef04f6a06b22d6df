"""The few Kubernetes calls the operator makes. Blocking: call them off the event loop.

Children are written with server-side apply under one field manager, so applying twice
changes nothing and a field changed by hand is taken back on the next reconcile. Every call
has a timeout: a half-open connection fails the call (and the room retries) instead of
holding a worker thread for ever.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from urllib3.util.retry import Retry

from townsquare.api.models import GROUP, KIND, PLURAL, VERSION
from townsquare.api.names import relay_set_name, shard_map_name
from townsquare.kube.children import (
    COMPONENT_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    ROOM_LABEL,
    SHARD_MAP_KEY,
    Manifest,
)
from townsquare.partitions import (
    SLOT_LABEL,
    Claim,
    ClaimsTable,
    labelled_slot,
    read_claims,
    unlabelled_selector,
)
from townsquare.sharding import ShardMap

APPLY = "application/apply-patch+yaml"
REVISION_LABEL = "controller-revision-hash"
"""The StatefulSet controller's label: which template revision a pod was created from."""
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0
POOL_SIZE = 32
"""Connections kept to the API server: at least the worker threads that call it at once."""
FINALIZER = f"{GROUP}/drain"
"""Holds a room with children until its relays have drained, so a deletion mid-event never
drops listeners. A room with no children yet has none: it goes at once."""
EARLIER_FINALIZERS = ("kopf.zalando.org/KopfFinalizerMarker", f"{GROUP}/partition-")
"""What earlier versions held rooms with (kopf's, one a partition): released the same way."""


CLAIMS = "townsquare-partitions"
"""The one ConfigMap in which every replica claims the hash slots it acts on (see
partitions.free_slots), in `--claims-namespace` (the chart: the release's namespace)."""
HOLDER_ANNOTATION = f"{GROUP}/acting"
"""On kopf's peering object: the replica whose passes may be running (see may_act)."""


@dataclass(frozen=True)
class Peering:
    """One kopf peering object as read: its peers (identity -> priority, lifetime,
    lastseen) and the replica that holds the rooms."""

    name: str
    namespace: str | None
    version: str
    peers: dict[str, Any]
    holder: str | None

    @staticmethod
    def of(body: Mapping[str, Any]) -> Peering:
        meta = body["metadata"]
        return Peering(
            name=meta["name"],
            namespace=meta.get("namespace"),
            version=str(meta.get("resourceVersion", "")),
            peers=dict(body.get("status") or {}),
            holder=(meta.get("annotations") or {}).get(HOLDER_ANNOTATION),
        )


def our_finalizers(meta: Mapping[str, Any]) -> list[str]:
    """The finalizers on a room that this operator (or an earlier version of it) put there."""
    return [
        f
        for f in meta.get("finalizers") or ()
        if f == FINALIZER or f == EARLIER_FINALIZERS[0] or f.startswith(EARLIER_FINALIZERS[1])
    ]


def load_config(pool_size: int = POOL_SIZE) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the KUBECONFIG context.

    The pool size is set on the configuration before the client exists: the client builds
    its connection pool from it once, so setting it afterwards has no effect.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    configuration.retries = retry_policy()
    return client.ApiClient(configuration)


def retry_policy() -> Retry:
    """What the client re-sends by itself: a GET whose answer timed out, once (with the
    read timeout that bounds a read at about 2 x 15 s, well inside the liveness limit on a
    stuck reconcile), and nothing else. A write is never re-sent: a pass checks its claim
    just before each write (the fence), and a copy re-sent after a timeout would leave up
    to a whole timeout after that check, unchecked. The pass retries it, fenced again."""
    return Retry(total=1, connect=0, read=1, redirect=0, status=0, other=0, allowed_methods={"GET"})


def refuses_credentials(error: BaseException) -> bool:
    """Whether the API server refused who we are (401) or what we may do (403), as opposed
    to not answering (a connection refused, a timeout, a 5xx)."""
    return isinstance(error, ApiException) and error.status in (401, 403)


@dataclass(frozen=True)
class RelayPod:
    """One relay pod as the scheduler and kubelet (here kwok) left it."""

    ordinal: int
    ready: bool
    created: datetime
    ready_since: datetime | None
    restarted: bool = False
    scheduled_at: datetime | None = None
    """When it was bound to a node; None while Pending."""
    unscheduled: str = ""
    """The scheduler's reason while Pending (why no node fits)."""
    revision: str = ""
    """The StatefulSet template revision the pod was created from."""
    uid: str = ""

    @property
    def startup_seconds(self) -> float | None:
        """Creation to Ready: the start-up time the scaling policy plans with. None when the
        pod restarted: its last Ready transition then measures the restart, not a start."""
        if self.ready_since is None or self.restarted:
            return None
        return max(0.0, (self.ready_since - self.created).total_seconds())


def relay_pod(body: Mapping[str, Any], room: str) -> RelayPod | None:
    """A relay pod from its API object (as a watch delivers it); None if it is no relay of
    the room, or is going away."""
    meta = body.get("metadata") or {}
    match = re.fullmatch(rf"{re.escape(relay_set_name(room))}-([0-9]+)", meta.get("name", ""))
    created = timestamp(meta.get("creationTimestamp"))
    if not match or meta.get("deletionTimestamp") or created is None:
        return None
    status = body.get("status") or {}
    conditions = status.get("conditions") or []
    ready: Mapping[str, Any] = next((c for c in conditions if c.get("type") == "Ready"), {})
    ready_since = (
        timestamp(ready.get("lastTransitionTime")) if ready.get("status") == "True" else None
    )
    restarts = sum(c.get("restartCount") or 0 for c in status.get("containerStatuses") or [])
    scheduled_at, unscheduled = scheduling(body)
    return RelayPod(
        ordinal=int(match.group(1)),
        ready=ready_since is not None,
        created=created,
        ready_since=ready_since,
        restarted=restarts > 0,
        scheduled_at=scheduled_at,
        unscheduled=unscheduled,
        revision=str((meta.get("labels") or {}).get(REVISION_LABEL, "")),
        uid=str(meta.get("uid") or ""),
    )


def scheduling(body: Mapping[str, Any]) -> tuple[datetime | None, str]:
    """When the pod was bound to a node, or (None and) the scheduler's reason why not."""
    conditions = (body.get("status") or {}).get("conditions") or []
    scheduled: Mapping[str, Any] = next(
        (c for c in conditions if c.get("type") == "PodScheduled"), {}
    )
    if (body.get("spec") or {}).get("nodeName"):
        return timestamp(scheduled.get("lastTransitionTime")) or timestamp(
            (body.get("metadata") or {}).get("creationTimestamp")
        ), ""
    return None, str(scheduled.get("message") or scheduled.get("reason") or "")


def timestamp(value: Any) -> datetime | None:
    """A time as the API server writes it (RFC 3339), or as the client already parsed it."""
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class Cluster:
    """Reads and writes for rooms and their children, each call with a timeout."""

    def __init__(
        self,
        api: client.ApiClient,
        timeout: tuple[float, float] = (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
        identity: str = MANAGER,
    ) -> None:
        self.timeout = timeout
        self._fence: Callable[[], None] = _unfenced
        self.identity = identity
        """Names this process in the Events it posts (reportingInstance): with several
        replicas, the API server's record shows which one acted."""
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._apply_by_kind: dict[str, Callable[..., Any]] = {
            "StatefulSet": self.apps.patch_namespaced_stateful_set,
            "Service": self.core.patch_namespaced_service,
            "ConfigMap": self.core.patch_namespaced_config_map,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
        }

    def fenced(self, fence: Callable[[], None]) -> Cluster:
        """This client, with `fence` called just before each write to a room or its children
        (it raises to refuse the write): a pass's writes stop the moment its claim lapses,
        also in the middle of the pass. Reads, and the claims' own writes, are not fenced."""
        view = copy.copy(self)
        view._fence = fence
        return view

    def apply(self, manifest: Manifest) -> tuple[str, int]:
        """Server-side apply one child, taking back fields others changed.

        Returns the child's version as stored (see `child_version`), so a later watch event
        tells our own write from someone else's.
        """
        self._fence()
        meta = manifest["metadata"]
        stored = self._apply_by_kind[manifest["kind"]](
            meta["name"],
            meta["namespace"],
            manifest,
            field_manager=MANAGER,
            force=True,
            _content_type=APPLY,
            _request_timeout=self.timeout,
            _preload_content=False,  # a dict, not client models: thousands of rooms apply
        )
        return child_version(json.loads(stored.data)["metadata"])

    def scale_relays(self, namespace: str, room: str, replicas: int) -> None:
        """Set the relay StatefulSet's size alone, leaving its pod template as it is."""
        self._fence()
        response = self.apps.patch_namespaced_stateful_set(
            relay_set_name(room), namespace, {"spec": {"replicas": replicas}},
            field_manager=MANAGER, _content_type="application/merge-patch+json",
            _request_timeout=self.timeout, _preload_content=False,
        )  # fmt: skip
        _drained(response)

    def read_room(self, namespace: str, name: str) -> dict[str, Any]:
        """The room as stored now (not a cached view), so decisions see our own writes."""
        room: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, _request_timeout=self.timeout
        )
        return room

    def hold_room(self, room: Mapping[str, Any]) -> None:
        """Add our finalizer to the room as read (a conflict, if it changed since, fails the
        call and the pass retries): from now on its deletion waits for the drain. Call it
        before writing the room's status, which moves its version."""
        self._fence()
        meta = room["metadata"]
        finalizers = [*meta.get("finalizers", ()), FINALIZER]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        response = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
            _request_timeout=self.timeout, _preload_content=False,
        )  # fmt: skip
        _drained(response)

    def release_room(self, room: Mapping[str, Any]) -> None:
        """Remove our finalizers (and earlier versions'): the room may go. A JSON patch that
        first tests the finalizers as read: our own status write since does not conflict,
        a finalizer added meanwhile (the garbage collector's) does, and the pass retries."""
        self._fence()
        meta = room["metadata"]
        current = list(meta.get("finalizers", ()))
        ours = set(our_finalizers(meta))
        kept = [f for f in current if f not in ours]
        patch = [
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "replace", "path": "/metadata/finalizers", "value": kept},
        ]
        response = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
            _content_type="application/json-patch+json",
            _request_timeout=self.timeout, _preload_content=False,
        )  # fmt: skip
        _drained(response)

    def room_if_exists(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The room as stored now, or None when it is gone."""
        try:
            return self.read_room(namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def read_peers(self, peering: str, namespaces: tuple[str, ...]) -> list[Peering] | None:
        """kopf's peering object(s): the cluster's one, or one per namespace served. None
        when one is missing: kopf then keeps every replica paused."""
        try:
            if not namespaces:
                bodies = [
                    self.custom.get_cluster_custom_object(
                        "kopf.dev", "v1", "clusterkopfpeerings", peering,
                        _request_timeout=self.timeout,
                    )
                ]  # fmt: skip
            else:
                bodies = [
                    self.custom.get_namespaced_custom_object(
                        "kopf.dev", "v1", namespace, "kopfpeerings", peering,
                        _request_timeout=self.timeout,
                    )
                    for namespace in namespaces
                ]  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return [Peering.of(body) for body in bodies]

    def read_claims(self, namespace: str) -> ClaimsTable:
        """The claims table as stored: its claims, version and uid (none: there is none)."""
        try:
            body = self.core.read_namespaced_config_map(
                CLAIMS, namespace, _request_timeout=self.timeout, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return ClaimsTable({})
            raise
        stored = json.loads(body.data)
        meta = stored["metadata"]
        claims = read_claims(stored.get("data") or {})
        return ClaimsTable(claims, str(meta["resourceVersion"]), str(meta["uid"]))

    def write_claim(
        self,
        namespace: str,
        version: str | None,
        identity: str,
        claim: Claim | None,
        expired: Iterable[str] = (),
    ) -> str:
        """Write this replica's claim (None: let go of its slots) on the table as it was
        read, dropping the `expired` claims of replicas gone; returns the table's uid. The
        write is conditional: a patch carries the version read (resourceVersion), and a
        create fails if the table exists. A table changed since fails the call (409), and
        the caller reads it again: two replicas never claim one slot."""
        data: dict[str, str | None] = {key: None for key in expired}
        data[identity] = claim.encode() if claim else None
        if version is None:
            body = {
                "metadata": {"name": CLAIMS, "labels": {"app.kubernetes.io/name": "townsquare"}},
                "data": {key: value for key, value in data.items() if value is not None},
            }
            response = self.core.create_namespaced_config_map(
                namespace, body, _request_timeout=self.timeout, _preload_content=False
            )
        else:
            patch = {"metadata": {"resourceVersion": version}, "data": data}
            response = self.core.patch_namespaced_config_map(
                CLAIMS, namespace, patch, _request_timeout=self.timeout, _preload_content=False
            )
        return str(json.loads(response.data)["metadata"]["uid"])

    def hold_peering(self, peering: Peering, holder: str | None) -> None:
        """Name the replica that holds the rooms (None: nobody) on a peering object as it
        was read: a conflict (it changed since) fails the call, and the caller reads again."""
        meta = {"annotations": {HOLDER_ANNOTATION: holder}, "resourceVersion": peering.version}
        args = ("kopf.dev", "v1")
        if peering.namespace is None:
            response = self.custom.patch_cluster_custom_object(
                *args, "clusterkopfpeerings", peering.name, {"metadata": meta},
                _request_timeout=self.timeout, _preload_content=False,
            )  # fmt: skip
        else:
            response = self.custom.patch_namespaced_custom_object(
                *args, peering.namespace, "kopfpeerings", peering.name, {"metadata": meta},
                _request_timeout=self.timeout, _preload_content=False,
            )  # fmt: skip
        _drained(response)

    def relay_pods(self, namespace: str, room: str) -> list[RelayPod]:
        """The room's relay pods with their ordinals and readiness (one LIST: for tools; the
        operator reads its shared watch instead)."""
        response = self.core.list_namespaced_pod(
            namespace,
            label_selector=f"{ROOM_LABEL}={room}",
            _preload_content=False,
            _request_timeout=self.timeout,
        )
        pods = json.loads(response.data)
        found = [pod for body in pods.get("items", []) if (pod := relay_pod(body, room))]
        return sorted(found, key=lambda p: p.ordinal)

    def create_pod(self, manifest: Manifest) -> str | None:
        """Create a pod; one that exists already (a pass repeated) is left as it is.

        Returns the API server's reason when it refuses the pod (forbidden, invalid, over
        quota), None when the pod is there.
        """
        self._fence()
        try:
            self.core.create_namespaced_pod(
                manifest["metadata"]["namespace"], manifest, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            if exc.status in (403, 422) and exc.body:
                return str(json.loads(exc.body).get("message") or exc.reason)
            raise
        return None

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod at once; one already gone is fine."""
        self._fence()
        try:
            self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=0, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def relay_template(self, namespace: str, room: str) -> tuple[str, bool]:
        """The relay StatefulSet's current template revision ("" before it exists), and
        whether its pods carry the slot label (see children.relay_stateful_set)."""
        try:
            relay_set = self.apps.read_namespaced_stateful_set_status(  # RBAC: status only
                relay_set_name(room), namespace, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return "", True
            raise
        revision = str((relay_set.status and relay_set.status.update_revision) or "")
        template = relay_set.spec.template.metadata if relay_set.spec else None
        return revision, SLOT_LABEL in ((template and template.labels) or {})

    def unlabelled_relay_pods(self, namespaces: Iterable[str | None]) -> int:
        """How many relay pods carry no slot label (made before pods carried it), in the
        namespaces served (None: all): one LIST each, filtered by the API server."""
        selector = f"{COMPONENT_LABEL}=relay,{unlabelled_selector()}"
        return sum(1 for _ in self._list_raw(self.core, "pod", namespaces, selector))

    def _list_raw(
        self, api: Any, kind: str, namespaces: Iterable[str | None], selector: str
    ) -> Iterator[dict[str, Any]]:
        """The items of `kind` (the client's spelling: "pod", "stateful_set") from one LIST
        per namespace served (None: all), filtered by the API server with `selector`, as
        plain JSON (not deserialized into client models)."""
        for namespace in namespaces:
            args: tuple[str, ...]
            if namespace is None:
                listing, args = getattr(api, f"list_{kind}_for_all_namespaces"), ()
            else:
                listing, args = getattr(api, f"list_namespaced_{kind}"), (namespace,)
            answer = listing(
                *args, label_selector=selector, _request_timeout=self.timeout,
                _preload_content=False,
            )  # fmt: skip
            yield from json.loads(answer.data).get("items") or []

    def unlabelled_relay_templates(self, namespaces: Iterable[str | None]) -> int:
        """How many relay StatefulSets' pod templates carry no slot label (made before pods
        carried it), whether or not they have pods now, in the namespaces served (None:
        all): one LIST each of our relay StatefulSets, the templates judged here (the API
        server filters on an object's own labels only)."""
        selector = f"{COMPONENT_LABEL}=relay,{MANAGED_BY_LABEL}={MANAGER}"
        found = 0
        for relay_set in self._list_raw(self.apps, "stateful_set", namespaces, selector):
            template = ((relay_set.get("spec") or {}).get("template") or {}).get("metadata")
            if labelled_slot((template or {}).get("labels") or {}) is None:
                found += 1
        return found

    def replace_relay(self, namespace: str, room: str, pod: RelayPod) -> None:
        """Delete one drained relay pod, so the StatefulSet recreates it from its current
        template; the UID precondition never deletes a pod recreated meanwhile."""
        self._fence()
        try:
            self.core.delete_namespaced_pod(
                f"{relay_set_name(room)}-{pod.ordinal}",
                namespace,
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pod.uid)),
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or already a new pod
                raise

    def pod_creation_failures(self, namespace: str, room: str) -> tuple[tuple[datetime, str], ...]:
        """(when, message) of the relay StatefulSet's FailedCreate Events: the API server's
        own reason for refusing relay pods (quota, Pod Security, a webhook)."""
        selector = (
            f"involvedObject.kind=StatefulSet,involvedObject.name={relay_set_name(room)},"
            "reason=FailedCreate"
        )
        events = self.core.list_namespaced_event(
            namespace, field_selector=selector, _request_timeout=self.timeout
        ).items
        found = []
        for event in events:
            series = event.series.last_observed_time if event.series else None
            when = series or event.last_timestamp or event.event_time
            when = when or event.metadata.creation_timestamp
            if when is not None:
                found.append((when, str(event.message or "")))
        return tuple(sorted(found))

    def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        """A ConfigMap's data; empty when it does not exist yet."""
        try:
            config_map = self.core.read_namespaced_config_map(
                name, namespace, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return dict(config_map.data or {})

    def read_shard_map(self, namespace: str, room: str) -> ShardMap | None:
        """The shard map as published in the room's ConfigMap (None: none, or unreadable)."""
        document = self.read_config_map(namespace, shard_map_name(room)).get(SHARD_MAP_KEY)
        try:
            return ShardMap.from_dict(json.loads(document)) if document else None
        except (KeyError, TypeError, ValueError):
            return None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the room's status (merge patch on the status subresource)."""
        self._fence()
        _drained(
            self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": status},
                _request_timeout=self.timeout,
                _preload_content=False,  # read as bytes and dropped: no client models to build
            )
        )

    def post_event(
        self,
        room: dict[str, Any],
        kind: str,
        reason: str,
        message: str,
        now: datetime,
    ) -> None:
        """Post an Event on the room, as `kubectl describe audioroom` shows them."""
        self._fence()
        meta = room["metadata"]
        involved = client.V1ObjectReference(
            api_version=f"{GROUP}/{VERSION}",
            kind=KIND,
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            resource_version=meta.get("resourceVersion"),
        )
        self._post(involved, kind, reason, message, now)

    def post_claims_event(
        self, namespace: str, kind: str, reason: str, message: str, now: datetime
    ) -> None:
        """Post an Event on the claims table, as `kubectl describe configmap
        townsquare-partitions` shows them (it matches the table's uid, so it is read)."""
        table = self.core.read_namespaced_config_map(
            CLAIMS, namespace, _request_timeout=self.timeout
        )
        involved = client.V1ObjectReference(
            api_version="v1", kind="ConfigMap", name=CLAIMS, namespace=namespace,
            uid=table.metadata.uid,
        )  # fmt: skip
        self._post(involved, kind, reason, message, now)

    def _post(
        self,
        involved: client.V1ObjectReference,
        kind: str,
        reason: str,
        message: str,
        now: datetime,
    ) -> None:
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{involved.name}.", namespace=involved.namespace
            ),
            involved_object=involved,
            type=kind,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=MANAGER, host=self.identity),
            reporting_component=f"{GROUP}/operator",
            reporting_instance=self.identity[:128],
        )
        _drained(
            self.core.create_namespaced_event(
                involved.namespace, body, _request_timeout=self.timeout, _preload_content=False
            )
        )


def _unfenced() -> None:
    """Writes outside any pass (tools, the labeller) need no claim."""


def _drained(response: Any) -> None:
    """Read an answer we do not need to its end, so its connection goes back to the pool."""
    response.data  # noqa: B018


def child_version(meta: Mapping[str, Any]) -> tuple[str, int]:
    """What moves when a child's content is changed: the generation where the kind has one
    (a StatefulSet's or PDB's status updates leave it alone), else the resourceVersion (a
    ConfigMap or headless Service has no status to update). Both only grow."""
    generation = meta.get("generation")
    if generation:
        return ("generation", int(generation))
    version = str(meta.get("resourceVersion") or "0")
    return ("resourceVersion", int(version) if version.isdigit() else 0)
