"""structlog set-up, once per process.

Readable lines on a TTY, JSON lines otherwise (journald and log shippers
read them). Everything goes to stderr: stdout carries results only (the
sender's summary). Context such as the migration name and the peer is bound
with ``structlog.contextvars.bind_contextvars`` and rides on every line;
each trio task carries its own copy.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

FORMATS = ("auto", "json", "console")
MAX_TEXT = 1024  # characters of one logged string, at most (a peer's ERROR message, ...)
MAX_PEER_TEXT = 256  # what a peer names itself with (its HELLO source)
MAX_ITEMS = 32  # items of one logged list


def clip(value, limit: int = MAX_TEXT):
    """``value`` as it may be logged: a string cut to ``limit`` characters
    and a list to MAX_ITEMS items (each clipped), saying how much was cut, so
    a peer cannot fill the log with what it sends."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}… (+{len(value) - limit} characters)"
    if isinstance(value, list | tuple):
        items = [clip(v, limit) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"… (+{len(value) - MAX_ITEMS} items)")
        return items
    return value


def _clip_fields(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A processor: every field of every line is clipped (``clip``); a
    traceback (``exc_info``) is left whole."""
    return {k: v if k in ("event", "exc_info", "exception") else clip(v) for k, v in event_dict.items()}


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _clip_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
