"""Turn a validation failure into the one line a person reads: the field, then the reason."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

_PLAIN_REASONS = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
}


def _path(location: tuple[int | str, ...], extra: str | None) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    if extra:
        path += extra
    return path.lstrip(".")


def _reason(error: Any) -> str:
    if error["type"] in _PLAIN_REASONS:
        return str(_PLAIN_REASONS[error["type"]])
    message = str(error["msg"]).removeprefix("Value error, ")
    message = message[:1].lower() + message[1:] if error["type"] != "rule" else message
    given = error.get("input")
    if error["type"] not in {"rule", "value_error"} and not isinstance(given, dict | list):
        message += f" (got {given!r})"
    return message


def describe(error: ValidationError) -> str:
    """The first problem as `field.path: reason`, noting how many more there are."""
    problems = error.errors()
    first = problems[0]
    field_path = (first.get("ctx") or {}).get("field_path")
    path = _path(tuple(first["loc"]), field_path)
    line = f"{path}: {_reason(first)}" if path else _reason(first)
    if len(problems) > 1:
        line += f" (and {len(problems) - 1} more)"
    return line
