"""What the origin and every relay share: accepting downstream connections and fanning frames
out to them.

A `Hub` keeps the last frames in a ring (so a listener that moved, or a relay that
re-attached, resumes where it left off instead of losing audio), writes each new frame to
every downstream connection, and drops a connection that stops reading before it can hold
memory hostage. Who may connect is the subclass's decision (`admit`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from townsquare.relay.protocol import Decoder, Kind, ProtocolError, control

log = structlog.get_logger("townsquare.relay")


@dataclass(frozen=True)
class HubSettings:
    """Limits every downstream connection lives by."""

    handshake_timeout: float = 5.0
    """Seconds a new connection has to send its hello."""
    stall_timeout: float = 2.0
    """Seconds a connection may refuse to read (its buffers full) before it is dropped."""
    max_buffered_bytes: int = 256 * 1024
    """Bytes waiting for one connection beyond which it is dropped at once."""
    buffer_frames: int = 100
    """Frames kept for resuming (100 x 20 ms = 2 s)."""
    send_buffer_bytes: int = 32 * 1024
    """SO_SNDBUF of downstream sockets: small, so a client that never reads shows quickly."""
    departures_kept: int = 20_000
    """Listeners that left, kept with when they came and went (`/listeners`), newest last."""


@dataclass(frozen=True)
class Departure:
    """A listener that left this hub: who, and when (wall-clock seconds) it came and went."""

    listener: str
    attached_at: float
    left_at: float
    generation: int = 0
    """The map generation of the admit ticket it was welcomed with."""


@dataclass(frozen=True)
class Admitted:
    """An accepted hello: who it is, and what the welcome says."""

    role: str
    """`listener` or `relay`."""
    name: str
    shard: int | None = None
    generation: int = 0
    fallback: bool = False
    """A relay fed here only until its own parent answers again."""
    welcome: dict[str, Any] = field(default_factory=dict)


class RefusedError(Exception):
    """A hello the hub will not accept: `reason` is a short code, `detail` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Downstream(asyncio.Protocol):
    """One connection from a listener or a downstream relay."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.decoder = Decoder()
        self.admitted: Admitted | None = None
        self.paused_at: float | None = None
        self.attached_at = 0.0
        """Wall-clock seconds when the hub welcomed it (0 until then)."""
        self.closing = False
        self._handshake: asyncio.TimerHandle | None = None
        self._ignored = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, self.hub.settings.send_buffer_bytes
            )
        self.transport.set_write_buffer_limits(high=self.hub.settings.max_buffered_bytes // 4)
        loop = asyncio.get_running_loop()
        self._handshake = loop.call_later(
            self.hub.settings.handshake_timeout, self.drop, "handshake-timeout",
            "no hello within the handshake timeout",
        )  # fmt: skip

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.admitted is not None:
            # Listeners have nothing to say after the hello; a flood is dropped.
            self._ignored += len(data)
            if self._ignored > 64 * 1024:
                self.drop("unexpected-data", "kept sending after the hello")
            return
        try:
            messages = self.decoder.feed(data, control_only=True)
            if not messages:
                if self.decoder.pending > 4096:
                    raise ProtocolError("hello: too long")
                return
            hello = messages[0]
            if hello.kind is not Kind.HELLO:
                raise ProtocolError(f"expected hello, got {hello.kind.name.lower()}")
            fields = hello.fields()
        except ProtocolError as error:
            self.drop("bad-hello", str(error))
            return
        if self._handshake:
            self._handshake.cancel()
        try:
            admitted = self.hub.admit(fields)
        except RefusedError as refusal:
            self.refuse(refusal)
            return
        self.admitted = admitted
        self.hub.attach(self, fields.get("from"))

    def refuse(self, refusal: RefusedError) -> None:
        self.hub.refusals[refusal.reason] += 1
        log.info("refused", peer=self.peer, reason=refusal.reason, detail=refusal.detail)
        self._close_with(control(Kind.REFUSE, {"reason": refusal.reason, "detail": refusal.detail}))

    def notify_move(self, reason: str, grace: float) -> None:
        """Tell this connection to ask the edge where to go; frames keep coming for `grace`
        seconds, so a listener that finds its new relay in time hears no gap."""
        if self.closing or self.transport is None:
            return
        self.hub.moves[reason] += 1
        self.transport.write(control(Kind.MOVE, {"reason": reason, "grace": grace}))

    def move(self, reason: str) -> None:
        """Tell this connection to ask the edge (or the map) again, and close now."""
        if self.closing:
            return
        self.hub.moves[reason] += 1
        self._close_with(control(Kind.MOVE, {"reason": reason, "grace": 0}))

    def drop(self, reason: str, detail: str) -> None:
        """Close without a goodbye: the peer broke the protocol or stopped reading."""
        if self.closing:
            return
        self.hub.drops[reason] += 1
        log.warning("dropped", peer=self.peer, reason=reason, detail=detail,
                    who=self.admitted.name if self.admitted else None)  # fmt: skip
        self.closing = True
        self.hub.detach(self)
        if self.transport:
            self.transport.abort()

    def _close_with(self, message: bytes) -> None:
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.hub.detach(self)
        self.transport.write(message)
        self.transport.close()

    def pause_writing(self) -> None:
        self.paused_at = time.monotonic()

    def resume_writing(self) -> None:
        self.paused_at = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake:
            self._handshake.cancel()
        self.closing = True
        self.hub.detach(self)


class Hub:
    """Downstream connections of one origin or relay, and the frames fanned out to them."""

    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self.listeners: dict[str, Downstream] = {}
        self.relays: set[Downstream] = set()
        self._targets: list[Downstream] = []
        self._targets_stale = False
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=settings.buffer_frames)
        self.last_seq = -1
        self.egress_packets = 0
        self.frames_in = 0
        self.refusals: Counter[str] = Counter()
        self.moves: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.departures: deque[Departure] = deque(maxlen=settings.departures_kept)
        """The listeners that left lately: with `listeners`, who this hub held and when, so
        that others can check from the relays themselves that no listener is held twice."""
        self.server: asyncio.Server | None = None

    def admit(self, hello: dict[str, Any]) -> Admitted:
        raise NotImplementedError

    async def serve(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Downstream(self), host, port, reuse_address=True, backlog=1024
        )

    @property
    def address(self) -> tuple[str, int]:
        """Where the hub listens (the real port when it was asked for port 0)."""
        assert self.server is not None and self.server.sockets
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def attach(self, connection: Downstream, resume_from: object) -> None:
        """Welcome an admitted connection and replay what it missed, if still kept."""
        admitted = connection.admitted
        assert admitted is not None and connection.transport is not None
        if admitted.role == "listener":
            previous = self.listeners.get(admitted.name)
            if previous is not None and previous is not connection:
                previous.move("replaced")
            connection.attached_at = time.time()
            self.listeners[admitted.name] = connection
        else:
            self.relays.add(connection)
        self._targets_stale = True
        connection.transport.write(
            control(Kind.WELCOME, {**admitted.welcome, "next": self.last_seq + 1})
        )
        if isinstance(resume_from, int) and not isinstance(resume_from, bool):
            for seq, raw in self.recent:
                if seq >= resume_from:
                    connection.transport.write(raw)
                    self.egress_packets += 1

    def detach(self, connection: Downstream) -> None:
        admitted = connection.admitted
        if admitted is None:
            return
        if admitted.role == "listener":
            if self.listeners.get(admitted.name) is connection:
                del self.listeners[admitted.name]
                self.departures.append(
                    Departure(
                        admitted.name, connection.attached_at, time.time(), admitted.generation
                    )
                )
        else:
            self.relays.discard(connection)
        self._targets_stale = True

    def holdings(self, since: float) -> dict[str, object]:
        """Who this hub holds now (listener -> when it was welcomed) and who left at or
        after `since` ([listener, welcomed, left]), in wall-clock seconds, as of `at`; and
        for each of them the map generation of the ticket it was welcomed with
        ([listener, welcomed, generation])."""
        left: list[list[object]] = []
        placed: list[list[object]] = []
        for departure in reversed(self.departures):
            if departure.left_at < since:
                break
            left.append([departure.listener, departure.attached_at, departure.left_at])
            placed.append([departure.listener, departure.attached_at, departure.generation])
        held: dict[str, float] = {}
        for name, connection in self.listeners.items():
            held[name] = connection.attached_at
            generation = connection.admitted.generation if connection.admitted else 0
            placed.append([name, connection.attached_at, generation])
        return {"at": time.time(), "listeners": held, "left": left[::-1], "generations": placed}

    def publish(self, seq: int, raw: bytes) -> None:
        """Fan one frame out to every downstream connection, once; dropping stalled ones."""
        if seq <= self.last_seq:
            return  # already sent (two upstreams overlap while re-attaching)
        self.last_seq = seq
        self.frames_in += 1
        self.recent.append((seq, raw))
        if self._targets_stale:
            self._targets = [*self.relays, *self.listeners.values()]
            self._targets_stale = False
        now = 0.0
        limit = self.settings.max_buffered_bytes
        sent = 0
        for connection in self._targets:
            transport = connection.transport
            if connection.closing or transport is None:
                continue
            if connection.paused_at is not None:
                now = now or time.monotonic()
                if now - connection.paused_at > self.settings.stall_timeout:
                    connection.drop("not-reading", "stopped reading frames")
                    continue
                if transport.get_write_buffer_size() > limit:
                    connection.drop("not-reading", "too many frames waiting")
                    continue
            transport.write(raw)
            sent += 1
        self.egress_packets += sent

    def close_all(self, reason: str) -> None:
        for connection in [*self.listeners.values(), *self.relays]:
            connection.move(reason)
