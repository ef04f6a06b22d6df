"""The edge's HTTP API over a real socket on loopback: status codes, bodies, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from test_edge_admission import NS, ROOM, gate_for, listeners_of, room_map, seat_at

from townsquare.api.names import relay_service_name
from townsquare.edge.admission import Closed, Endpoint, Gate, Report, Settings
from townsquare.edge.reports import Readings, parse_news, parse_reports
from townsquare.edge.server import Edge
from townsquare.edge.watch import ROOM_LABEL, SHARD_MAP_KEY, ApiServer, Watcher, endpoints_of
from townsquare.relay.listener import EdgeJoiner, Listener
from townsquare.sharding import ShardMap

JOIN = f"/v1/rooms/{NS}/{ROOM}/join"


def run(
    gate: Gate, scenario: Callable[[TestClient[Any, Any]], Awaitable[None]], **options: Any
) -> None:
    async def main() -> None:
        edge = Edge(gate, clock=lambda: 101.0, **options)
        async with TestClient(TestServer(edge.app())) as client:
            await scenario(client)

    asyncio.run(main())


async def post(
    client: TestClient[Any, Any], body: bytes | str, path: str = JOIN
) -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    response = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    text = await response.text()
    assert "\n" not in text.strip(), "every answer is one line"
    return response.status, json.loads(text)


def test_bad_input_gets_400_with_one_line_naming_the_field() -> None:
    cases = {
        "{": "body: not valid JSON",
        "[1]": "body: expected a JSON object",
        '{"listener": "a", "color": "red"}': "body: unknown field 'color'",
        "{}": "listener: required",
        '{"listener": 7}': "listener: must be a string",
        '{"listener": ""}': "listener: must not be empty",
        json.dumps({"listener": "é" * 129}): "listener: 258 bytes, at most 256",
        json.dumps({"listener": "a", "ticket": 5}): "ticket: must be the string",
        json.dumps({"listener": "a", "ticket": "nonsense"}): "ticket: not of the form",
        json.dumps({"listener": "a" * 5000}): "body: 5,016 bytes, at most 4,096",
        "[" * 4000: "body: nested too deeply",
        '{"listener": "\\ud800"}': "listener: not valid UTF-8 (a lone surrogate)",
        '{"listener": "a", "ticket": "a.\\udfff"}': "ticket: must be the string a 429 answer gave",
        '{"listener": ' + "[" * 3000 + "}": "body: nested too deeply",
    }

    async def scenario(client: TestClient[Any, Any]) -> None:
        for body, message in cases.items():
            status, answer = await post(client, body)
            assert status == 400, body
            assert answer["error"].startswith(message), (body, answer)
        response = await client.get(f"/v1/rooms/{NS}/{ROOM}/listeners/{'x' * 257}")
        assert response.status == 400
        assert (await response.json())["error"] == "id: 257 bytes, at most 256"

    run(gate_for(room_map()), scenario)


def test_unknown_room_is_404() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        status, answer = await post(client, '{"listener": "a"}', f"/v1/rooms/{NS}/nowhere/join")
        assert status == 404
        assert answer["error"] == f"room {NS}/nowhere: unknown (no shard map)"
        response = await client.get(f"/v1/rooms/{NS}/nowhere/listeners/a")
        assert response.status == 404

    run(gate_for(room_map()), scenario)


def test_admitted_then_queued_with_retry_after_and_a_ticket_that_keeps_the_place() -> None:
    shard_map = room_map(relays=1, capacity=1)

    async def scenario(client: TestClient[Any, Any]) -> None:
        status, admitted = await post(client, '{"listener": "first"}')
        assert status == 200
        assert set(admitted) == {"relay", "pod", "shard", "generation", "ticket"}
        assert admitted["pod"] == f"{ROOM}-relay-0"
        assert admitted["relay"] == "10.0.0.1:7000"
        assert admitted["generation"] == shard_map.generation
        response = await client.post(JOIN, json={"listener": "second"})
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
        queued = await response.json()
        assert set(queued) == {"position", "waiting", "ticket"}
        assert (queued["position"], queued["waiting"]) == (1, 1)
        status, third = await post(client, '{"listener": "third"}')
        assert (status, third["position"], third["waiting"]) == (429, 2, 2)
        status, again = await post(
            client, json.dumps({"listener": "second", "ticket": queued["ticket"]})
        )
        assert (status, again["position"], again["waiting"]) == (429, 1, 2)

    run(gate_for(shard_map), scenario)


def test_location_and_a_moved_shard() -> None:
    shard_map = room_map(relays=2)
    listener = listeners_of(shard_map, 1, 1)[0]

    async def scenario(client: TestClient[Any, Any]) -> None:
        path = f"/v1/rooms/{NS}/{ROOM}/listeners/{listener}"
        response = await client.get(path)
        assert response.status == 200
        here = await response.json()
        assert here["pod"] == f"{ROOM}-relay-1"
        assert here["moved"] is False
        assert "ticket" not in here
        response = await client.get(path, params={"ticket": seat_at(listener, f"{ROOM}-relay-0")})
        moved = await response.json()
        assert moved["moved"] is True
        assert moved["relay"] == "10.0.0.2:7000"
        assert moved["ticket"]

    run(gate_for(shard_map), scenario)


def test_a_move_needs_the_listener_own_admit_ticket_and_says_which_field_is_wrong() -> None:
    shard_map = room_map(relays=2, budget=60)
    listener, other = listeners_of(shard_map, 1, 2)
    old = f"{ROOM}-relay-0"
    cases = {
        (("pod", old),): "pod: not accepted; send ticket=",
        (("ticket", seat_at(other, old)),): "ticket: issued to another listener or room",
        (("ticket", seat_at(listener, f"{ROOM}-relay-7")),): "ticket: relay launch-relay-7 is not",
        (("ticket", "nonsense"),): "ticket: not of the form",
        (("ticket", "a.\u00e9"),): "ticket: must be the admit ticket",
        (("ticket", seat_at(listener, old)), ("pod", old)): "pod: not accepted",
        (("color", "red"),): "color: unknown parameter",
    }

    async def scenario(client: TestClient[Any, Any]) -> None:
        path = f"/v1/rooms/{NS}/{ROOM}/listeners/{listener}"
        for params, message in cases.items():
            response = await client.get(path, params=list(params))
            text = await response.text()
            assert response.status == 400, params
            assert "\n" not in text.strip()
            assert json.loads(text)["error"].startswith(message), (params, text)
        seat = seat_at(listener, old)
        response = await client.get(path, params={"ticket": seat})
        moved = await response.json()
        assert moved["moved"] is True
        replay = await client.get(path, params={"ticket": seat})
        assert replay.status == 400, "a spent ticket wins no second move"
        assert (await replay.json())["error"].startswith("ticket: superseded by the move")
        response = await client.get(path, params={"ticket": moved["ticket"]})
        assert (await response.json())["moved"] is False, "the new ticket seats it at home"

    run(gate_for(shard_map), scenario)


def test_a_flood_of_malformed_requests_leaves_well_formed_ones_served() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        junk = [post(client, "{" * (i % 50 + 1)) for i in range(300)]
        good = [post(client, json.dumps({"listener": f"ok-{i}"})) for i in range(5)]
        answers = await asyncio.gather(*junk, *good)
        assert all(status == 400 for status, _ in answers[:300])
        assert all(status == 200 for status, _ in answers[300:])

    run(gate_for(room_map(capacity=1000)), scenario)


def test_metrics_show_waiting_joins_outcomes_and_latency() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        await post(client, '{"listener": "a"}')
        await post(client, '{"listener": "b"}')
        await post(client, "{")
        text = await (await client.get("/metrics")).text()
        assert f'audioroom_edge_waiting_listeners{{namespace="{NS}",room="{ROOM}"}} 1.0' in text
        assert f'audioroom_edge_oldest_wait_seconds{{namespace="{NS}",room="{ROOM}"}} 0.0' in text
        assert 'audioroom_edge_joins_total{outcome="admitted"} 1.0' in text
        assert 'audioroom_edge_joins_total{outcome="queued"} 1.0' in text
        assert 'audioroom_edge_joins_total{outcome="bad_request"} 1.0' in text
        assert "audioroom_edge_join_seconds_count 3.0" in text
        # The line the other replicas read back: its tenths, its length, and a series on
        # every scrape whose time tells them how fresh their news of this replica is.
        names = f'replica="edge",room="{ROOM}"'
        line = "audioroom_edge_line_first_attempt_seconds"
        assert f'{line}_count{{namespace="{NS}",{names}}} 1.0' in text
        tenths = [
            f'{line}{{namespace="{NS}",quantile="{q / 10}",{names}}} 101.0' for q in range(11)
        ]
        assert all(tenth in text for tenth in tenths)
        assert 'audioroom_edge_line_rooms{replica="edge"} 1.0' in text

    run(gate_for(room_map(relays=1, capacity=1)), scenario)


def test_not_ready_until_the_maps_are_synced() -> None:
    gate = gate_for(room_map())
    unreachable = ApiServer(host="http://127.0.0.1:9", ssl=False, token=lambda: None)
    watcher = Watcher(unreachable, gate)

    async def scenario(client: TestClient[Any, Any]) -> None:
        assert (await client.get("/healthz")).status == 200
        response = await client.get("/readyz")
        assert response.status == 503
        assert "not synced" in (await response.json())["error"]
        for event in watcher.synced.values():
            event.set()
        assert (await client.get("/readyz")).status == 200

    run(gate, scenario, watcher=watcher)


def test_not_ready_while_a_restarted_replica_cannot_admit() -> None:
    # Started at 99 with admit_ttl 5: the reports sampled at 100 may miss what the previous
    # replica admitted, so it admits nobody; the Service must send it no joins meanwhile.
    gate = gate_for(room_map(), sampled_at=100.0, started_at=99.0)

    async def scenario(client: TestClient[Any, Any]) -> None:
        response = await client.get("/readyz")
        assert response.status == 503
        assert (
            "admitting nobody until reports sampled after 104" in (await response.json())["error"]
        )
        gate.set_reports({(NS, ROOM, f"{ROOM}-relay-{o}"): Report(0, 104.5) for o in (0, 1)})
        assert (await client.get("/readyz")).status == 200

    run(gate, scenario)


def test_endpoint_slices_and_prometheus_answers_are_read_as_the_api_gives_them() -> None:
    endpoint_slice = {
        "ports": [{"name": "metrics", "port": 9100}, {"name": "listeners", "port": 7000}],
        "endpoints": [
            {
                "addresses": ["127.0.1.5"],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "name": "r-relay-0"},
            },
            {
                "addresses": ["127.0.1.6"],
                "conditions": {"ready": False},
                "targetRef": {"kind": "Pod", "name": "r-relay-1"},
            },
            {
                "addresses": ["127.0.1.7"],
                "conditions": {"ready": True, "terminating": True},
                "targetRef": {"kind": "Pod", "name": "r-relay-2"},
            },
        ],
    }
    found = endpoints_of(endpoint_slice)
    assert found["r-relay-0"].address == "127.0.1.5:7000" and found["r-relay-0"].ready
    assert not found["r-relay-1"].ready
    assert not found["r-relay-2"].ready
    labels = {"namespace": "n", "room": "r", "pod": "r-relay-0"}
    answer: list[dict[str, Any]] = [
        {"metric": labels, "value": [200.0, "7"]},
        {"metric": {**labels, "at": "1"}, "value": [200.0, "199.5"]},
        {"metric": {**labels, "pod": "r-relay-1"}, "value": [200.0, "NaN"]},
        *line_series("n", "r", "a", count=3, oldest=150.0),
        *line_series("n", "r", "b", count=2, oldest=120.0),
        *line_series("n", "q", "a", count=1, oldest=90.0),
        {"metric": {"replica": "a", "heard": "1"}, "value": [200.0, "199.0"]},
        {"metric": {"replica": "b", "heard": "1"}, "value": [200.0, "198.0"]},
        {"metric": {"replica": "c", "heard": "1"}, "value": [200.0, "NaN"]},
    ]
    reports = parse_reports(answer)
    readings = Readings(reports, parse_news(answer))
    assert reports == {("n", "r", "r-relay-0"): reports[("n", "r", "r-relay-0")]}
    assert reports[("n", "r", "r-relay-0")].listeners == 7
    assert reports[("n", "r", "r-relay-0")].sampled_at == 199.5
    # What a replica reads of the others' lines: never its own.
    news = readings.news_for("a")
    assert news.heard == {"b": 198.0}
    assert {
        room: {r: line.waiting for r, line in lines.items()} for room, lines in news.lines.items()
    } == {("n", "r"): {"b": 2}}
    assert news.lines[("n", "r")]["b"].oldest == 120.0
    others = readings.news_for("c")
    assert others.heard == {"a": 199.0, "b": 198.0}
    assert others.lines[("n", "q")]["a"].firsts == tuple(90.0 + i for i in range(11))


def line_series(
    namespace: str, room: str, replica: str, count: int, oldest: float
) -> list[dict[str, Any]]:
    """A replica's line as QUERY returns it: its tenths (one second apart) and its count."""
    labels = {"namespace": namespace, "room": room, "replica": replica}
    tenths = [
        {"metric": {**labels, "quantile": repr(i / 10)}, "value": [200.0, str(oldest + i)]}
        for i in range(11)
    ]
    return [*tenths, {"metric": {**labels, "count": "1"}, "value": [200.0, str(count)]}]


