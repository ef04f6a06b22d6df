"""kopf wiring: read the room and its relays, call the core once, write what it decided.

One scheduler (`passes.PassScheduler`) runs every room's passes: a room is due at its next
deadline (a room months ahead costs an entry in a heap) or sooner when its spec, its relay
pods or a child changed by someone else change, or when a new reading of listeners arrives.
kopf's event handlers only wake rooms, so kopf keeps no copy of a room (a daemon per room
would). Relay pods come from one shared watch (an index), never a LIST per room. Listeners
are read by `ListenerPoller`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from pydantic import ValidationError

from townsquare import observability
from townsquare.api.errors import describe
from townsquare.api.models import (
    GROUP,
    PLURAL,
    VERSION,
    AudioRoomSpec,
    AudioRoomStatus,
    MetricsSpec,
)
from townsquare.api.names import relay_set_name
from townsquare.headroom import Placeholder
from townsquare.kube import children, placeholders
from townsquare.kube.client import (
    FINALIZER,
    Cluster,
    Peering,
    RelayPod,
    child_version,
    load_config,
    our_finalizers,
    refuses_credentials,
    relay_pod,
    timestamp,
)
from townsquare.kube.labelling import SlotLabeller
from townsquare.lifecycle import (
    WARNING,
    Event,
    Metrics,
    Observed,
    Outcome,
    accepted_spec,
    children_worth_reading,
    reconcile,
    stored_scaling_state,
)
from townsquare.metrics import (
    PRESETS,
    PrometheusSource,
    Reading,
    Source,
    aged,
    choose_prometheus,
    covering,
    room_metrics,
)
from townsquare.partitions import (
    SLOT_LABEL,
    Claim,
    ClaimLapsedError,
    ClaimsMemory,
    Lease,
    Partition,
    ShortSpell,
    decide_claims,
    labelled_slot,
    may_act,
    peering_allows,
    report_claims,
    slot_of,
)
from townsquare.passes import PassScheduler
from townsquare.policy import TenantPolicy, listener_source
from townsquare.scaling import ScalingState
from townsquare.sharding import ShardMap
from townsquare.telemetry import release_free_heap, room_logger

RETRY_SECONDS = 5.0
KOPF_WORKERS = 128
"""Objects of one kind kopf handles at once (each may hold an API connection)."""
PEERING_CHECK_SECONDS = 1.0
"""How often a replica reads whether kopf's peering and the claims table let it act."""
LET_GO_SECONDS = 20.0
"""At shutdown, the longest wait for passes in flight before the claim is let go (else it
expires a lifetime after its last renewal)."""
TRIM_SECONDS = 60.0
"""How often freed heap goes back to the system (see telemetry.release_free_heap)."""
Key = tuple[str, str]
REGISTRY = kopf.OperatorRegistry()
"""The operator's handlers, kept apart from kopf's default registry."""


def lease_clock() -> float:
    """Seconds since boot, suspend included (CLOCK_BOOTTIME): the clock leases are judged
    by. CLOCK_MONOTONIC stops while the machine is suspended, so a replica resumed after a
    long suspend would take its lease for valid while others took its slots over."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Settings:
    """Operator-wide options, from the command line."""

    prometheus_url: str | None = None
    allowed_prometheus_urls: tuple[str, ...] = ()
    """URLs a room's spec.metrics.prometheusUrl may name, besides the default."""
    metrics_interval: timedelta = timedelta(seconds=15)
    metrics_max_age: timedelta = timedelta(seconds=60)
    metrics_timeout: timedelta = timedelta(seconds=5)
    """The longest one Prometheus query may take; slower counts as no data."""
    metrics_concurrency: int = 8
    """Prometheus queries in flight at once (batched ones and rooms' own queries)."""
    partition: Partition = field(default_factory=Partition)
    stall_after: timedelta = timedelta(seconds=180)
    """A reconcile or a metrics tick stuck this long turns /healthz red."""
    policy: TenantPolicy | None = None
    """What tenants' rooms may ask for; a room outside it is refused, not run."""
    listener_queries: Mapping[str, str] = field(default_factory=dict)
    """Named listener queries (`spec.metrics.preset`) beyond the built-in ones."""
    headroom_priority_class: str = placeholders.PRIORITY_CLASS
    """The PriorityClass of node headroom placeholders (the chart ships it)."""
    headroom_image: str = placeholders.IMAGE
    relay_ticket_secret: str | None = None
    """A Secret (in each room's namespace) with the edge's ticket key, mounted into relay
    pods so that they check admit tickets; None: relays get no key from the operator."""
    peering_lifetime: timedelta = timedelta(seconds=30)
    """How long a replica that stopped renewing (killed, partitioned) still holds the lead:
    a standby takes over at most this long after the primary's last keepalive."""
    peering: str | None = None
    """kopf's peering object (None: standalone). Passes run only while it lets us act."""
    priority: int = 0
    namespaces: tuple[str, ...] = ()
    """The namespaces served (empty: the whole cluster): where the peering objects are."""
    claims_namespace: str = ""
    """Where the one claims table lives (the chart: the release namespace, which tenants
    cannot write); empty: the first namespace served, else `default`."""
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This replica in kopf's peering and in the Events it posts."""
    workers: int = 16
    """Room passes at once, each on a thread of its own: a pass mostly waits for the API
    server (0.1-0.25 s a pass at 10,000 rooms on a loaded machine), so a start-up of
    thousands of rooms goes as fast as the passes in flight allow."""


@dataclass(frozen=True)
class EmptyMap:
    """A shard map with no relays, held as four numbers instead of a slot per shard: most
    rooms are Scheduled, and thousands of them must fit in one process."""

    generation: int
    shards: int
    admission: Any
    capacity: int

    @staticmethod
    def of(shard_map: ShardMap) -> ShardMap | EmptyMap:
        if shard_map.relays or shard_map.assignment.count(None) != shard_map.shards:
            return shard_map
        return EmptyMap(
            shard_map.generation, shard_map.shards, shard_map.admission, shard_map.capacity
        )

    def expand(self) -> ShardMap:
        return ShardMap(
            self.generation, (None,) * self.shards, {}, {}, self.admission, self.capacity
        )


