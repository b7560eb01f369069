"""Sizes, rates and durations as operators type them on the command line.

SIZE and RATE take an optional binary suffix K, M, G or T (``64M`` is
64 MiB; a RATE is bytes per second); DURATION takes ``ms`` or ``s``
(``300ms``, ``1.5s``; a bare number is seconds). Addresses are
``HOST:PORT`` (``[v6]:PORT`` for IPv6).
"""

from __future__ import annotations

import argparse
import re
from typing import overload

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864. Raises ValueError with a message an operator can act on."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size: use a number with an optional K, M, G or T suffix, like 64M")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


def parse_duration(text: str) -> float:
    """``"300ms"`` -> 0.3 (seconds)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration: use a number with ms or s, like 300ms")
    value = float(m.group(1))
    return value / 1000 if (m.group(2) or "s").lower() == "ms" else value


def parse_fraction(text: str, most: float = 0.99) -> float:
    """``"0.5"`` or ``"50%"`` -> 0.5, from 0 to ``most``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a fraction: use a number like 0.5 or a percentage like 50%") from None
    if not 0 <= value <= most:
        raise ValueError(f"{text!r} is out of range: 0 to {most:g} ({most:.0%})")
    return value


def parse_address(text: str, default_host: str | None = None) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise ValueError(f"{text!r} is not HOST:PORT")
        host, port = default_host, text
    host = host.strip("[]") or default_host or ""
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return host, int(port)


@overload
def ms(seconds: float) -> float: ...
@overload
def ms(seconds: None) -> None: ...
def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds to 0.1 ms, the unit of every ``*_ms`` field (None stays None)."""
    return round(seconds * 1000, 1) if seconds is not None else None


def format_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _argtype(parse, what):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what  # argparse names the type in its error message
    return convert


size_arg = _argtype(parse_size, "size")
duration_arg = _argtype(parse_duration, "duration")
fraction_arg = _argtype(parse_fraction, "fraction")