def test_client_disconnects_cost_nothing() -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        session = aiohttp.ClientSession()
        await session.close()
        status, _ = await post(client, '{"listener": "a"}')
        assert status == 200

    run(gate_for(room_map()), scenario)


def test_the_edge_command_refuses_a_missing_or_short_key_in_one_line(
    capsys: Any, monkeypatch: Any
) -> None:
    from townsquare.cli import main

    monkeypatch.delenv("TOWNSQUARE_TICKET_KEY", raising=False)
    args = ["edge", "--prometheus-url", "http://127.0.0.1:9"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "townsquare: error: $TOWNSQUARE_TICKET_KEY: ticket key: 0 bytes, at least 16 needed\n"
    )
    assert main([*args, "--ticket-key-file", "/nonexistent/key"]) == 2
    assert "--ticket-key-file: cannot read" in capsys.readouterr().err
    monkeypatch.setenv("TOWNSQUARE_TICKET_KEY", "k" * 32)
    assert main([*args, "--replicas", "0"]) == 2
    assert capsys.readouterr().err == "townsquare: error: --replicas: at least 1 (got 0)\n"


def test_a_relist_forgets_what_was_deleted_while_the_watch_was_away() -> None:
    # The watch broke; meanwhile room "gone" was deleted, room "launch" was deleted and
    # created again (a new ConfigMap, its map back at a low generation), and one of its
    # EndpointSlices was deleted. The list that follows must show exactly that.
    gate = Gate(b"k" * 32, Settings())
    watcher = Watcher(ApiServer(host="http://127.0.0.1:9", ssl=False, token=lambda: None), gate)
    old_map = dataclasses.replace(room_map(relays=2), generation=9)
    new_map = dataclasses.replace(room_map(relays=1), generation=1)

    def config_map(room: str, uid: str, shard_map: ShardMap) -> dict[str, Any]:
        meta = {"namespace": NS, "name": f"{room}-shards", "uid": uid}
        return {
            "metadata": {**meta, "labels": {ROOM_LABEL: room}},
            "data": {SHARD_MAP_KEY: json.dumps(shard_map.to_dict())},
        }

    def relay_slice(name: str, pod: str) -> dict[str, Any]:
        labels = {ROOM_LABEL: ROOM, "kubernetes.io/service-name": relay_service_name(ROOM)}
        return {
            "metadata": {"namespace": NS, "name": name, "labels": labels},
            "ports": [{"name": "listeners", "port": 7000}],
            "endpoints": [
                {"addresses": ["127.0.1.5"], "conditions": {"ready": True},
                 "targetRef": {"kind": "Pod", "name": pod}}
            ],
        }  # fmt: skip

    watcher.relisted("maps", None, [config_map(ROOM, "uid-1", old_map),
                                    config_map("gone", "uid-2", old_map)])  # fmt: skip
    slices = [relay_slice("s-a", f"{ROOM}-relay-0"), relay_slice("s-b", f"{ROOM}-relay-1")]
    watcher.relisted("relays", None, slices)
    assert set(gate.rooms) == {(NS, ROOM), (NS, "gone")}
    assert set(gate.rooms[(NS, ROOM)].endpoints) == {f"{ROOM}-relay-0", f"{ROOM}-relay-1"}

    watcher.relisted("maps", None, [config_map(ROOM, "uid-3", new_map)])
    watcher.relisted("relays", None, slices[:1])
    assert set(gate.rooms) == {(NS, ROOM)}, "the deleted room is gone"
    room = gate.rooms[(NS, ROOM)]
    assert room.shard_map.generation == 1, "the recreated room's map is taken"
    assert set(room.shard_map.relays) == {0}
    assert set(room.endpoints) == {f"{ROOM}-relay-0"}, "the deleted slice is gone"
    watcher.relisted("maps", None, [config_map(ROOM, "uid-3", old_map)])
    assert gate.rooms[(NS, ROOM)].shard_map.generation == 9
    watcher.relisted("maps", None, [config_map(ROOM, "uid-3", new_map)])
    assert gate.rooms[(NS, ROOM)].shard_map.generation == 9, "never an older map of one source"
    watcher.relisted("maps", "elsewhere", [])
    assert set(gate.rooms) == {(NS, ROOM)}, "a list of another namespace forgets nothing here"


