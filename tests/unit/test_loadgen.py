"""The load generator: its audience follows the trace, its relays count what was admitted."""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from townsquare import tickets
from townsquare.loadgen import (
    Audience,
    RealListeners,
    RelayIdentities,
    Relays,
    demand_at,
    runs_real_relays,
)
from townsquare.relay.listener import Admission, NoRelayYetError
from townsquare.sim.trace import parse_trace

KEY = b"k" * 32


def admit(listener: str, pod: str, room: str = "ns/r", expires: float = 200.0) -> str:
    claims = {"listener": listener, "pod": pod, "room": room, "shard": 1, "generation": 1}
    return tickets.sign(KEY, "admit", claims, expires=expires)


def test_demand_is_linear_between_rows_and_flat_outside() -> None:
    trace = parse_trace("t_seconds,listeners\n0,0\n10,100\n20,100\n")
    assert demand_at(trace, -5) == 0
    assert demand_at(trace, 5) == 50
    assert demand_at(trace, 15) == 100
    assert demand_at(trace, 99) == 100


def test_relays_accept_only_the_edges_tickets_for_them_and_count_each_listener_once() -> None:
    relays = Relays("ns/r", KEY)
    relays.set_ready({"r-relay-0", "r-relay-1"})
    assert relays.connect("a", "r-relay-0", admit("a", "r-relay-0"), now=100.0)
    assert not relays.connect("b", "r-relay-0", admit("b", "r-relay-1"), now=100.0)
    assert not relays.connect("c", "r-relay-0", admit("c", "r-relay-0", room="x/r"), now=100)
    assert not relays.connect("d", "r-relay-0", admit("d", "r-relay-0"), now=300.0)
    assert not relays.connect("e", "r-relay-0", "forged.ticket", now=100.0)
    assert relays.refused == 4
    # Expired by the time it was used, but good when asked for: this process was late.
    assert not relays.connect("f", "r-relay-0", admit("f", "r-relay-0"), now=300.0, asked_at=150)
    assert relays.late == 1
    # Expired before it was even asked for: the edge's fault, refused.
    assert not relays.connect("g", "r-relay-0", admit("g", "r-relay-0"), now=300.0, asked_at=250)
    assert (relays.refused, relays.late) == (5, 1)
    assert relays.counts() == {"r-relay-0": 1, "r-relay-1": 0}
    assert relays.on_two_relays() == 0
    relays.connect("a", "r-relay-1", admit("a", "r-relay-1"), now=100.0)
    assert relays.on_two_relays() == 1, "a listener both relays count is seen"


def test_beside_real_relays_only_relays_with_simulated_listeners_are_counted() -> None:
    """A real relay counts its own listeners; a 0 here for one whose own count Prometheus
    has not scraped yet would make the edge take it for empty (the sources add up)."""
    relays = Relays("ns/r", KEY)
    relays.only_placed = True
    relays.set_ready({"r-relay-0", "r-relay-1"})
    assert relays.counts() == {}
    assert relays.connect("a", "r-relay-0", admit("a", "r-relay-0"), now=100.0)
    relays.disconnect("a", "r-relay-0")
    assert relays.counts() == {"r-relay-0": 0}, "a series it began stays, at 0"
    relays.set_ready({"r-relay-1"})
    relays.set_ready({"r-relay-0", "r-relay-1"})  # a new pod of that name: not counted here
    assert relays.counts() == {}


def test_a_relay_that_is_gone_sends_its_listeners_back_to_join_again() -> None:
    relays = Relays("ns/r", KEY)
    relays.set_ready({"r-relay-0"})
    record = io.StringIO()
    audience = Audience("ns", "r", ["http://127.0.0.1:1"], relays, record=record)
    due = audience.step(2, now=10.0)
    assert [listener.id for listener in due] == ["listener-0", "listener-1"]
    first = audience.listeners[0]
    assert relays.connect(first.id, "r-relay-0", admit(first.id, "r-relay-0"), now=10.0)
    first.state, first.pod, first.due = "connected", "r-relay-0", 99.0
    audience.relays_changed(set(), now=11.0)
    assert (first.state, first.pod, first.due) == ("idle", None, 11.0)
    assert relays.counts() == {}
    # the relay's count at its end, in the record: who it still held when it went
    dropped = [json.loads(line) for line in record.getvalue().splitlines()]
    assert dropped == [
        {"event": "dropped", "listener": "listener-0", "pod": "r-relay-0", "at": 11.0}
    ]


