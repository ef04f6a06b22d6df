"""The `townsquare` command: plan, simulate, run the operator, and the relay and origin.

Every user mistake ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn, cast

from pydantic import TypeAdapter, ValidationError

from townsquare.api.crd import render_crd
from townsquare.api.manifest import ManifestError, parse_room
from townsquare.api.models import QUERY_NAME_PATTERN, AudioRoom, AudioRoomStatus
from townsquare.api.types import Timestamp, format_duration, parse_duration
from townsquare.lifecycle import occurrence_start
from townsquare.partitions import Partition
from townsquare.planning import Plan, plan_room
from townsquare.policy import BUILT_IN_QUERIES, TenantPolicy

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def read_room(path: str) -> AudioRoom:
    """Load and validate a manifest file, naming the file in any error."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text file") from None
    try:
        return parse_room(text)
    except ManifestError as exc:
        raise UsageError(f"{path}: {exc}") from None


def parse_time(text: str) -> datetime:
    """An RFC 3339 time given on the command line."""
    try:
        return TypeAdapter(Timestamp).validate_python(text)
    except ValidationError as exc:
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise argparse.ArgumentTypeError(reason) from None


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def plan_as_json(room: AudioRoom, plan: Plan) -> dict[str, Any]:
    """The plan as `townsquare plan -o json` prints it."""
    spec = room.spec
    return {
        "room": room.metadata.name,
        "expectedAudience": spec.expected_audience,
        "relays": plan.relays,
        "capacity": plan.capacity,
        "hardCapacity": plan.hard_capacity,
        "prewarmAt": _iso(plan.prewarm_at),
        "readyBy": _iso(plan.ready_by),
        "startTime": _iso(spec.start_time),
        "endTime": _iso(spec.start_time + spec.duration),
        "prewarmLeadSeconds": int(plan.lead.total_seconds()),
        "rolloutSeconds": int(plan.rollout.total_seconds()),
        "shards": spec.sharding.shards,
        "shardsPerRelay": round(plan.shards_per_relay, 2),
        "fanoutTiers": plan.fanout_tiers,
        "warnings": list(plan.warnings),
    }