@dataclass(slots=True)
class RoomState:
    """What the operator keeps in memory about one room, in one place: forgetting the room
    forgets all of it at once. Thousands of rooms: only what the next pass needs."""

    metrics: MetricsSpec | None = None
    """Where the poller reads this room's listeners (None: it reads none)."""
    generation: int = 0
    """The newest generation of the spec a pass has read or will read: a watch event of an
    older one (our own status patches, kopf's finalizer) wakes nobody."""
    applied: dict[str, tuple[bytes, tuple[str, int] | None]] = field(default_factory=dict)
    """Per child: a digest of what was last applied, and the version the server stored it
    as (None while the apply is in flight). A child is re-sent only when its desired content
    changes, or when a watch shows someone else changed it."""
    reading: Metrics | None = None
    """The poller's latest reading of this room's listeners."""
    scaling: ScalingState | None = None
    shard_map: ShardMap | EmptyMap | None = None
    shard_map_at: datetime | None = None
    """When `shard_map` was published (its write returned; the pass's own time until
    then), for the migration budget and the end drain's settling."""
    wound_down_to: int | None = None
    """The relay count a refused room's wind-down last set (None: none, or the
    StatefulSet changed since), so it is sent only when it changes."""
    headroom_refusal: str = ""
    """Why the API server last refused a placeholder, so the Warning is posted once."""
    relay_revision: str | None = None
    """The relay StatefulSet's template revision, from its watch (None: not seen yet)."""
    relay_pods_labelled: bool | None = None
    """Whether its relay pod template carries the slot label: False for a StatefulSet made
    before pods carried it, kept so (None: not seen yet; see relay_stateful_set)."""
    replaced: set[str] = field(default_factory=set)
    """UIDs of relay pods deleted for a rollout: gone, even before the watch says so."""
    deleting: bool = False
    """The room is being deleted and holds our finalizer: its passes drain it, and the
    last one releases it."""
    in_flight: bool = False
    """A pass over the room is running (it may still write what it decided into this
    state, so a reread waits for it to end: `stale`)."""
    stale: bool = False
    """Read afresh once the pass in flight ends (its slot was gained anew meanwhile)."""

    def reread(self) -> None:
        """Forget what another replica may have changed meanwhile: the next pass reads
        the room, its children and its shard map afresh."""
        self.applied.clear()
        self.scaling = None
        self.shard_map = self.shard_map_at = self.relay_revision = None
        self.relay_pods_labelled = self.wound_down_to = None
        self.replaced.clear()

    def reread_when_idle(self) -> None:
        """`reread` now, or, while a pass is in flight, as soon as it ends: a pass that
        ends after the reread would otherwise store what it decided under an old claim."""
        if self.in_flight:
            self.stale = True
        else:
            self.reread()


@dataclass
class ClaimsHealth:
    """How this replica's claiming goes, for on-call: `/healthz`, Events, `/metrics`."""

    ok_at: float = field(default_factory=lease_clock)
    """When a claims round last read the table (and wrote it when due), lease clock."""
    error: str = ""
    """Why the last round failed ("" when it did not)."""
    refused: bool = False
    """Whether the last round failed because the API server refused who this replica is
    (401/403: a credential or RBAC a restart may fix), not because it was out of reach."""
    round_at: float = field(default_factory=lease_clock)
    """When a claims round last ended, failed or not, lease clock: the loop is alive."""
    spell: ShortSpell = field(default_factory=ShortSpell)
    """Since when this replica, meant to act, acts on less than its share, and whether
    the Warning for that was posted."""
    posting: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass
class Runtime:
    """Operator-wide state shared by every handler through kopf's memo."""

    cluster: Cluster
    settings: Settings
    loop: asyncio.AbstractEventLoop
    indexes: Mapping[str, Any]
    """kopf's indexes of relay pods and placeholders (live views, filled by its watches)."""
    rooms: dict[Key, RoomState] = field(default_factory=dict)
    sources: dict[str, PrometheusSource] = field(default_factory=dict)
    passes: PassScheduler[Key] = field(init=False)
    pass_threads: ThreadPoolExecutor = field(init=False)
    """The passes' threads: asyncio's default pool has only cores + 4."""
    poller_tick: float = field(default_factory=time.monotonic)
    """When the listener poller last started a tick (monotonic): for liveness."""
    lease: Lease = field(default_factory=Lease)
    """The slots whose rooms this replica may act on, and until when (lease clock): those
    its last claim written holds (see partitions.Lease). A room of another slot, or any
    room once the lease ran out, waits, parked, without a pass; a pass in flight then
    writes nothing more (`check_claim`)."""
    claims_memory: ClaimsMemory = field(default_factory=ClaimsMemory)
    """What the claims rounds know of the table (see partitions.decide_claims)."""
    written: Claim | None = None
    """The claim this replica last wrote (None: none, or let go since)."""
    clock: Callable[[], float] = lease_clock
    """The lease's clock: never the wall clock, so a clock stepped back never extends a
    claim, and counting suspend (see `lease_clock`)."""
    claims: ClaimsHealth = field(default_factory=ClaimsHealth)
    holds_nothing: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while this replica holds no lease and no entry of its own stands in the claims
    table (it let go, or never claimed): what a stopping replica waits for."""
    claims_due: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to run the next claims round now rather than at its usual time."""
    epoch: int = 0
    """Which lease a pass acts under: bumped whenever a lease follows a lapse or gains
    slots. A pass records it as it starts, and the fence refuses its writes once it
    moved, so a pass that began before a lapse never writes after the slot was claimed
    again (meanwhile another replica may have acted on the room: ABA)."""

    def __post_init__(self) -> None:
        self.passes = PassScheduler(
            self._pass,
            workers=self.settings.workers,
            retry_seconds=RETRY_SECONDS,
            may_run=lambda key: self.lease.holds(slot_of(*key), self.clock()),
        )
        self.passes.paused = self.settings.peering is not None  # as kopf starts: paused
        self.holds_nothing.set()
        self.pass_threads = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="pass")

    def room(self, key: Key) -> RoomState:
        """The room's state, created on first use (call on the event loop)."""
        state = self.rooms.get(key)
        if state is None:
            state = self.rooms[key] = RoomState()
        return state

    def prometheus_for(self, metrics: MetricsSpec) -> Source:
        settings = self.settings
        return choose_prometheus(
            metrics.prometheus_url, settings.prometheus_url, settings.allowed_prometheus_urls
        )

    @property
    def listener_queries(self) -> dict[str, str]:
        """Named listener queries rooms may pick: the built-in presets and the platform's."""
        return {**PRESETS, **self.settings.listener_queries}

    def source(self, url: str) -> PrometheusSource:
        found = self.sources.get(url)
        if found is None:
            timeout = self.settings.metrics_timeout.total_seconds()
            found = self.sources[url] = PrometheusSource(url, timeout_seconds=timeout)
        return found

    def wake(self, namespace: str | None, name: str | None) -> None:
        """Reconcile the room now; safe from any thread (an asyncio.Event may be set only on
        its own loop, and kopf runs sync handlers in a thread pool)."""
        if namespace and name:
            self.loop.call_soon_threadsafe(self._wake_on_loop, (namespace, name))

    def _wake_on_loop(self, key: Key) -> None:
        if key in self.rooms:  # a room not (or no longer) served has no state
            self.passes.wake(key)

    def forget(self, key: Key) -> None:
        self.rooms.pop(key, None)
        self.passes.forget(key)

    def stalled(self, now: float) -> str | None:
        """Why the operator should be restarted, or None while it makes progress."""
        limit = self.settings.stall_after.total_seconds()
        running = list(self.passes.running.items())
        stuck = [key for key, began in running if now - began > limit]
        if stuck:
            rooms = ", ".join(f"{ns}/{name}" for ns, name in stuck[:5])
            return f"{len(stuck)} reconcile(s) running for over {limit:.0f}s: {rooms}"
        quiet = now - self.poller_tick
        if quiet > limit + self.settings.metrics_interval.total_seconds():
            return f"the listener poller has not ticked for {quiet:.0f}s"
        idle = self.clock() - self.claims.round_at
        if idle > limit:
            return f"the claims loop has not ended a round for {idle:.0f}s"
        unread = self.clock() - self.claims.ok_at
        if not self.passes.paused and self.claims.refused and unread > limit:
            # A replica meant to act whose credentials the API server refuses is restarted
            # (a rotated token is read again). One that cannot reach the API server is not:
            # a restart reaches it no better, and loses what it keeps across an outage.
            error = self.claims.error
            return f"the claims table has not been read or written for {unread:.0f}s: {error}"
        return None

    async def _pass(self, key: Key) -> float | None:
        """One pass over a room, for the scheduler: seconds until it is due again."""
        state = self.rooms.get(key)
        if state is None:
            return None
        deleting = state.deleting  # as this pass runs: deletion may begin meanwhile
        outcome, failed = await _reconcile_once(self, state, key, deleting=deleting)
        if state.deleting and not deleting:
            return 0.0  # an ordinary pass that found the room deleted: the drain begins now
        if deleting:
            if not failed and (outcome is None or outcome.released):
                return None  # released (or gone): its DELETED event forgets it
            wake = _seconds_until(outcome.wake_at if outcome else None) or RETRY_SECONDS
            return min(wake, RETRY_SECONDS)
        if failed:
            return RETRY_SECONDS
        return _seconds_until(outcome.wake_at) if outcome else None

    def register(self, key: Key, spec: Mapping[str, Any], generation: int) -> None:
        """Serve a room kopf has shown us: its first pass now, or (when its listeners are
        read) once the poller has read them, so that a restarted operator decides with data
        instead of reporting metrics missing meanwhile."""
        state = self.rooms.get(key)
        if state is not None:
            return
        state = self.rooms[key] = RoomState(generation=generation)
        delay = 0.0
        with contextlib.suppress(ValueError):
            # Most rooms read no listeners (no Prometheus): their metrics part says so, and
            # the whole spec is read only for those that do (a tenth of kopf's work a room).
            wanted = MetricsSpec.model_validate(dict(spec).get("metrics") or {})
            if self.prometheus_for(wanted).url is not None:
                state.metrics = self._read_metrics_of(key, AudioRoomSpec.model_validate(dict(spec)))
            if state.metrics is not None:
                settings = self.settings
                delay = (
                    2 * settings.metrics_interval.total_seconds() + settings.metrics_timeout.seconds
                )
        self.passes.wake(key, delay)

    def _read_metrics_of(self, key: Key, spec: AudioRoomSpec) -> MetricsSpec | None:
        """What the poller reads for a room: nothing without a Prometheus."""
        wanted = self.metrics_read_for(key[0], spec)
        return wanted if self.prometheus_for(wanted).url else None

    def metrics_read_for(
        self, namespace: str, spec: AudioRoomSpec, accepted: AudioRoomSpec | None = None
    ) -> MetricsSpec:
        """Where a room's listeners are read (decided by `policy.listener_source`)."""
        return listener_source(spec, namespace, self.settings.policy, accepted)

    def pause(self) -> None:
        """Another replica acts: no pass starts until `resume`, and the rooms leave this
        replica's own /metrics (the acting replica shows them)."""
        self.passes.paused = True
        for namespace, name in self.rooms:
            observability.forget_room(namespace, name)

    @property
    def acting_slots(self) -> frozenset[int]:
        """The slots this replica acts on while its lease lasts."""
        return self.lease.slots

    def act_on(self, lease: Lease, kept: frozenset[int] = frozenset()) -> None:
        """Act on the rooms of the lease's slots from now on, at once for those that came
        due meanwhile. `kept`: the slots nobody else can have acted on since this replica
        last did (see `_claim`); the rooms of every other slot are read afresh."""
        gained = lease.slots - kept
        if not self.lease.valid(self.clock()) or lease.slots - self.lease.slots:
            self.epoch += 1
        self.lease = lease
        if gained:
            for key, state in self.rooms.items():
                if slot_of(*key) in gained:
                    state.reread_when_idle()
        self.passes.unpark()

    def stop_acting(self) -> None:
        """No slot any more: no pass starts, and passes in flight write nothing more."""
        self.lease = Lease()

    def check_claim(self, key: Key, epoch: int | None = None) -> None:
        """The fence, called just before each write of the room's pass: refuses it once this
        replica's lease on the room's slot ran out or moved (see partitions.Lease), or, for
        a pass begun in `epoch`, once the lease is no longer the one it began under."""
        if not self.lease.holds(slot_of(*key), self.clock()):
            raise ClaimLapsedError(f"{key[0]}/{key[1]}: this replica's claim on its slot lapsed")
        if epoch is not None and epoch != self.epoch:
            raise ClaimLapsedError(
                f"{key[0]}/{key[1]}: the slot was claimed anew since this pass began"
            )

    def resume(self) -> None:
        """This replica acts again: every room is read afresh and passed at once."""
        self.epoch += 1
        for state in self.rooms.values():
            state.reread_when_idle()
        self.passes.resume()


