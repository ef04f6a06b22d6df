"""A relay's connection to its upstream (the origin or a parent relay), and feed tickets.

Relays prove to their upstream that they belong to the room with a `feed` ticket signed
with the same key as the edge's `admit` tickets: any relay can mint one, nobody outside the
room's key holders can.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog

from townsquare.relay.protocol import Decoder, Kind, Message, ProtocolError, control
from townsquare.tickets import sign

log = structlog.get_logger("townsquare.relay")

ORIGIN = "origin"
FEED_TICKET_SECONDS = 300.0


def feed_ticket(key: bytes, room: str, upstream: str, downstream: str, now: float) -> str:
    """What a relay shows its upstream: room, the upstream it is for, and who asks."""
    claims = {"room": room, "pod": upstream, "downstream": downstream}
    return sign(key, "feed", claims, expires=now + FEED_TICKET_SECONDS)


@dataclass(frozen=True)
class Target:
    name: str
    """`origin` or the parent relay's pod name."""
    host: str
    port: int


class UpstreamLink(asyncio.Protocol):
    """Frames in from one upstream; every frame goes to `on_frame` as received."""

    def __init__(self, target: Target, on_frame: Callable[[Message], None]) -> None:
        self.target = target
        self.on_frame = on_frame
        self.decoder = Decoder()
        self.transport: asyncio.Transport | None = None
        self.welcomed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.lost = asyncio.Event()
        self.reason = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ProtocolError as error:
            self.close(f"upstream broke the protocol: {error}")
            return
        for message in messages:
            if message.kind is Kind.FRAME:
                self.on_frame(message)
            elif message.kind is Kind.WELCOME:
                if not self.welcomed.done():
                    self.welcomed.set_result(message.fields())
            elif message.kind in (Kind.REFUSE, Kind.MOVE):
                detail = message.fields()
                self.close(f"upstream {message.kind.name.lower()}: {detail.get('reason')}")

    def close(self, reason: str) -> None:
        self.reason = self.reason or reason
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.reason = self.reason or (f"connection lost: {exc}" if exc else "connection closed")
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError(self.reason))
        self.lost.set()

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()


async def attach(
    target: Target,
    ticket: str,
    resume_from: int | None,
    on_frame: Callable[[Message], None],
    *,
    fallback: bool = False,
    timeout: float = 2.0,
) -> UpstreamLink:
    """Connect, say hello, and wait for the welcome; ConnectionError says why it failed."""
    loop = asyncio.get_running_loop()
    try:
        _, link = await asyncio.wait_for(
            loop.create_connection(
                lambda: UpstreamLink(target, on_frame), target.host, target.port
            ),
            timeout,
        )
    except (OSError, TimeoutError) as error:
        raise ConnectionError(f"{target.name} at {target.host}:{target.port}: {error}") from None
    assert link.transport is not None
    hello = {"v": 1, "role": "relay", "ticket": ticket, "from": resume_from, "fallback": fallback}
    link.transport.write(control(Kind.HELLO, hello))
    try:
        await asyncio.wait_for(asyncio.shield(link.welcomed), timeout)
    except (ConnectionError, TimeoutError) as error:
        link.close("no welcome")
        raise ConnectionError(f"{target.name}: {error or 'no welcome in time'}") from None
    return link
