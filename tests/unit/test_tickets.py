"""Tickets: what the relay accepts is exactly what the edge signed, until it expires."""

from __future__ import annotations

import pytest

from townsquare.tickets import TicketError, sign, verify

KEY = b"k" * 32


def test_a_signed_ticket_verifies_with_its_claims() -> None:
    ticket = sign(KEY, "admit", {"listener": "a", "pod": "r-relay-0"}, expires=100.0)
    claims = verify(KEY, ticket, "admit", now=99.0)
    assert (claims["listener"], claims["pod"], claims["kind"]) == ("a", "r-relay-0", "admit")


@pytest.mark.parametrize(
    ("ticket_of", "kind", "now", "reason"),
    [
        (lambda t: t, "admit", 101.0, "expired"),
        (lambda t: t, "queue", 50.0, "kind"),
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "admit", 50.0, "signature"),
        (lambda t: "x" + t, "admit", 50.0, "signature"),
        (lambda t: t.replace(".", ""), "admit", 50.0, "form"),
        (lambda t: "garbage", "admit", 50.0, "form"),
    ],
)
def test_a_bad_ticket_is_refused_with_its_reason(ticket_of, kind, now, reason) -> None:  # type: ignore[no-untyped-def]
    ticket = ticket_of(sign(KEY, "admit", {"listener": "a"}, expires=100.0))
    with pytest.raises(TicketError, match=reason):
        verify(KEY, ticket, kind, now=now)


def test_another_key_cannot_forge_a_ticket() -> None:
    ticket = sign(b"o" * 32, "admit", {"listener": "a"}, expires=100.0)
    with pytest.raises(TicketError, match="signature"):
        verify(KEY, ticket, "admit", now=1.0)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(TicketError, match="at least 16"):
        sign(b"short", "admit", {}, expires=1.0)