def test_the_reference_relay_client_follows_a_move_with_the_admission_it_holds() -> None:
    # EdgeJoiner (relay/listener.py) over the real HTTP API: it joins, and when its shard
    # moves, proves its seat with the admit ticket it holds and gets the new relay.
    first_map = room_map(relays=1, budget=60)
    moved_map = dataclasses.replace(
        room_map(relays=2, budget=60), generation=first_map.generation + 1
    )
    listener = listeners_of(moved_map, 1, 1)[0]
    gate = gate_for(first_map)
    gate.set_slice(NS, ROOM, "slice-b", {f"{ROOM}-relay-1": Endpoint("10.0.0.2:7000", True)})
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-1"): Report(0, 100.0)})

    async def scenario(client: TestClient[Any, Any]) -> None:
        joiner = EdgeJoiner(client.session, str(client.make_url("")), NS, ROOM)
        held = await joiner.join(listener)
        assert held.pod == f"{ROOM}-relay-0"
        assert await joiner.relocate(listener, held) is None, "its shard has not moved"
        gate.set_map(NS, ROOM, moved_map)
        moved = await joiner.relocate(listener, held)
        assert moved is not None and moved.pod == f"{ROOM}-relay-1"
        assert (moved.host, moved.port) == ("10.0.0.2", 7000)
        assert await joiner.relocate(listener, moved) is None, "home now"

    run(gate, scenario)