class NoDiffBase(kopf.DiffBaseStorage):
    """No copy of an object's last-handled state: kopf builds one for every watch event (a
    deep copy of the body: rooms, children, relay pods) to feed change handlers, and this
    operator has none: it only watches, and its passes read what they need."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials the kubernetes client uses (in-cluster or KUBECONFIG)."""
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return info


@kopf.on.startup(registry=REGISTRY)
async def configure(settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
    """kopf's timeouts and limits, one client, a poller and the passes' scheduler."""
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    # Watches end and are re-established every ten minutes, so a half-open connection (an
    # API server gone behind it) is noticed instead of waited on for ever.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    # kopf's HTTP pool is unbounded: it opens a TLS connection for each object it patches
    # at once. At start-up, 1,000 new rooms each wanting a finalizer took RSS from 150 to
    # 470 MiB in 10 s. Handling a bounded number of objects at once bounds the connections;
    # an object's idle worker leaves its place at once.
    settings.queueing.worker_limit = KOPF_WORKERS
    settings.queueing.idle_timeout = 0.5
    options: Settings = getattr(memo, "settings", None) or Settings()
    settings.peering.lifetime = int(options.peering_lifetime.total_seconds())
    cluster = Cluster(load_config(), identity=options.identity)
    if options.peering_lifetime.total_seconds() / 2 < sum(cluster.timeout):
        room_logger("-", "-").warning(
            "half the peering lifetime is shorter than the longest a write can take: a write "
            "sent just before this replica's lease ends may land after another replica took "
            "over (see partitions.Lease)",
            lifetime=options.peering_lifetime.total_seconds(),
            write_timeout=sum(cluster.timeout),
        )
    unlabelled = 0
    if options.partition.count > 1:
        served = options.namespaces or (None,)
        # By the StatefulSets' templates, not only their pods: one with no pod now (between
        # a recurring room's occurrences, minRelays 0) makes unlabelled pods at its next
        # pre-warm, which a watch filtered by the label would never show any partition.
        pods = await asyncio.to_thread(cluster.unlabelled_relay_pods, served)
        templates = await asyncio.to_thread(cluster.unlabelled_relay_templates, served)
        unlabelled = pods + templates
        if unlabelled:
            room_logger("-", "-").warning(
                "relay pods or templates without a slot label (made by an earlier version): "
                "this replica filters relay pods itself until it restarts after they are gone",
                pods=pods,
                stateful_sets=templates,
            )
    for resource, selector in watch_selectors(options.partition, unlabelled == 0).items():
        settings.watching.label_selectors[resource] = selector
    runtime = Runtime(
        cluster=cluster,
        settings=options,
        loop=asyncio.get_running_loop(),
        indexes={name: kwargs[name] for name in ("relay_pod_index", "placeholder_index")},
    )
    memo.runtime = runtime
    memo.poller = ListenerPoller(runtime)
    memo.poller.start()
    memo.tasks = [
        asyncio.create_task(runtime.passes.run()),
        asyncio.create_task(_follow_claims(runtime)),
    ]
    if options.partition.count > 1:
        memo.labeller = SlotLabeller(
            runtime.cluster, options.partition, options.namespaces or [None]
        )
        memo.labeller.start()
    if options.peering is not None:
        memo.tasks.append(asyncio.create_task(_follow_peering(runtime)))


@kopf.on.cleanup(registry=REGISTRY)
async def stop_poller(memo: Any, **_: Any) -> None:
    """Stop, and let go of the rooms once no pass is in flight, so that the replica taking
    them over (a standby, or a new partition's) starts at once, not a lifetime later. The
    claims loop lets go (it is the claim's one writer: a round of its own here could race
    a write of the loop's in flight), retrying each second if the API server refuses."""
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is not None:
        runtime.pause()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LET_GO_SECONDS):
                await runtime.passes.idle()
                runtime.claims_due.set()
                await runtime.holds_nothing.wait()
    poller: ListenerPoller | None = getattr(memo, "poller", None)
    if poller is not None:
        await poller.stop()
    labeller: SlotLabeller | None = getattr(memo, "labeller", None)
    if labeller is not None:
        labeller.stop()
    tasks: list[asyncio.Task[None]] = getattr(memo, "tasks", [])
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if runtime is not None:
        runtime.pass_threads.shutdown(wait=False, cancel_futures=True)


