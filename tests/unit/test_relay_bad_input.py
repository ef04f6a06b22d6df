"""Bad input to a relay is refused or dropped with a logged reason, and nobody else notices."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from relay_room import KEY, LoopbackRoom, frames_flow, tree, until

from townsquare.relay.protocol import HEADER, Kind, control
from townsquare.tickets import sign

NAMES = [f"listener-{i}" for i in range(8)]


def admit(pod: str, *, room: str = "ns/r", key: bytes = KEY, expires_in: float = 30.0,
          listener: str = "intruder") -> str:  # fmt: skip
    claims = {"listener": listener, "room": room, "pod": pod, "shard": 0, "generation": 0}
    return sign(key, "admit", claims, expires=time.time() + expires_in)


async def first_reply(address: tuple[str, int], data: bytes) -> tuple[str, dict[str, Any]]:
    """What the relay answers to `data`: ("refuse", fields) or ("closed", {})."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER.size), 5)
        except asyncio.IncompleteReadError:
            return "closed", {}
        length, code = HEADER.unpack(header)
        body = await reader.readexactly(length - 1)
        return Kind(code).name.lower(), json.loads(body)
    finally:
        writer.close()


async def connect(address: tuple[str, int], tickets: list[str]) -> list[asyncio.StreamWriter]:
    """Listeners admitted with `tickets`, each connected once the relay welcomed it."""
    writers = []
    for ticket in tickets:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(hello(ticket))
        await reader.readexactly(HEADER.size)  # the welcome
        writers.append(writer)
    return writers


def hello(ticket: str | None) -> bytes:
    return control(Kind.HELLO, {"v": 1, "role": "listener", "ticket": ticket})


CASES = [
    ("no ticket", lambda: hello(None), "no-ticket"),
    ("forged", lambda: hello(admit("r-relay-0", key=b"another-key-0123456789abcdef")),
     "bad-ticket"),
    ("expired", lambda: hello(admit("r-relay-0", expires_in=-1)), "expired"),
    ("for another relay", lambda: hello(admit("r-relay-1")), "wrong-relay"),
    ("for another room", lambda: hello(admit("r-relay-0", room="ns/other")), "wrong-room"),
    ("not a ticket", lambda: hello("garbage"), "bad-ticket"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_ticket_is_refused_with_its_reason(
    tmp_path: Path, case: str, make: Any, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        room = LoopbackRoom(tmp_path)
        try:
            await room.start(tree(2, fanout=8))
            listeners = await room.add_listeners(NAMES)
            kind, fields = await first_reply(room.relays[0].address, make())
            assert (kind, fields["reason"]) == ("refuse", reason)
            assert room.relays[0].refusals[reason] == 1
            await frames_flow(listeners, 10)
            for listener in listeners:
                assert listener.stats.lost == 0 and listener.stats.disconnects == 0
        finally:
            await room.close()

    asyncio.run(main())
    logged = capsys.readouterr()
    assert "refused" in logged.out + logged.err and reason in logged.out + logged.err


@pytest.mark.parametrize(
    ("case", "data", "reason"),
    [
        ("garbage bytes", b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", "bad-hello"),
        ("a frame instead of a hello", control(Kind.FRAME, {}), "bad-hello"),
        ("hello that is not JSON", HEADER.pack(4, Kind.HELLO) + b"{{{", "bad-hello"),
        ("a huge length", HEADER.pack(1 << 30, Kind.HELLO), "bad-hello"),
        ("silence", b"", "handshake-timeout"),
    ],
)
def test_a_garbage_handshake_is_dropped_with_its_reason(
    tmp_path: Path, case: str, data: bytes, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        room = LoopbackRoom(tmp_path)
        try:
            await room.start(tree(1, fanout=8))
            listeners = await room.add_listeners(NAMES)
            kind, _ = await first_reply(room.relays[0].address, data)
            assert kind == "closed"
            await until(lambda: room.relays[0].drops[reason] == 1, 5, f"a {reason} drop")
            await frames_flow(listeners, 10)
            assert all(lst.stats.lost == 0 for lst in listeners)
        finally:
            await room.close()

    asyncio.run(main())
    logged = capsys.readouterr()
    assert "dropped" in logged.out + logged.err and reason in logged.out + logged.err


def test_a_listener_that_never_reads_is_dropped_and_others_lose_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        # 2 kB frames every 5 ms fill a socket that nobody reads within a second or two
        room = LoopbackRoom(tmp_path, frame_interval=0.005, frame_bytes=2000)
        try:
            await room.start(tree(1, fanout=8))
            listeners = await room.add_listeners(NAMES)
            stuck = socket.create_connection(room.relays[0].address)
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stuck.sendall(hello(admit("r-relay-0", listener="never-reads")))
            await until(lambda: "never-reads" in room.relays[0].listeners, 5, "admitted")
            await until(lambda: room.relays[0].drops["not-reading"] == 1, 20, "the drop")
            assert "never-reads" not in room.relays[0].listeners
            stuck.close()
            await frames_flow(listeners, 50)
            for listener in listeners:
                assert listener.stats.lost == 0 and listener.stats.disconnects == 0
        finally:
            await room.close()

    asyncio.run(main())


def test_joins_beyond_capacity_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        room = LoopbackRoom(tmp_path, capacity=3)
        try:
            await room.start(tree(1, fanout=8, capacity=3))
            address = room.relays[0].address
            tickets = [admit("r-relay-0", listener=f"l{i}") for i in range(4)]
            writers = await connect(address, tickets[:3])
            kind, fields = await first_reply(address, hello(tickets[3]))
            assert (kind, fields["reason"]) == ("refuse", "full")
            assert len(room.relays[0].listeners) == 3
            for writer in writers:
                writer.close()
        finally:
            await room.close()

    asyncio.run(main())


def test_a_capacity_raised_in_the_live_map_reaches_a_running_relay(tmp_path: Path) -> None:
    """listenersPerRelay doubled mid-event: a relay started with the old capacity takes the
    new one from the map it reads (as the edge does), and refuses beyond it."""

    async def main() -> None:
        room = LoopbackRoom(tmp_path, capacity=2)
        try:
            await room.start(tree(1, fanout=8, capacity=2))
            address = room.relays[0].address
            tickets = [admit("r-relay-0", listener=f"l{i}") for i in range(5)]
            writers = await connect(address, tickets[:2])
            kind, fields = await first_reply(address, hello(tickets[2]))
            assert (kind, fields["reason"]) == ("refuse", "full")
            room.publish(replace(room.current_map(), capacity=4))
            await until(lambda: room.relays[0].capacity == 4, 5, "the relay to read the new map")
            writers += await connect(address, tickets[2:4])
            kind, fields = await first_reply(address, hello(tickets[4]))
            assert (kind, fields["reason"]) == ("refuse", "full")
            assert len(room.relays[0].listeners) == 4
            for writer in writers:
                writer.close()
        finally:
            await room.close()

    asyncio.run(main())
