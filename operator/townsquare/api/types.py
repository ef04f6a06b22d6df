"""Field types shared by the models: each carries its Python check and its CRD schema.

A type declared here validates the same way in `townsquare plan` (pydantic) and in the API
server (OpenAPI schema plus CEL), because both come from this one declaration.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_DURATION_PART = re.compile(r"([0-9]+)([hms])")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """Parse the subset of Go durations the CRD accepts (`90m`, `1h30m`, `45s`)."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"must be a duration such as 90m, 1h30m or 45s (got {text!r})")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise ValueError(f"must be longer than zero (got {text!r})")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Render a duration the way a person writes it (`1h30m`, `45s`)."""
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    text += f"{secs}s" if secs or not text else ""
    return text


def _duration_input(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)


def _rfc3339_input(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("must carry a UTC offset, such as Z or +02:00")
        return value
    if not isinstance(value, str) or not re.fullmatch(RFC3339_PATTERN, value):
        raise ValueError(
            f"must be an RFC 3339 time with an offset, such as 2026-12-01T23:00:00Z (got {value!r})"
        )
    return value


def _rfc3339_output(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration_input),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "x-kubernetes-validations": [
                {
                    "rule": "self != '' && duration(self) > duration('0s')",
                    "message": "must be a duration longer than zero, such as 90m or 1h30m",
                }
            ],
        }
    ),
]
"""A positive duration written as in Go (`90m`, `1h30m`, `45s`)."""

Timestamp = Annotated[
    datetime,
    BeforeValidator(_rfc3339_input),
    PlainSerializer(_rfc3339_output, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_PATTERN}),
]
"""An RFC 3339 instant with an explicit offset."""

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _quantity_input(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"must be a resource quantity such as 4, 500m or 8Gi (got {value!r})")
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_quantity_input),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
        }
    ),
]
"""A Kubernetes resource quantity (`4`, `500m`, `8Gi`)."""
