"""The wire protocol between listeners, relays and the origin (pure: bytes in, bytes out).

Every message is `length (u32, big-endian) | type (u8) | body`, where `length` counts the
type byte and the body. Control messages carry a JSON object; frames carry a fixed header
and the audio payload. The full description is in the README ("The relay's wire protocol").

A relay forwards a frame message exactly as it received it (the same bytes object to every
downstream connection), so forwarding costs no encoding.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

HEADER = struct.Struct("!IB")
FRAME_HEADER = struct.Struct("!QQ")
"""Frame body header: sequence number, origin send time in Unix nanoseconds."""
MAX_CONTROL_BYTES = 16 * 1024
"""A control message (hello, welcome, refuse, move) is never longer than this."""
MAX_FRAME_BYTES = 64 * 1024
VERSION = 1


class Kind(IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    FRAME = 4
    MOVE = 5


class ProtocolError(ValueError):
    """Bytes that are not this protocol; says what was wrong."""


def encode(kind: Kind, body: bytes) -> bytes:
    return HEADER.pack(len(body) + 1, kind) + body


def control(kind: Kind, fields: dict[str, Any]) -> bytes:
    """A control message: `kind` with a JSON object body."""
    return encode(kind, json.dumps(fields, separators=(",", ":")).encode("utf-8"))


def frame(seq: int, sent_ns: int, payload: bytes) -> bytes:
    """A numbered audio frame, ready to write to any number of connections."""
    return encode(Kind.FRAME, FRAME_HEADER.pack(seq, sent_ns) + payload)


@dataclass(frozen=True)
class Message:
    kind: Kind
    raw: bytes
    """The whole message as received, header included: what a relay forwards."""

    @property
    def body(self) -> bytes:
        return self.raw[HEADER.size :]

    def fields(self) -> dict[str, Any]:
        """The JSON object of a control message; ProtocolError when it is not one."""
        try:
            value = json.loads(self.body)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError(f"{self.kind.name.lower()}: body is not JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.kind.name.lower()}: body is not a JSON object")
        return value

    def frame_header(self) -> tuple[int, int]:
        """(sequence number, origin send time in ns) of a frame."""
        if self.kind is not Kind.FRAME or len(self.raw) < HEADER.size + FRAME_HEADER.size:
            raise ProtocolError("frame: shorter than its header")
        seq, sent_ns = FRAME_HEADER.unpack_from(self.raw, HEADER.size)
        return int(seq), int(sent_ns)


class Decoder:
    """Splits a byte stream into messages; refuses unknown types and oversized lengths.

    `control_only` is for the first message of a connection, before anyone has proved who
    they are: then only a short control message is accepted, so garbage costs nothing.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes, *, control_only: bool = False) -> list[Message]:
        """The whole messages `data` completes; the rest waits for more bytes."""
        buffer = self._buffer
        buffer += data
        offset = 0
        messages: list[Message] = []
        while len(buffer) - offset >= HEADER.size:
            length, code = HEADER.unpack_from(buffer, offset)
            try:
                kind = Kind(code)
            except ValueError:
                raise ProtocolError(f"unknown message type {code}") from None
            limit = MAX_CONTROL_BYTES if control_only or kind is not Kind.FRAME else None
            if length < 1 or length > (limit or MAX_FRAME_BYTES):
                raise ProtocolError(f"{kind.name.lower()}: length {length} out of range")
            end = offset + 4 + length
            if len(buffer) < end:
                break
            messages.append(Message(kind, bytes(buffer[offset:end])))
            offset = end
            control_only = False
        del buffer[:offset]
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole message."""
        return len(self._buffer)