def plan_as_table(room: AudioRoom, plan: Plan) -> str:
    """The plan as a producer reads it before the day."""
    spec = room.spec
    where = f"{room.metadata.namespace}/" if room.metadata.namespace else ""
    rows = [
        ("expected audience", f"{spec.expected_audience:,} listeners"),
        (
            "relays",
            f"{plan.relays:,} ({spec.relay.listeners_per_relay:,} listeners each, "
            f"{spec.scaling.target_utilization:.0%} target utilization)",
        ),
        (
            "capacity",
            f"{plan.capacity:,} listeners at target, {plan.hard_capacity:,} when full",
        ),
        ("pre-warm at", f"{_iso(plan.prewarm_at)} ({format_duration(plan.lead)} before start)"),
        ("ready by", f"{_iso(plan.ready_by)} (rollout about {format_duration(plan.rollout)})"),
        ("start", f"{_iso(spec.start_time)}, for {format_duration(spec.duration)}"),
        (
            "shards",
            f"{spec.sharding.shards:,} ({plan.shards_per_relay:.1f} per relay), "
            f"fan-out {spec.sharding.fanout}: {plan.fanout_tiers} tier(s)",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"AudioRoom {where}{room.metadata.name}"]
    lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
    if plan.warnings:
        lines.append("warnings:")
        lines += [f"  - {warning}" for warning in plan.warnings]
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    room = read_room(args.file)
    now = args.now or datetime.now(UTC)
    start = occurrence_start(room.spec, now, AudioRoomStatus())  # a recurring room's next
    room = room.model_copy(update={"spec": room.spec.model_copy(update={"start_time": start})})
    plan = plan_room(room.spec, now)
    if args.output == "json":
        print(json.dumps(plan_as_json(room, plan), indent=2))
    else:
        print(plan_as_table(room, plan))
    return 0


def _cmd_crd(args: argparse.Namespace) -> int:
    sys.stdout.write(render_crd())
    return 0


def _partition(text: str) -> Partition:
    try:
        return Partition.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_run(args: argparse.Namespace) -> int:
    policy, queries = tenant_policy(args)  # a bad flag is refused before anything starts

    import kopf

    from townsquare import handlers
    from townsquare.telemetry import configure_logging

    configure_logging(args.log_format)
    if args.metrics_port:
        from townsquare import observability

        try:
            observability.serve(args.metrics_port)
        except OSError as exc:
            raise UsageError(f"--metrics-port {args.metrics_port}: {exc.strerror}") from None
    settings = handlers.Settings(
        prometheus_url=args.prometheus_url,
        allowed_prometheus_urls=tuple(args.allow_prometheus_url or ()),
        metrics_interval=timedelta(seconds=args.metrics_interval),
        metrics_max_age=timedelta(seconds=args.metrics_max_age),
        metrics_timeout=timedelta(seconds=args.metrics_timeout),
        partition=args.partition,
        policy=policy,
        listener_queries=queries,
        headroom_priority_class=args.headroom_priority_class,
        headroom_image=args.headroom_image,
        relay_ticket_secret=args.relay_ticket_secret or None,
        peering_lifetime=timedelta(seconds=args.peering_lifetime),
        peering=args.peering,
        priority=args.priority,
        namespaces=tuple(args.namespace or ()),
        claims_namespace=args.claims_namespace,
        identity=args.identity,
    )
    kopf.run(
        # Our identity in kopf's peering too: the operator reads who may act from it.
        identity=cast(Any, settings.identity),
        registry=handlers.REGISTRY,
        memo=kopf.Memo(settings=settings),
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
    )
    return 0


def tenant_policy(args: argparse.Namespace) -> tuple[TenantPolicy, dict[str, str]]:
    """The operator's tenant policy and named listener queries, from `run`'s flags."""
    queries: dict[str, str] = {}
    for given in args.listener_query or ():
        name, _, promql = given.partition("=")
        if not re.fullmatch(QUERY_NAME_PATTERN, name) or not promql.strip():
            raise UsageError(
                f"--listener-query: expected NAME=PROMQL with a lower-case NAME (got {given!r})"
            )
        queries[name] = promql
    if args.max_relays_per_room is not None and args.max_relays_per_room < 1:
        raise UsageError(
            f"--max-relays-per-room: must be at least 1 (got {args.max_relays_per_room})"
        )
    free = args.free_promql_namespaces.strip()
    own = (args.prometheus_url,) if args.prometheus_url else ()
    policy = TenantPolicy(
        allowed_registries=tuple(args.allowed_registry or ()),
        max_relays=args.max_relays_per_room,
        allowed_prometheus_urls=own + tuple(args.allow_prometheus_url or ()),
        named_queries=BUILT_IN_QUERIES | queries.keys(),
        free_promql_namespaces=(
            None if free == "*" else frozenset(n for n in free.split(",") if n.strip())
        ),
    )
    return policy, queries


def _cmd_loadgen(args: argparse.Namespace) -> int:
    from townsquare import loadgen
    from townsquare.sim.trace import TraceError, load_trace

    namespace, _, name = args.room.rpartition("/")
    if not namespace or not name:
        raise UsageError(f"--room: expected NAMESPACE/NAME (got {args.room!r})")
    for edge in args.edge:
        if not edge.startswith(("http://", "https://")):
            raise UsageError(f"--edge: expected an http(s) URL (got {edge!r})")
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    key = None
    if args.ticket_key_file or os.environ.get("TOWNSQUARE_TICKET_KEY"):
        from townsquare.edge.server import read_key
        from townsquare.tickets import TicketError

        try:
            key = read_key(args.ticket_key_file)
        except (OSError, TicketError) as exc:
            raise UsageError(f"--ticket-key-file: {exc}") from None
    start = args.start
    if start is None:
        from townsquare.kube.client import Cluster, load_config

        room = Cluster(load_config()).read_room(namespace, name)
        start = parse_time(room["spec"]["startTime"])
    loadgen.run(
        namespace,
        name,
        trace,
        start,
        args.port,
        args.edge,
        speed=args.speed,
        key=key,
        record=Path(args.record) if args.record else None,
        check_every=args.check_every,
        real_listeners=args.real_listeners,
        id_prefix=args.id_prefix,
    )
    return 0


def _cmd_edge(args: argparse.Namespace) -> int:
    import socket
    import time

    from townsquare.edge.admission import Gate, Settings
    from townsquare.edge.reports import PrometheusReports
    from townsquare.edge.server import Edge, read_key, serve
    from townsquare.edge.watch import ApiServer, Watcher
    from townsquare.telemetry import configure_logging
    from townsquare.tickets import TicketError

    if args.replicas < 1:
        raise UsageError(f"--replicas: at least 1 (got {args.replicas})")
    if not args.prometheus_url:
        raise UsageError("--prometheus-url: needed (or TOWNSQUARE_PROMETHEUS_URL)")
    try:
        key = read_key(args.ticket_key_file)
    except OSError as exc:
        raise UsageError(f"--ticket-key-file: cannot read: {exc.strerror}") from None
    except TicketError as exc:
        source = "--ticket-key-file" if args.ticket_key_file else "$TOWNSQUARE_TICKET_KEY"
        raise UsageError(f"{source}: {exc}") from None
    configure_logging(args.log_format)
    settings = Settings(
        replicas=args.replicas,
        admit_ttl=args.admit_ttl,
        retry_after=args.refresh,
        waiter_expiry=args.refresh,
        started_at=time.time(),
    )
    gate = Gate(key, settings)
    watcher = Watcher(ApiServer.load(), gate, args.namespace or ())
    edge = Edge(
        gate,
        watcher=watcher,
        reports=PrometheusReports(args.prometheus_url),
        refresh_seconds=args.refresh,
        replica=f"{socket.gethostname()}:{args.port}",
    )
    serve(edge, args.host, args.port)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import secrets

    from townsquare import demo

    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    if not kubeconfig:
        raise UsageError("--kubeconfig: needed (or KUBECONFIG); 'make demo' brings up a cluster")
    given = (("--kubeconfig", kubeconfig), ("--trace", args.trace), ("--room", args.room))
    for flag, path in given:
        if not Path(path).is_file():
            raise UsageError(f"{flag}: {path} is not a file")
    try:
        with demo.sigterm_as_interrupt():
            report = demo.run_demo(
                Path(kubeconfig),
                args.namespace or f"townsquare-demo-{secrets.token_hex(3)}",
                Path(args.trace),
                Path(args.room),
                args.speed,
                Path(args.out),
                crd_dir=Path(args.crds),
                start_in=args.start_in,
                nodes=args.nodes,
                real_listeners=args.real_listeners,
            )
    except demo.DemoError as exc:
        print(f"townsquare: demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("townsquare: demo interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print(f"report: {report.html} (plot: {report.png})")
    return 0


def read_ticket_key(path: str | None) -> bytes:
    """The shared ticket key (the Secret's file); surrounding whitespace is not part of it."""
    if not path:
        raise UsageError("--ticket-key-file: needed (or TOWNSQUARE_TICKET_KEY_FILE)")
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise UsageError(f"--ticket-key-file: {path}: cannot read: {exc.strerror}") from None
    from townsquare.tickets import TicketError, check_key

    try:
        return check_key(key)
    except TicketError as exc:
        raise UsageError(f"--ticket-key-file: {exc}") from None


def _address(flag: str, text: str, default_port: int) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{flag}: expected HOST:PORT (got {text!r})")
    return host, int(port)


def _relay_addresses(args: argparse.Namespace) -> dict[int, tuple[str, int]]:
    addresses: dict[int, tuple[str, int]] = {}
    for entry in args.relay_address or ():
        ordinal, equals, address = entry.partition("=")
        if not equals or not ordinal.isdigit():
            raise UsageError(f"--relay-address: expected ORDINAL=HOST:PORT (got {entry!r})")
        addresses[int(ordinal)] = _address("--relay-address", address, args.port)
    return addresses


def _relay_sources(args: argparse.Namespace) -> Any:
    from townsquare.relay.process import RelaySources

    if not args.map_file:
        raise UsageError(
            "--map-file: needed (or TOWNSQUARE_MAP_FILE): the room's <room>-shards ConfigMap "
            "mounted as a file (a relay never calls the API server)"
        )
    return RelaySources(
        map_file=Path(args.map_file),
        hosts_file=Path(args.hosts_file) if args.hosts_file else None,
        relay_addresses=_relay_addresses(args),
    )


def _origin_sources(args: argparse.Namespace) -> Any:
    from townsquare.relay.process import OriginSources

    if args.no_map:
        return None
    if args.map_file:
        return OriginSources(map_file=Path(args.map_file))
    return OriginSources(kubeconfig=args.kubeconfig)


def _room_of(args: argparse.Namespace) -> tuple[str, str]:
    if not args.namespace or not args.room:
        raise UsageError("--namespace and --room: needed (or POD_NAMESPACE, TOWNSQUARE_ROOM)")
    return args.namespace, args.room


def _cmd_relay(args: argparse.Namespace) -> int:
    from townsquare.relay.hub import HubSettings
    from townsquare.relay.process import run, run_relay
    from townsquare.relay.server import RelayConfig
    from townsquare.telemetry import configure_logging

    namespace, room = _room_of(args)
    if not args.pod:
        raise UsageError("--pod: needed (or POD_NAME)")
    if not args.origin:
        raise UsageError("--origin: needed (or TOWNSQUARE_ORIGIN)")
    if args.capacity < 1:
        raise UsageError(f"--capacity: must be at least 1 (got {args.capacity})")
    config = RelayConfig(
        namespace=namespace,
        room=room,
        pod=args.pod,
        key=read_ticket_key(args.ticket_key_file),
        origin=_address("--origin", args.origin, 7880),
        capacity=args.capacity,
        host=args.address,
        port=args.port,
        migrations_per_minute=args.migrations_per_minute,
        map_interval=args.map_interval,
        hub=HubSettings(buffer_frames=args.buffer_frames),
    )
    sources = _relay_sources(args)
    configure_logging(args.log_format)
    try:
        run(run_relay(config, sources, args.metrics_port))
    except OSError as exc:
        raise UsageError(f"--address {args.address}: {exc.strerror or exc}") from None
    return 0


def _cmd_origin(args: argparse.Namespace) -> int:
    from townsquare.relay.hub import HubSettings
    from townsquare.relay.origin import OriginConfig
    from townsquare.relay.process import run, run_origin
    from townsquare.telemetry import configure_logging

    namespace, room = _room_of(args)
    if args.frame_interval <= 0 or args.frame_bytes < 0:
        raise UsageError("--frame-interval must be above 0 and --frame-bytes at least 0")
    config = OriginConfig(
        namespace=namespace,
        room=room,
        key=read_ticket_key(args.ticket_key_file),
        host=args.address,
        port=args.port,
        frame_interval=args.frame_interval,
        frame_bytes=args.frame_bytes,
        map_interval=args.map_interval,
        hub=HubSettings(buffer_frames=args.buffer_frames),
    )
    sources = _origin_sources(args)
    configure_logging(args.log_format)
    try:
        run(run_origin(config, sources, args.metrics_port))
    except OSError as exc:
        raise UsageError(f"--address {args.address}: {exc.strerror or exc}") from None
    return 0


def _data_plane_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--namespace", default=env("POD_NAMESPACE"), help="the room's namespace")
    parser.add_argument("--room", default=env("TOWNSQUARE_ROOM"), help="the AudioRoom's name")
    parser.add_argument(
        "--ticket-key-file",
        default=env("TOWNSQUARE_TICKET_KEY_FILE"),
        help="the shared ticket key (the Secret mounted from the chart)",
    )
    parser.add_argument("--map-interval", type=parse_seconds, default=1.0)
    parser.add_argument("--buffer-frames", type=int, default=100, help="frames kept to resume")
    parser.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")


def real_listener_count(text: str) -> int | None:
    """`--real-listeners`: a count (0 or more), or `auto` (None: measured at start)."""
    if text == "auto":
        return None
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto' (got {text!r})") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {count})")
    return count


def parse_seconds(text: str) -> float:
    """A duration on the command line (`45s`, `1m30s`) or plain seconds."""
    try:
        return (
            float(text)
            if text.replace(".", "", 1).isdigit()
            else float(parse_duration(text).total_seconds())
        )
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_simulate(args: argparse.Namespace) -> int:
    from townsquare.sim import POLICIES, Settings, TraceError, load_trace, simulate
    from townsquare.sim.report import as_json, as_table

    room = read_room(args.room)
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        raise UsageError(str(exc)) from None
    for name, value in (("--scrape-interval", args.scrape_interval), ("--control-interval",
                        args.control_interval)):  # fmt: skip
        if value < 1 or value != int(value):
            raise UsageError(f"{name}: must be a whole number of seconds, at least 1s")
    policies = POLICIES if args.policy == "all" else (args.policy,)
    settings = Settings(
        relay_startup=args.relay_startup,
        scrape_interval=int(args.scrape_interval),
        control_interval=int(args.control_interval),
        keep_series=args.plot is not None,
    )
    results = simulate(room.spec, trace, policies, settings)
    if args.plot:
        from townsquare.sim.plot import plot

        try:
            plot(results, room.spec.relay.listeners_per_relay, room.metadata.name, args.plot)
        except (RuntimeError, OSError) as exc:
            raise UsageError(f"--plot: {exc}") from None
    if args.output == "json":
        print(json.dumps(as_json(results)))
    else:
        print(as_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line, one sub-command per job."""
    parser = _Parser(prog="townsquare", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {metadata.version('townsquare')}"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    plan = commands.add_parser("plan", help="print the relay plan for an AudioRoom manifest")
    plan.add_argument("-f", "--file", required=True, help="AudioRoom manifest (- for stdin)")
    plan.add_argument("-o", "--output", choices=["table", "json"], default="table")
    plan.add_argument("--now", type=parse_time, help="plan as if it were this RFC 3339 time")
    plan.set_defaults(handler=_cmd_plan)

    crd = commands.add_parser("crd", help="print the AudioRoom CRD generated from the models")
    crd.set_defaults(handler=_cmd_crd)

    sim = commands.add_parser(
        "simulate", help="replay an audience trace through townsquare and the baselines"
    )
    sim.add_argument("--room", required=True, help="AudioRoom manifest")
    sim.add_argument("--trace", required=True, help="CSV: t_seconds,listeners[,relay_failures]")
    sim.add_argument(
        "--policy", choices=["townsquare", "reactive", "keda", "oracle", "all"], default="all"
    )
    sim.add_argument("-o", "--output", choices=["table", "json"], default="table")
    sim.add_argument("--plot", metavar="FILE.png", help="also draw the runs (needs matplotlib)")
    sim.add_argument(
        "--relay-startup", type=parse_seconds, help="true relay start-up (default: the room's)"
    )
    sim.add_argument("--scrape-interval", type=parse_seconds, default=15.0)
    sim.add_argument("--control-interval", type=parse_seconds, default=5.0)
    sim.set_defaults(handler=_cmd_simulate)

    run = commands.add_parser("run", help="run the operator against the cluster in KUBECONFIG")
    run.add_argument(
        "-n", "--namespace", action="append", help="watch only this namespace (repeatable)"
    )
    run.add_argument("--liveness", help="serve health, e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    run.add_argument("--peering", help="kopf peering object for high availability")
    run.add_argument("--priority", type=int, default=0, help="distinct per replica when peering")
    run.add_argument(
        "--peering-lifetime",
        type=parse_seconds,
        default=30.0,
        help="a silent replica loses the lead after this long (the standby's takeover time)",
    )
    run.add_argument(
        "--metrics-port", type=int, default=9090, help="serve /metrics on this port (0: off)"
    )
    run.add_argument(
        "--prometheus-url",
        default=os.environ.get("TOWNSQUARE_PROMETHEUS_URL"),
        help="Prometheus to read listeners from (default: $TOWNSQUARE_PROMETHEUS_URL)",
    )
    run.add_argument(
        "--allow-prometheus-url",
        action="append",
        help="a Prometheus a room's spec.metrics.prometheusUrl may name (repeatable)",
    )
    run.add_argument(
        "--metrics-interval", type=parse_seconds, default=15.0, help="seconds between reads"
    )
    run.add_argument(
        "--metrics-max-age",
        type=parse_seconds,
        default=60.0,
        help="older listener samples count as missing (fail-static)",
    )
    run.add_argument(
        "--headroom-priority-class",
        default="townsquare-headroom",
        help="PriorityClass of node headroom placeholders (spec.nodeHeadroom); the chart's",
    )
    run.add_argument(
        "--relay-ticket-secret",
        default=os.environ.get("TOWNSQUARE_RELAY_TICKET_SECRET", ""),
        help="Secret (in each room's namespace, key `key`) with the edge's ticket key, mounted "
        "into relay pods so they check admit tickets (the chart's; default: none)",
    )
    run.add_argument(
        "--headroom-image",
        default="registry.k8s.io/pause:3.10",
        help="image of node headroom placeholders: a container that only sleeps",
    )
    run.add_argument(
        "--metrics-timeout",
        type=parse_seconds,
        default=5.0,
        help="longest a Prometheus query may take; slower counts as no data",
    )
    run.add_argument(
        "--partition",
        type=_partition,
        default=Partition(),
        help="INDEX/COUNT: serve only the rooms whose stable hash falls in this partition",
    )
    run.add_argument(
        "--identity",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the claims table and kopf's peering (default: host and "
        "process id); a process restarted under its old name takes its own claims back at "
        "once, as a container restarted in its pod does, instead of waiting out their lifetime",
    )
    run.add_argument(
        "--claims-namespace",
        default=os.environ.get("POD_NAMESPACE") or "",
        help="where replicas claim the rooms they act on, one ConfigMap "
        "townsquare-partitions for all (default: $POD_NAMESPACE, else the first "
        "namespace served, else default); keep it where tenants cannot write",
    )
    run.add_argument(
        "--allowed-registry",
        action="append",
        help="tenant policy: relay images must come from this registry (repeatable; none: any)",
    )
    run.add_argument(
        "--max-relays-per-room",
        type=int,
        help="tenant policy: the largest spec.scaling.maxRelays a room may declare",
    )
    run.add_argument(
        "--listener-query",
        action="append",
        metavar="NAME=PROMQL",
        help="a named listener query rooms may pick in spec.metrics.preset (repeatable)",
    )
    run.add_argument(
        "--free-promql-namespaces",
        default="*",
        help="namespaces whose rooms may write spec.metrics.listenersQuery, comma-separated "
        "(default *: all; empty: none)",
    )
    run.set_defaults(handler=_cmd_run)

    load = commands.add_parser(
        "loadgen", help="play an audience trace through the edge, serving the relays' /metrics"
    )
    load.add_argument(
        "--edge", action="append", required=True, help="an edge replica's URL (repeatable)"
    )
    load.add_argument(
        "--ticket-key-file",
        help="check admit tickets with this key, as relays do (default: $TOWNSQUARE_TICKET_KEY)",
    )
    load.add_argument("--record", help="append every admission and move to this JSONL file")
    load.add_argument(
        "--check-every", type=parse_seconds, default=5.0, help="seconds between move checks"
    )
    load.add_argument("--room", required=True, help="NAMESPACE/NAME of the AudioRoom")
    load.add_argument("--trace", required=True, help="CSV t_seconds,listeners")
    load.add_argument("--port", type=int, default=9464, help="port of /metrics on 127.0.0.1")
    load.add_argument("--speed", type=float, default=1.0, help="trace seconds per second")
    load.add_argument(
        "--real-listeners",
        type=real_listener_count,
        default=None,
        help="listeners held as real relay connections when the room's relays are real "
        "processes; the rest of the audience is simulated. Default 'auto': as many as a "
        "measurement at start finds this machine carries (a sixteenth of what one listener "
        "process and one relay carry alone, about 10 s)",
    )
    load.add_argument("--start", type=parse_time, help="trace t=0 (default: the room's start)")
    load.add_argument(
        "--id-prefix",
        default="listener-",
        help="listener i is PREFIXi (default 'listener-'); a second load generator for the "
        "same room needs a prefix of its own",
    )
    load.set_defaults(handler=_cmd_loadgen)

    edge = commands.add_parser("edge", help="serve joins: the gateway in front of the relays")
    edge.add_argument("--host", default="0.0.0.0", help="address to listen on")
    edge.add_argument("--port", type=int, default=8080, help="port of the HTTP API")
    edge.add_argument(
        "-n", "--namespace", action="append", help="serve only this namespace (repeatable)"
    )
    edge.add_argument(
        "--prometheus-url",
        default=os.environ.get("TOWNSQUARE_PROMETHEUS_URL"),
        help="where the relays' listener counts are read (default: $TOWNSQUARE_PROMETHEUS_URL)",
    )
    edge.add_argument(
        "--ticket-key-file", help="file holding the ticket key (default: $TOWNSQUARE_TICKET_KEY)"
    )
    edge.add_argument(
        "--replicas", type=int, default=1, help="edge replicas sharing each relay's spare room"
    )
    edge.add_argument(
        "--refresh", type=parse_seconds, default=1.0, help="seconds between report reads"
    )
    edge.add_argument(
        "--admit-ttl", type=parse_seconds, default=10.0, help="seconds an admit ticket is valid"
    )
    edge.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    edge.set_defaults(handler=_cmd_edge)

    show = commands.add_parser(
        "demo", help="play a compressed launch on a cluster and write a report (make demo)"
    )
    show.add_argument("--kubeconfig", help="cluster to use (default: $KUBECONFIG)")
    show.add_argument("--namespace", help="namespace to use (default: a new one, deleted after)")
    show.add_argument("--trace", default="examples/demo/launch-surge.csv", help="audience CSV")
    show.add_argument("--room", default="examples/demo/room.yaml", help="AudioRoom manifest")
    show.add_argument("--speed", type=float, default=60.0, help="trace seconds per second")
    show.add_argument("--start-in", type=parse_seconds, default=60.0, help="start after this")
    show.add_argument("--crds", default="crds", help="directory of the CRDs to install")
    show.add_argument("--out", default="out/demo", help="directory of the report")
    show.add_argument(
        "--real-listeners",
        type=real_listener_count,
        default=None,
        help="listeners held as real relay connections; the rest is simulated (default "
        "'auto': as many as the load generator measures this machine carries at start)",
    )
    show.add_argument(
        "--nodes",
        action="store_true",
        help="relays fit only on nodes Karpenter's kwok provider adds; node headroom asks "
        "for them ahead of the pre-warm (run from the repository: make demo-nodes)",
    )
    show.set_defaults(handler=_cmd_demo)

    relay = commands.add_parser(
        "relay", help="the reference relay for one room (one pod; no API server access)"
    )
    _data_plane_options(relay)
    env = os.environ.get
    # A relay pod's container gets these from its environment (kube/children.py).
    relay.add_argument(
        "--address", default=env("POD_IP", "127.0.0.1"), help="IP to listen on ($POD_IP)"
    )
    relay.add_argument(
        "--port", type=int, default=env("TOWNSQUARE_PORT", "7880"),
        help="port for listeners and child relays ($TOWNSQUARE_PORT)",
    )  # fmt: skip
    relay.add_argument(
        "--metrics-port", type=int, default=env("TOWNSQUARE_METRICS_PORT", "9090"),
        help="/metrics, 0: off ($TOWNSQUARE_METRICS_PORT)",
    )  # fmt: skip
    relay.add_argument(
        "--map-file",
        default=env("TOWNSQUARE_MAP_FILE"),
        help="the room's shard map: the mounted <room>-shards ConfigMap's shardmap.json, "
        "read again when it changes ($TOWNSQUARE_MAP_FILE)",
    )
    relay.add_argument(
        "--hosts-file",
        default=env("TOWNSQUARE_HOSTS_FILE"),
        help="find parent relays' addresses in this /etc/hosts-style file instead of DNS "
        "(where there is no cluster DNS, as on the local kwok cluster)",
    )
    relay.add_argument(
        "--relay-address",
        action="append",
        help="ORDINAL=HOST:PORT of a relay, instead of DNS (repeatable; tests)",
    )
    relay.add_argument("--pod", default=env("POD_NAME"), help="this relay's pod name")
    relay.add_argument(
        "--origin",
        default=env("TOWNSQUARE_ORIGIN"),
        help="HOST:PORT of the room's origin (default: $TOWNSQUARE_ORIGIN)",
    )
    relay.add_argument(
        "--capacity",
        type=int,
        default=env("TOWNSQUARE_CAPACITY", "1000"),
        help="listeners at most until the map says (default: $TOWNSQUARE_CAPACITY or 1000)",
    )
    relay.add_argument(
        "--migrations-per-minute",
        type=float,
        default=1200.0,
        help="this relay's share of the room's budget for sending listeners elsewhere",
    )
    relay.set_defaults(handler=_cmd_relay)

    origin = commands.add_parser("origin", help="a synthetic speakers' stream for one room")
    _data_plane_options(origin)
    origin.add_argument("--address", default="127.0.0.1", help="IP to listen on")
    origin.add_argument("--port", type=int, default=7880, help="port relays connect to")
    origin.add_argument("--metrics-port", type=int, default=9090, help="/metrics (0: off)")
    origin.add_argument("--kubeconfig", help="read the shard map with it (default: KUBECONFIG)")
    origin.add_argument("--map-file", help="read the shard map from this JSON file instead")
    origin.add_argument("--frame-interval", type=parse_seconds, default=0.020)
    origin.add_argument("--frame-bytes", type=int, default=60, help="payload bytes per frame")
    origin.add_argument("--no-map", action="store_true", help="feed any relay of the room")
    origin.set_defaults(handler=_cmd_origin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of `python -m townsquare`."""
    try:
        args = build_parser().parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UsageError as exc:
        print(f"townsquare: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