def _claims_namespace(settings: Settings) -> str:
    """One table for every replica, never one per namespace served: a tenant who may edit
    ConfigMaps in its own namespace could otherwise claim every slot there and stop the
    operator everywhere, and N tables cost N reads and writes a round, any one conflict
    failing the round."""
    fallback = sorted(settings.namespaces)[0] if settings.namespaces else "default"
    return settings.claims_namespace or fallback


async def _follow_claims(runtime: Runtime) -> None:
    """Claim this replica's slots in the claims table and keep them claimed; act on the
    rooms of the slots claimed (see partitions.free_slots), and on none once the lease of
    the last claim written ran out (half a lifetime, by the monotonic clock)."""
    log = room_logger("-", "-").bind(component="claims")
    renewed: float | None = None
    while True:
        runtime.claims_due.clear()
        renewed = await _claims_round(runtime, renewed, log)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PEERING_CHECK_SECONDS):
                await runtime.claims_due.wait()


async def _claims_round(runtime: Runtime, renewed: float | None, log: Any) -> float | None:
    """One round of `_follow_claims`: claim, stop acting once the lease ran out, report."""
    try:
        renewed = await _claim(runtime, renewed, log)
        runtime.claims.ok_at, runtime.claims.error = runtime.clock(), ""
        runtime.claims.refused = False
    except Exception as error:  # the API server is away: keep the claim while it holds
        runtime.claims.error = f"{type(error).__name__}: {str(error)[:200]}"
        runtime.claims.refused = refuses_credentials(error)
        log.warning("claiming slots failed", error=str(error)[:200])
    finally:
        runtime.claims.round_at = runtime.clock()
    if runtime.acting_slots and not runtime.lease.valid(runtime.clock()):
        log.warning("claim not renewed for half its lifetime: acting on no room")
        runtime.stop_acting()
    _report_claims(runtime, log)
    return renewed


def _report_claims(runtime: Runtime, log: Any) -> None:
    """Say on `/metrics` how many slots this replica acts on, and post on the claims table
    when it has acted on less than its share for long, or again on all of it (see
    partitions.report_claims)."""
    settings, health = runtime.settings, runtime.claims
    report = report_claims(
        settings.identity, settings.partition, runtime.lease, runtime.claims_memory.seen,
        health.spell, paused=runtime.passes.paused, error=health.error,
        lifetime=settings.peering_lifetime, now=runtime.clock(),
    )  # fmt: skip
    health.spell = report.spell
    share = len(settings.partition.slots)
    observability.record_claims(settings.partition.name, share, len(report.acting))
    if report.event is not None:
        _post_claims_event(runtime, *report.event, log)


def _post_claims_event(runtime: Runtime, kind: str, reason: str, message: str, log: Any) -> None:
    """Post on the claims table off the claims loop (an API server slow to answer must not
    delay the renewals); a failure is logged, not retried."""
    (log.warning if kind == WARNING else log.info)("claims", reason=reason, message=message)
    namespace = _claims_namespace(runtime.settings)

    async def post() -> None:
        try:
            now = datetime.now(UTC)
            post = runtime.cluster.post_claims_event
            await asyncio.to_thread(post, namespace, kind, reason, message, now)
        except Exception as error:
            log.warning("posting an Event on the claims table failed", error=str(error)[:200])

    task = asyncio.create_task(post())
    runtime.claims.posting.add(task)
    task.add_done_callback(runtime.claims.posting.discard)


async def _claim(runtime: Runtime, renewed: float | None, log: Any) -> float | None:
    """One round: read the table (also while paused, so that a standby has seen the
    claims it may take over a lifetime before it must), decide (partitions.decide_claims),
    write. Returns when (lease clock) the claim standing was written (None: none is)."""
    settings = runtime.settings
    namespace = _claims_namespace(settings)
    table = await asyncio.to_thread(runtime.cluster.read_claims, namespace)
    now = runtime.clock()  # after the read: no earlier than any write it shows
    decision = decide_claims(
        settings.identity, settings.partition.slots, settings.peering_lifetime,
        table, runtime.claims_memory, runtime.written, runtime.lease, renewed,
        paused=runtime.passes.paused, in_flight=bool(runtime.passes.running),
        now=now, stamp=datetime.now(UTC),
    )  # fmt: skip
    runtime.claims_memory = decision.memory
    if decision.let_go:  # no pass may act once another replica can read the release
        runtime.stop_acting()
        runtime.written = None
    if decision.write is not None:
        write = decision.write
        if write.claim is not None:  # from now on an entry of ours may stand
            runtime.holds_nothing.clear()
        uid = await asyncio.to_thread(
            runtime.cluster.write_claim, namespace, table.version, settings.identity,
            write.claim, write.expired,
        )  # fmt: skip
        runtime.claims_memory = replace(decision.memory, table=uid)
        runtime.written = write.claim
    if decision.let_go:
        runtime.holds_nothing.set()
        if renewed is not None:
            log.info("paused, no pass in flight: let go of the slots")
    if decision.lease is not None:
        if decision.lease.slots != runtime.acting_slots:
            slots = decision.lease.slots
            waiting = len(settings.partition.slots) - len(slots)
            log.info("acting on the claimed slots", slots=len(slots), waiting_for_others=waiting)
        runtime.act_on(decision.lease, decision.kept)
    return decision.renewed