def test_a_relay_replaced_between_two_looks_drops_its_listeners_all_the_same() -> None:
    relays = Relays("ns/r", KEY)
    identities = RelayIdentities()
    audience = Audience("ns", "r", ["http://127.0.0.1:1"], relays)
    audience.relays_changed(identities.ready({"r-relay-0": "old"}), now=10.0)
    audience.step(1, now=10.0)
    first = audience.listeners[0]
    assert relays.connect(first.id, "r-relay-0", admit(first.id, "r-relay-0"), now=10.0)
    first.state, first.pod = "connected", "r-relay-0"
    # the pod went and came back under its name before the next look: a new relay
    audience.relays_changed(identities.ready({"r-relay-0": "new"}), now=11.0)
    assert first.state == "idle"
    audience.relays_changed(identities.ready({"r-relay-0": "new"}), now=12.0)
    assert relays.counts() == {"r-relay-0": 0}


def test_the_last_to_join_leave_first_and_free_their_seat() -> None:
    relays = Relays("ns/r")
    relays.set_ready({"r-relay-0"})
    audience = Audience("ns", "r", ["http://127.0.0.1:1"], relays)
    audience.step(3, now=0.0)
    for listener in audience.listeners:
        relays.connect(listener.id, "r-relay-0", "", now=0.0)
        listener.state, listener.pod = "connected", "r-relay-0"
    audience.step(1, now=1.0)
    assert [listener.id for listener in audience.listeners] == ["listener-0"]
    assert relays.counts() == {"r-relay-0": 1}


def test_listeners_keep_to_their_edge_replica_and_fail_over_when_it_is_down() -> None:
    audience = Audience("ns", "r", ["http://a", "http://b", "http://c"], Relays("ns/r"))
    audience.step(5, now=0.0)
    listener = audience.listeners[4]
    assert audience.edge_for(listener, now=0.0) == (1, "http://b")
    audience.down_until[1] = 10.0
    assert audience.edge_for(listener, now=5.0) == (2, "http://c")
    assert audience.edge_for(listener, now=11.0) == (1, "http://b")


class NeverAdmits:
    """A joiner with no relay to offer: real listeners keep asking, nobody connects. Built
    in the real listeners' own process from the session there (hence a class: picklable)."""

    def __init__(self, session: object = None) -> None:
        self.session = session

    async def join(self, listener: str) -> Admission:
        raise NoRelayYetError("queued", 0.05)

    async def relocate(self, listener: str, current: Admission) -> Admission | None:
        return None


def test_real_relays_are_told_by_a_loopback_pod_ip_and_an_origin() -> None:
    def pod(ip: str, origin: str | None, args: tuple[str, ...] = ("relay",)) -> dict[str, Any]:
        annotations = {"townsquare.dev/origin": origin} if origin else {}
        return {"metadata": {"annotations": annotations}, "status": {"podIP": ip},
                "spec": {"containers": [{"name": "relay", "args": list(args)}]}}  # fmt: skip

    assert runs_real_relays([pod("10.0.0.4", "127.0.0.1:7000"), pod("127.1.0.5", "127.0.0.1:1")])
    assert not runs_real_relays([pod("127.1.0.5", None)]), "no origin: the runner starts none"
    assert not runs_real_relays([pod("127.1.0.5", "10.0.0.9:1")]), "the runner refuses it"
    assert not runs_real_relays([pod("127.1.0.5", "127.0.0.1:1", ())]), "the image's own command"
    assert not runs_real_relays([pod("10.0.0.4", "127.0.0.1:7000")])
    assert not runs_real_relays([])