def test_the_reference_client_turns_to_another_edge_replica_when_its_own_is_gone() -> None:
    # A replica killed mid-storm: listeners whose own replica it was ask the next one, with
    # the same ticket; those whose replica answers never notice.
    gate = gate_for(room_map(relays=1, budget=60))
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-0"): Report(0, 100.0)})

    async def scenario(client: TestClient[Any, Any]) -> None:
        with socket.socket() as closed:  # a loopback port nobody listens on any more
            closed.bind(("127.0.0.1", 0))
            gone = f"http://127.0.0.1:{closed.getsockname()[1]}"
        joiner = EdgeJoiner(client.session, [gone, str(client.make_url(""))], NS, ROOM)
        names = [f"listener-{i}" for i in range(8)]
        first_asks = {name: joiner._replicas(name)[0] for name in names}
        assert set(first_asks.values()) == {0, 1}, "both replicas are someone's own"
        for name in names:
            held = await joiner.join(name)
            assert held.pod == f"{ROOM}-relay-0"
            assert await joiner.relocate(name, held) is None
        assert {a["edge"] for a in joiner.record} == {1}, "only the live replica answered"
        assert [a["listener"] for a in joiner.record] == names

    run(gate, scenario)


def test_a_closed_room_answers_410_once_and_the_reference_client_stops_asking() -> None:
    """Past the end a join gets 410 Gone with a one-line error, not a 429 and a place in a
    line that never moves; the reference client's listener takes it as final."""
    closed = dataclasses.replace(room_map(relays=1), admission="closed")

    async def scenario(client: TestClient[Any, Any]) -> None:
        status, answer = await post(client, '{"listener": "late"}')
        assert status == 410
        assert answer == {"error": Closed().reason}
        joiner = EdgeJoiner(client.session, str(client.make_url("")), NS, ROOM)
        listener = Listener("late", joiner)
        await asyncio.wait_for(listener.run(asyncio.Event()), timeout=5)
        assert (listener.stats.turned_away, listener.stats.joins, joiner.closed) == (1, 0, 1)
        assert joiner.queued == 0 and not joiner.queue_tickets

    run(gate_for(closed), scenario)
