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

import structlog

FORMATS = ("auto", "json", "console")


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
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