async def _follow_peering(runtime: Runtime) -> None:
    """Pause the passes while kopf's peering lets another replica act, as kopf pauses its
    own handlers (a daemon per room used to be stopped by kopf; one scheduler is not).

    A hand-over never overlaps: a replica that must pause finishes its passes in flight,
    then lets go of the peering object's holder annotation; the one taking over starts only
    once nobody alive holds it (see partitions.may_act)."""
    settings = runtime.settings
    assert settings.peering is not None
    log = room_logger("-", "-").bind(component="peering")
    waiting_for: set[str] = set()
    while True:
        try:
            peerings = await asyncio.to_thread(
                runtime.cluster.read_peers, settings.peering, settings.namespaces
            )
            await _follow(runtime, peerings or [], peerings is not None, waiting_for, log)
        except Exception as error:  # keep acting (or waiting) as before, as kopf does
            log.warning("following the peering object failed", error=str(error)[:200])
        await asyncio.sleep(PEERING_CHECK_SECONDS)


async def _follow(
    runtime: Runtime, peerings: list[Peering], found: bool, waiting_for: set[str], log: Any
) -> None:
    settings, now = runtime.settings, datetime.now(UTC)
    me, priority, cluster = settings.identity, settings.priority, runtime.cluster
    allowed = found and all(peering_allows(p.peers, me, priority, now) for p in peerings)
    if not allowed and not runtime.passes.paused:
        log.info("pausing: another replica acts")
        runtime.pause()
        await runtime.passes.idle()
        # Read again: kopf's keepalives have moved the object since.
        assert settings.peering is not None
        fresh = await asyncio.to_thread(cluster.read_peers, settings.peering, settings.namespaces)
        peerings = fresh or []
    if not runtime.passes.paused:
        return
    if not allowed:
        for peering in peerings:
            if peering.holder == me:
                await asyncio.to_thread(cluster.hold_peering, peering, None)
                log.info("no pass in flight: let go of the rooms")
    elif all(may_act(p.peers, p.holder, me, priority, now) for p in peerings):
        for peering in peerings:
            if peering.holder != me:
                await asyncio.to_thread(cluster.hold_peering, peering, me)
        log.info("acting: no live replica of a higher or equal priority, none holding")
        waiting_for.clear()
        runtime.resume()
    else:
        holders = {p.holder for p in peerings if p.holder and p.holder != me}
        if holders - waiting_for:
            log.info("waiting for the replica holding the rooms to finish its passes")
        waiting_for.clear()
        waiting_for.update(holders)


@kopf.on.probe(id="progress", registry=REGISTRY)
def progress(memo: Any, **_: Any) -> str:
    """Liveness: /healthz fails while a reconcile or the poller is stuck, so the kubelet
    restarts the operator instead of leaving rooms unreconciled behind a green probe."""
    runtime: Runtime | None = getattr(memo, "runtime", None)
    problem = runtime.stalled(time.monotonic()) if runtime else None
    if problem:
        raise kopf.PermanentError(problem)
    return "reconciling"