def test_the_first_listeners_up_to_the_cap_are_real_and_the_rest_simulated() -> None:
    async def scenario() -> None:
        real = RealListeners(NeverAdmits, cap=3)
        audience = Audience("ns", "r", ["http://127.0.0.1:1"], Relays("ns/r"), real=real)
        assert len(audience.step(2, now=0.0)) == 2, "real relays not seen yet: all simulated"
        real.enabled = True
        due = audience.step(7, now=0.0)
        assert {lst.index for lst in due} == {0, 1, 5, 6}, "only simulated ones act here"
        assert audience.split() == {"real": 3, "simulated": 4}
        assert audience.summary()["idle"] == 7
        audience.step(4, now=0.0)
        assert audience.split() == {"real": 2, "simulated": 2}, "the last to join left first"
        await real.close()
        assert not real.held
        report = audience.report()
        assert report["audience"] == {"real": 2, "simulated": 2}
        # counted in the real listeners' own process: three were started there
        assert report["real"]["listeners"] == 3 and report["real"]["frames"] == 0
        assert report["real"]["gaps"] == [] and set(report["real"]["each"]) == {
            "listener-2", "listener-3", "listener-4"
        }  # fmt: skip

    asyncio.run(scenario())


def test_the_earliest_listeners_not_yet_connected_become_real_once_relays_are() -> None:
    async def scenario() -> None:
        real = RealListeners(NeverAdmits, cap=2)
        audience = Audience("ns", "r", ["http://127.0.0.1:1"], Relays("ns/r"), real=real)
        audience.step(4, now=0.0)
        first, second, *_ = audience.listeners
        first.state, first.pod = "connected", "r-relay-0"
        second.state, second.ticket = "waiting", "queue-ticket"
        real.enabled = True
        audience.make_real()
        assert [lst.real for lst in audience.listeners] == [False, True, True, False]
        assert audience.split() == {"real": 2, "simulated": 2}
        await real.close()

    asyncio.run(scenario())


def test_the_audience_leaves_even_while_the_last_to_join_has_a_request_out() -> None:
    relays = Relays("ns/r")
    audience = Audience("ns", "r", ["http://127.0.0.1:1"], relays)
    audience.step(3, now=0.0)
    for listener in audience.listeners:
        listener.state, listener.pod = "connected", "r-relay-0"
        relays.connect(listener.id, "r-relay-0", "", now=0.0)
    last = audience.listeners[-1]
    last.busy = True
    audience.step(0, now=1.0)
    assert audience.listeners == [] and relays.counts() == {"r-relay-0": 0}
    assert last.gone, "its request finishes on a listener that has left"


def test_a_join_the_room_turns_away_for_good_is_not_retried() -> None:
    """410: the room takes no new joins (its event is over). The listener is turned away
    and never due again, instead of asking once a second for ever."""
    asked: list[str] = []

    async def closed(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"error": "the room takes no new joins"}, status=410)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/rooms/ns/r/join", closed)
        async with TestClient(TestServer(app)) as client:
            audience = Audience("ns", "r", [str(client.make_url("")).rstrip("/")], Relays("ns/r"))
            listener = audience.step(1, now=0.0)[0]
            await audience._join(client.session, audience.edges[0], listener, 0)
            assert (listener.state, listener.due) == ("turned_away", math.inf)
            assert audience.step(1, now=1e9) == [] and len(asked) == 1
            assert audience.summary()["turned_away"] == 1

    asyncio.run(main())


def test_a_second_load_generator_for_the_room_names_its_listeners_apart() -> None:
    """Two load generators for one room (a crowd and its latecomers) must not share ids:
    the edge would take the second's listener-0 for the first's."""
    latecomers = Audience("ns", "r", ["http://127.0.0.1:1"], Relays("ns/r"), id_prefix="late-")
    assert [listener.id for listener in latecomers.step(2, now=0.0)] == ["late-0", "late-1"]
