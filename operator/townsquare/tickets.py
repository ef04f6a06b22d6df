"""Signed tickets: how the edge vouches for a listener to a relay, and keeps a queue place.

The edge and the relays share one secret key (a Secret the chart mounts into both; the
operator never reads it). A ticket is `<payload>.<mac>`: the payload is base64url JSON, the
mac is HMAC-SHA256 of the payload under the key. Any edge replica or relay can check one
without asking anyone, which is what lets edge replicas stay stateless.

Kinds in use: `admit` (listener, room, pod, shard, generation: the relay checks these before
accepting a connection) and `queue` (listener, room, the time of its first attempt: the
place it keeps in the admission queue across retries and replicas). Pure: no I/O, and time
is a parameter.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

MIN_KEY_BYTES = 16
_encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
"""One encoder for every ticket: `json.dumps` with options builds a new one per call."""


class TicketError(ValueError):
    """A ticket that is malformed, forged, expired or of the wrong kind; says which."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    """The HMAC state after the key: copying it skips hashing the key's pads per ticket."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _mac(key: bytes, payload: str) -> str:
    mac = _keyed(key).copy()
    mac.update(payload.encode("ascii"))
    return _b64(mac.digest())


def check_key(key: bytes) -> bytes:
    """The key, if it is long enough to sign with; a short key is refused, not padded."""
    if len(key) < MIN_KEY_BYTES:
        raise TicketError(f"ticket key: {len(key)} bytes, at least {MIN_KEY_BYTES} needed")
    return key


def sign(key: bytes, kind: str, claims: Mapping[str, Any], *, expires: float) -> str:
    """A ticket of `kind` carrying `claims`, valid until `expires` (Unix seconds)."""
    body = {**claims, "kind": kind, "exp": round(expires, 3)}
    payload = _b64(_encode(body).encode("utf-8"))
    return f"{payload}.{_mac(check_key(key), payload)}"


def verify(key: bytes, ticket: str, kind: str, *, now: float) -> dict[str, Any]:
    """The claims of a genuine, unexpired ticket of `kind`; TicketError says why not."""
    claims = genuine(key, ticket, kind)
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or expires < now:
        raise TicketError("ticket: expired")
    return claims


def genuine(key: bytes, ticket: str, kind: str) -> dict[str, Any]:
    """The claims of a ticket of `kind` that `key` signed, expired or not: an admit
    ticket's expiry bounds when its listener may connect, yet it still proves, later,
    where the edge seated it."""
    if not ticket.isascii():
        raise TicketError("ticket: not of the form <payload>.<mac>")
    payload, dot, mac = ticket.partition(".")
    if not dot or not payload or not mac:
        raise TicketError("ticket: not of the form <payload>.<mac>")
    if not hmac.compare_digest(mac, _mac(check_key(key), payload)):
        raise TicketError("ticket: signature does not match (forged, or another key)")
    try:
        claims = json.loads(_unb64(payload))
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise TicketError(f"ticket: payload is not base64url JSON ({error})") from None
    if not isinstance(claims, dict):
        raise TicketError("ticket: payload is not a JSON object")
    if claims.get("kind") != kind:
        raise TicketError(f"ticket: kind {claims.get('kind')!r}, expected {kind!r}")
    return claims