def _runtime(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime


CHILD_KINDS = [
    ("apps/v1", "statefulsets", "StatefulSet"),
    ("v1", "services", "Service"),
    ("v1", "configmaps", "ConfigMap"),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget"),
]


def watch_selectors(
    partition: Partition, pods_labelled: bool = True
) -> dict[tuple[str, str] | tuple[str, str, str], str]:
    """What each watch asks the API server for: this partition's rooms (by their slot label),
    children and pods, so that kopf receives and decodes no event it would drop.

    `pods_labelled` False: some relay pods were made before pods carried the slot label
    (their StatefulSets keep their template, see relay_stateful_set); a selector on the
    label would hide them, so the pods watch asks for our components only and each
    partition drops other partitions' pods itself (`_serves_owner`), as before."""
    rooms = partition.label_selector()
    slots = f",{rooms}" if rooms else ""
    owned = f"{children.MANAGED_BY_LABEL}={children.MANAGER}{slots}"
    components = f"relay,{placeholders.COMPONENT}"
    selectors: dict[tuple[str, str] | tuple[str, str, str], str] = {
        (group_version, plural): owned for group_version, plural, _ in CHILD_KINDS
    }
    pod_slots = slots if pods_labelled else ""
    selectors["v1", "pods"] = f"{children.COMPONENT_LABEL} in ({components}){pod_slots}"
    if rooms:
        selectors[GROUP, VERSION, PLURAL] = rooms
    return selectors


def _serves(name: str, namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any) -> bool:
    """Whether this operator's partition serves the room, by its slot label (the API
    server already filters on it; this holds for a room whose label changed since)."""
    settings: Settings | None = getattr(memo, "settings", None)  # called on every event
    return namespace is not None and (
        settings is None or settings.partition.serves_labelled(labels)
    )


def _serves_owner(namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any) -> bool:
    """Whether this partition serves the room owning a child or pod, by the room's hash
    (which its slot label always equals): the API server filters on the label already, but
    relay pods of StatefulSets made before pods carried it have none (see watch_selectors)."""
    room = labels.get(children.ROOM_LABEL)
    settings: Settings | None = getattr(memo, "settings", None)
    return (
        bool(room)
        and namespace is not None
        and (settings is None or settings.partition.serves(namespace, str(room)))
    )


class ListenerPoller:
    """Reads listeners for every watched room, every tick.

    One read per batched query (all rooms of one Prometheus and preset) and one per room
    with its own query, each a task of its own, at most `metrics_concurrency` at once on
    threads of their own. A read still running at the next tick is not started again, so a
    slow Prometheus or tenant query delays only the rooms it serves; its rooms' last
    reading ages out and they hold their size.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        concurrency = runtime.settings.metrics_concurrency
        self._threads = ThreadPoolExecutor(concurrency, thread_name_prefix="prometheus")
        self._bound = asyncio.Semaphore(concurrency)
        self._running: set[Hashable] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._loop_task, *self._tasks]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        trimmed = time.monotonic()
        while True:
            self.runtime.poller_tick = time.monotonic()
            self.tick()
            if self.runtime.poller_tick - trimmed >= TRIM_SECONDS:
                trimmed = self.runtime.poller_tick
                release_free_heap()
            await asyncio.sleep(self.runtime.settings.metrics_interval.total_seconds())

    def tick(self) -> None:
        """Start every read that is not still running from an earlier tick."""
        runtime = self.runtime
        batched: dict[tuple[str, str], list[tuple[Key, RoomState]]] = defaultdict(list)
        for key, state in list(runtime.rooms.items()):
            metrics = state.metrics
            url = runtime.prometheus_for(metrics).url if metrics else None
            if metrics is None or url is None:
                continue
            if metrics.listeners_query:
                source = runtime.source(url)
                self._start(("room", key), [(key, state)], source.read_room, metrics, *key)
            elif metrics.preset in runtime.listener_queries:
                batched[(url, metrics.preset)].append((key, state))
        queries = runtime.listener_queries
        for (url, preset), rooms in batched.items():
            read = runtime.source(url).read
            self._start(("batch", url, preset), rooms, read, preset, queries)

    def _start(
        self,
        job: Hashable,
        rooms: list[tuple[Key, RoomState]],
        read: Callable[..., Reading],
        *args: Any,
    ) -> None:
        if job in self._running:
            return
        self._running.add(job)
        task = asyncio.create_task(self._read(job, rooms, read, *args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(
        self,
        job: Hashable,
        rooms: list[tuple[Key, RoomState]],
        read: Callable[..., Reading],
        *args: Any,
    ) -> None:
        try:
            async with self._bound:
                loop = asyncio.get_running_loop()
                reading = await loop.run_in_executor(self._threads, _timed_read, read, *args)
            now = datetime.now(UTC)
            max_age = self.runtime.settings.metrics_max_age
            for key, state in rooms:
                fresh = room_metrics(reading, key, now, max_age)
                changed = _figures(fresh) != _figures(state.reading)
                state.reading = fresh
                if changed and self.runtime.rooms.get(key) is state:
                    self.runtime.passes.wake(key)
        except Exception:
            room_logger("-", "-").bind(component="metrics").exception("reading listeners failed")
        finally:
            self._running.discard(job)


def _figures(reading: Metrics | None) -> tuple[Any, ...] | None:
    """What a room decides on; a new sample time alone wakes nobody."""
    if reading is None:
        return None
    return (reading.listeners, reading.waiting, dict(reading.by_relay), reading.problem)


def _timed_read(read: Callable[..., Reading], *args: Any) -> Reading:
    began = time.perf_counter()
    reading = read(*args)
    failure = "Unreachable" if reading.error else None
    observability.record_prometheus_query(time.perf_counter() - began, failure)
    return reading


@kopf.index(
    "v1", "pods", labels={children.COMPONENT_LABEL: "relay"}, when=_serves_owner, registry=REGISTRY
)
def relay_pod_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, RelayPod] | None:
    """Every served room's relay pods, from one shared watch."""
    room = str(labels.get(children.ROOM_LABEL, ""))
    pod = relay_pod(body, room) if namespace and room else None
    return {(namespace, room): pod} if pod and namespace else None


@kopf.on.event(
    "v1", "pods", labels={children.COMPONENT_LABEL: "relay"}, when=_serves_owner, registry=REGISTRY
)
async def relay_pod_changed(
    namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any
) -> None:
    """A relay started, became Ready or went: its room looks again."""
    _runtime(memo).wake(namespace, labels.get(children.ROOM_LABEL))


@kopf.index(
    "v1",
    "pods",
    labels={children.COMPONENT_LABEL: placeholders.COMPONENT},
    when=_serves_owner,
    registry=REGISTRY,
)
def placeholder_index(
    namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Key, Placeholder] | None:
    """Every served room's node headroom placeholders, from one shared watch."""
    room = str(labels.get(children.ROOM_LABEL, ""))
    pod = placeholders.placeholder(body) if namespace and room else None
    return {(namespace, room): pod} if pod and namespace else None


@kopf.on.event(
    "v1",
    "pods",
    labels={children.COMPONENT_LABEL: placeholders.COMPONENT},
    when=_serves_owner,
    registry=REGISTRY,
)
async def placeholder_changed(
    namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any
) -> None:
    """A placeholder found its node or was preempted by a relay: its room looks again."""
    _runtime(memo).wake(namespace, labels.get(children.ROOM_LABEL))


async def _reconcile_once(
    runtime: Runtime, state: RoomState, key: Key, deleting: bool = False
) -> tuple[Outcome | None, bool]:
    """One pass off the event loop: (its outcome, whether it failed and must be retried)."""
    namespace, name = key
    pod_index: kopf.Index[Key, RelayPod] = runtime.indexes["relay_pod_index"]
    held_index: kopf.Index[Key, Placeholder] = runtime.indexes["placeholder_index"]
    listed = pod_index.get(key, ())
    state.replaced &= {pod.uid for pod in listed}  # forget those the watch saw go
    pods = sorted((p for p in listed if p.uid not in state.replaced), key=lambda p: p.ordinal)
    holding = tuple(sorted(held_index.get(key, ()), key=lambda pod: pod.name))
    epoch, state.in_flight = runtime.epoch, True
    try:
        with observability.time_reconcile():
            outcome = await asyncio.get_running_loop().run_in_executor(
                runtime.pass_threads,
                reconcile_room, runtime, state, namespace, name, pods, holding, deleting, epoch,
            )  # fmt: skip
        return outcome, False
    except ClaimLapsedError as lapsed:
        # Its slot is no longer this replica's: the room waits, parked, until it is again.
        # What this pass decided but did not write is forgotten: read afresh next time.
        state.reread()
        room_logger(namespace, name).warning("pass stopped before a write", reason=str(lapsed))
        return None, True
    except Exception:
        room_logger(namespace, name).exception("reconcile failed; retrying")
        return None, True
    finally:
        state.in_flight = False
        if state.stale:
            state.stale = False
            state.reread()


def _seconds_until(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.05


@kopf.on.event(GROUP, VERSION, PLURAL, when=_serves, registry=REGISTRY)
async def room_changed(
    name: str,
    namespace: str | None,
    type: str | None,
    spec: kopf.Spec,
    meta: kopf.Meta,
    labels: kopf.Labels,
    memo: Any,
    **_: Any,
) -> None:
    """A room kopf shows us is served from now on; a new generation of its spec is
    reconciled at once, not at the next deadline; a room deleted while our finalizer holds
    it drains first (its relays go as they empty, or at drainTimeout), then its last pass
    releases it; a room gone is forgotten.

    No kopf deletion handler: kopf would add its finalizer and a last-handled annotation to
    every room (two writes, and most of kopf's work per event), where only a room with
    relays needs holding."""
    assert namespace is not None, "AudioRoom is namespaced"
    runtime = _runtime(memo)
    key = (namespace, name)
    if type != "DELETED" and runtime.settings.partition.count > 1:
        slot = labelled_slot(labels)
        if slot != slot_of(namespace, name):  # edited by hand: back to its hash's partition
            labeller: SlotLabeller = memo.labeller
            labeller.submit(namespace, name)
            return
    if type == "DELETED":
        runtime.forget(key)
        observability.forget_room(namespace, name)
        return
    state = runtime.rooms.get(key)
    if state is None:
        runtime.register(key, spec, int(meta.get("generation") or 0))
        state = runtime.rooms[key]
    elif int(meta.get("generation") or 0) > state.generation:
        state.generation = int(meta.get("generation") or 0)
        runtime.passes.wake(key)
    if meta.get("deletionTimestamp") and our_finalizers(meta) and not state.deleting:
        state.deleting = True
        runtime.passes.wake(key)


def _has_relay_pods(runtime: Runtime, key: Key) -> bool:
    """Whether the shared watch shows relay pods of the room."""
    return bool(runtime.indexes["relay_pod_index"].get(key, ()))


def _on_child(kind: str) -> Any:
    async def child_changed(
        name: str,
        namespace: str | None,
        labels: kopf.Labels,
        meta: kopf.Meta,
        spec: kopf.Spec,
        status: kopf.Status,
        type: str | None,
        memo: Any,
        **_: Any,
    ) -> None:
        """A child deleted or changed by someone else: re-apply it. Our own writes and the
        controllers' status updates wake nobody (relay readiness comes from the pods)."""
        room = labels.get(children.ROOM_LABEL)
        runtime = _runtime(memo)
        state = runtime.rooms.get((namespace, room)) if room and namespace else None
        if state is None:
            return
        if kind == "StatefulSet":
            template = (spec.get("template") or {}).get("metadata") or {}
            state.relay_pods_labelled = SLOT_LABEL in (template.get("labels") or {})
            revision = status.get("updateRevision") if status else None
            if revision and revision != state.relay_revision:
                first = not state.relay_revision
                state.relay_revision = revision  # a new template: its rollout begins
                if not first or _has_relay_pods(runtime, (str(namespace), str(room))):
                    # The first revision of a room without relays replaces nobody: it
                    # waits for the room's next pass (a status patch less per new room).
                    runtime.wake(namespace, room)
        if kind == "StatefulSet" and state.wound_down_to not in (None, spec.get("replicas")):
            state.wound_down_to = None  # resized by someone else: size it again
            runtime.wake(namespace, room)
        child = f"{kind}/{name}"
        applied = state.applied.get(child)
        if applied is None or applied[1] is None:
            return  # never applied by this process, or our own apply still in flight
        seen = child_version(meta)
        if type == "DELETED" or (seen[0] == applied[1][0] and seen[1] > applied[1][1]):
            state.applied.pop(child, None)
            runtime.wake(namespace, room)

    return child_changed


for _group_version, _plural, _kind in CHILD_KINDS:
    kopf.on.event(
        _group_version,
        _plural,
        labels={children.MANAGED_BY_LABEL: children.MANAGER},
        when=_serves_owner,
        registry=REGISTRY,
    )(_on_child(_kind))


def reconcile_room(
    runtime: Runtime,
    state: RoomState,
    namespace: str,
    name: str,
    pods: list[RelayPod],
    holding: tuple[Placeholder, ...] = (),
    deleting: bool = False,
    epoch: int | None = None,
) -> Outcome | None:
    """One pass for one room: read, decide, write. `deleting`: the pass of a room being
    deleted, which drains it; other passes leave such a room alone (None). Every write
    checks first that this replica still holds the room's slot, under the lease the pass
    began in (`epoch`, see `Runtime.check_claim`)."""
    began = runtime.epoch if epoch is None else epoch
    cluster = runtime.cluster.fenced(lambda: runtime.check_claim((namespace, name), began))
    room = cluster.room_if_exists(namespace, name)
    if room is None:  # gone while this replica was paused, or just now
        runtime.loop.call_soon_threadsafe(runtime.forget, (namespace, name))
        return None
    deleted_at = room["metadata"].get("deletionTimestamp")
    if deleted_at:
        # Its placeholders go at once (they would hold nodes until the garbage collector
        # came by); its relays drain first, in the deletion handler's passes.
        for pod in holding:
            cluster.delete_pod(namespace, pod.name)
    if deleted_at and not deleting:
        # Deletion bumps a custom resource's generation: its event starts the draining passes.
        return None
    state.generation = max(state.generation, room["metadata"]["generation"])
    spec, problems = _read_spec(room["spec"])
    previous = AudioRoomStatus.model_validate(room.get("status") or {})
    now = datetime.now(UTC)
    metrics = None
    wanted = runtime.metrics_read_for(namespace, spec, accepted_spec(previous))
    source = runtime.prometheus_for(wanted)
    state.metrics = wanted if source.url else None
    if source.refusal:
        metrics = Metrics(listeners=None, problem=source.refusal)
    elif source.url:
        reading = state.reading or Metrics(listeners=None, problem="no reading yet")
        max_age = runtime.settings.metrics_max_age
        ready_since = {pod.ordinal: pod.ready_since for pod in pods if pod.ready_since}
        metrics = covering(aged(reading, now, max_age), ready_since, now, max_age)
    ready = frozenset(pod.ordinal for pod in pods if pod.ready)
    nodes = placeholders.room_nodes(name, pods, holding)
    held = state.shard_map
    shard_map = held.expand() if isinstance(held, EmptyMap) else held
    known = children_worth_reading(previous)
    if held is None and known:
        shard_map = cluster.read_shard_map(namespace, name)
    if state.relay_revision is None and known:
        state.relay_revision, state.relay_pods_labelled = cluster.relay_template(namespace, name)
    revision = state.relay_revision or ""
    running = previous.relays.desired if previous.relays else 0
    seen = Observed(
        now=now,
        generation=room["metadata"]["generation"],
        ready_relays=len(ready),
        ready_ordinals=ready,
        metrics=metrics,
        startups=tuple(
            (pod.created, seconds) for pod in pods if (seconds := pod.startup_seconds) is not None
        ),
        relays=nodes.relays,
        placeholders=holding,
        node_waits=nodes.waits,
        pending_relays=nodes.pending_relays,
        namespace=namespace,
        deleting_since=timestamp(deleted_at) if deleted_at else None,
        existing_relays=len(pods),
        outdated_ordinals=frozenset(
            pod.ordinal for pod in pods if revision and pod.revision not in ("", revision)
        ),
        revision=revision,
        # Listed only while relays are missing: a healthy room costs no extra read.
        pod_failures=cluster.pod_creation_failures(namespace, name) if len(pods) < running else (),
    )
    scaling = state.scaling or stored_scaling_state(previous)
    outcome = reconcile(
        name,
        spec,
        previous,
        seen,
        scaling,
        shard_map,
        state.shard_map_at,
        policy=runtime.settings.policy,
        spec_problems=problems,
    )
    if outcome.refused:
        if outcome.children:  # a refused room that ran winds down
            _remember(state, outcome, shard_map, held, now)
        _announce(runtime, cluster, room, previous, outcome, now)
        if outcome.released:  # deleted and drained: its children may go
            cluster.release_room(room)
        elif outcome.children:
            _wind_down_children(cluster, state, room, outcome)
        for placeholder in outcome.headroom.delete if outcome.headroom else ():
            cluster.delete_pod(namespace, placeholder)  # never one made for a refused spec
        return outcome
    _remember(state, outcome, shard_map, held, now)
    held_by_us = FINALIZER in room["metadata"].get("finalizers", ())
    if outcome.children and not outcome.released and not deleted_at and not held_by_us:
        # Before any relay exists, so a deletion drains it; and before the status write,
        # which moves the room's version that this write is conditional on.
        cluster.hold_room(room)
    # Status first: what a person reads never lags behind the children it describes. Then
    # the Events it implies (see `_announce`).
    _announce(runtime, cluster, room, previous, outcome, now)
    if outcome.released:
        cluster.release_room(room)
    else:
        if outcome.children:
            no_relays = not pods and running == 0
            _apply_children(cluster, state, room, spec, outcome, runtime.settings, no_relays)
        _apply_headroom(cluster, runtime.settings, state, room, spec, outcome, now)
    by_ordinal = {pod.ordinal: pod for pod in pods}
    for ordinal in outcome.replace_relays:  # drained: back with the new template
        cluster.replace_relay(namespace, name, by_ordinal[ordinal])
        state.replaced.add(by_ordinal[ordinal].uid)
    _observe(namespace, name, spec, outcome)
    return outcome


def _remember(
    state: RoomState,
    outcome: Outcome,
    shard_map: ShardMap | None,
    held: ShardMap | EmptyMap | None,
    now: datetime,
) -> None:
    """Keep the pass's scaling state and map for the next pass, and when the map changed
    (the migration budget runs from its publication)."""
    state.scaling = outcome.scaling_state
    if shard_map is None or outcome.shard_map.generation != shard_map.generation:
        state.shard_map, state.shard_map_at = EmptyMap.of(outcome.shard_map), now
    elif held is None:
        state.shard_map = EmptyMap.of(shard_map)


def _read_spec(stored: dict[str, Any]) -> tuple[AudioRoomSpec, list[str]]:
    """The room's spec, and what in it the API server let through but the operator cannot
    use. Only the schedule can be such (a time zone the API server cannot check, or a CRD
    older than the cron rule): without it the room is refused, yet a deleted one still
    drains, so it never stays Terminating."""
    try:
        return AudioRoomSpec.model_validate(stored), []
    except ValidationError as error:
        if "schedule" not in stored:
            raise
        problem = f"spec.{describe(error)}"
    return AudioRoomSpec.model_validate({k: v for k, v in stored.items() if k != "schedule"}), [
        problem
    ]


def _observe(namespace: str, name: str, spec: AudioRoomSpec, outcome: Outcome) -> None:
    """The operator's own /metrics: the room as recorded, and the decision with its rule."""
    admission = outcome.shard_map.admission
    observability.observe_room(namespace, name, outcome.status, spec.start_time, admission)
    decision = outcome.decision
    if decision is not None:
        reason = observability.decision_reason(
            metrics_available=decision.metrics_available,
            capacity_exceeded=decision.capacity_exceeded,
            plan_floor_binding=decision.floor_bound,
            drain_timed_out=bool(decision.drain_timed_out),
            direction=decision.direction,
        )
        observability.record_decision(decision.direction, reason)


def _post_events(cluster: Cluster, room: dict[str, Any], outcome: Outcome, now: datetime) -> None:
    meta = room["metadata"]
    log = room_logger(meta["namespace"], meta["name"])
    for event in outcome.events:
        try:
            cluster.post_event(room, event.type, event.reason, event.message, now)
        except ClaimLapsedError:
            raise
        except Exception:  # one Event refused must not cost the others
            log.exception("posting an Event failed", reason=event.reason)
            continue
        observability.record_event(event.type, event.reason)
        log.info("event", type=event.type, reason=event.reason, message=event.message)


def _apply_children(
    cluster: Cluster,
    state: RoomState,
    room: dict[str, Any],
    spec: AudioRoomSpec,
    outcome: Outcome,
    settings: Settings,
    no_relays: bool = False,
) -> None:
    """Send each child whose desired content changed, the StatefulSet first; one child
    refused never keeps the others (the relay count above all) from being applied.

    `no_relays`: the room has no relay pod and asked for none: a relay template made before
    pods carried the slot label gains it now, as the new template replaces no relay."""
    labelled = state.relay_pods_labelled is not False or no_relays
    state.wound_down_to = None  # the StatefulSet is sized here with the rest
    meta = room["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    shard_map = json.dumps(outcome.shard_map.to_dict(), separators=(",", ":"))
    wanted = [
        children.relay_stateful_set(
            name,
            namespace,
            uid,
            spec,
            outcome.desired_relays,
            ticket_secret=settings.relay_ticket_secret,
            slot_label=labelled,
        ),
        children.relay_service(name, namespace, uid, spec),
        children.shard_map_config_map(name, namespace, uid, shard_map),
        children.relay_disruption_budget(name, namespace, uid),
    ]
    failures: list[str] = []
    for manifest in wanted:
        try:
            sent = _apply_changed(cluster, state, manifest)
            if sent and manifest["kind"] == "StatefulSet" and labelled:
                state.relay_pods_labelled = True
        except ClaimLapsedError:
            raise
        except Exception as error:
            child = f"{manifest['kind']}/{manifest['metadata']['name']}"
            failures.append(f"{child}: {type(error).__name__}: {str(error)[:200]}")
    if failures:
        raise ChildApplyError("; ".join(failures))


def _apply_changed(cluster: Cluster, state: RoomState, manifest: dict[str, Any]) -> bool:
    """Send a child unless what was last sent is what is wanted; whether it was sent. A
    shard map sent is published from when its write returns (`RoomState.shard_map_at`)."""
    child = f"{manifest['kind']}/{manifest['metadata']['name']}"
    content = json.dumps(manifest, sort_keys=True).encode()
    digest = hashlib.blake2b(content, digest_size=16).digest()
    last = state.applied.get(child)
    if last is not None and last[0] == digest:
        return False
    state.applied[child] = (digest, None)
    try:
        state.applied[child] = (digest, cluster.apply(manifest))
    except BaseException:
        state.applied.pop(child, None)
        raise
    if manifest["kind"] == "ConfigMap":
        state.shard_map_at = datetime.now(UTC)
    return True


def _wind_down_children(
    cluster: Cluster, state: RoomState, room: dict[str, Any], outcome: Outcome
) -> None:
    """A refused room that ran: its shard map and its relay count, each when it changed,
    nothing of its spec (the relays keep the last accepted template)."""
    meta = room["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    shard_map = json.dumps(outcome.shard_map.to_dict(), separators=(",", ":"))
    _apply_changed(cluster, state, children.shard_map_config_map(name, namespace, uid, shard_map))
    # Sized apart from its template: the next accepted spec applies the StatefulSet again.
    state.applied.pop(f"StatefulSet/{relay_set_name(name)}", None)
    if state.wound_down_to != outcome.desired_relays:
        state.wound_down_to = outcome.desired_relays  # before the write: see its watch event
        try:
            cluster.scale_relays(namespace, name, outcome.desired_relays)
        except BaseException:
            state.wound_down_to = None
            raise


class ChildApplyError(Exception):
    """Some children were refused; the others were applied, and the room retries."""


def _apply_headroom(
    cluster: Cluster,
    settings: Settings,
    state: RoomState,
    room: dict[str, Any],
    spec: AudioRoomSpec,
    outcome: Outcome,
    now: datetime,
) -> None:
    """Placeholders: the excess deleted, the missing created. A refused placeholder (no such
    PriorityClass, a quota) is said once as a Warning; the room runs on without it."""
    if outcome.headroom is None:
        return
    meta = room["metadata"]
    for name in outcome.headroom.delete:
        cluster.delete_pod(meta["namespace"], name)
    for name in outcome.headroom.create:
        pod = placeholders.placeholder_pod(
            meta["name"], meta["namespace"], meta["uid"], spec, name,
            priority_class=settings.headroom_priority_class, image=settings.headroom_image,
        )  # fmt: skip
        reason = cluster.create_pod(pod)
        if reason is not None:
            if reason != state.headroom_refusal:
                message = f"placeholder pods refused, so no nodes are asked for ahead: {reason}"
                event = Event(WARNING, "NodeHeadroomRefused", message)
                _post_events(cluster, room, replace(outcome, events=(event,)), now)
                state.headroom_refusal = reason
            return
    state.headroom_refusal = ""


def _announce(
    runtime: Runtime,
    cluster: Cluster,
    room: dict[str, Any],
    previous: AudioRoomStatus,
    outcome: Outcome,
    now: datetime,
) -> None:
    """Write the status, then post the Events it implies, before anything else can fail.

    A change the status records is never derived again, by this replica or another, so its
    Events go out once the status write landed even if the claim lapsed meanwhile (the
    fence would otherwise drop them and nobody would ever announce the change). They only
    tell of what this replica already wrote: no other actor announces it too."""
    meta = room["metadata"]
    written = _write_status(cluster, meta["namespace"], meta["name"], previous, outcome)
    _post_events(runtime.cluster if written else cluster, room, outcome, now)


def _write_status(
    cluster: Cluster, namespace: str, name: str, previous: AudioRoomStatus, outcome: Outcome
) -> bool:
    """Whether the status changed, and so was written."""
    if outcome.status == previous:
        return False
    cluster.patch_status(
        namespace, name, outcome.status.model_dump(by_alias=True, mode="json", exclude_none=True)
    )
    return True
