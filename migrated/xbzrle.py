"""XBZRLE page deltas (docs/format.md): encode the change between two
copies of a page, and apply it on the receiver.

All functions take any buffer (bytes, bytearray, memoryview, mmap) and run
their loops in the extension with the GIL released.
"""

from __future__ import annotations

from array import array

from migrated import _core
from migrated.errors import DecodeError

__all__ = [
    "DecodeError",
    "MAX_PAGE_SIZE",
    "decode",
    "decode_into",
    "decode_pages",
    "encode",
    "encode_into",
    "encode_pages",
    "kernel_name",
    "available_kernels",
    "set_kernel",
]

MAX_PAGE_SIZE = _core.MAX_PAGE_SIZE
kernel_name = _core.kernel_name
available_kernels = _core.available_kernels
set_kernel = _core.set_kernel


def encode_into(old, new, out) -> int:
    """Write the delta from ``old`` to ``new`` into ``out``.

    Returns its length (0: unchanged) or -1 when it would not fit in
    ``len(out)`` bytes (overflow: send the page raw).
    """
    return _core.encode_into(old, new, out)


def encode(old, new, limit: int | None = None) -> bytes | None:
    """The delta from ``old`` to ``new`` as bytes, or None on overflow.

    ``limit`` (default: the page size) bounds the encoded length.
    """
    size = len(memoryview(new).cast("B"))
    out = bytearray(size if limit is None else limit)
    n = _core.encode_into(old, new, out)
    return None if n < 0 else bytes(out[:n])


def encode_pages(old, new, out, page_size: int = 4096) -> array:
    """Encode N pages at once: ``old`` and ``new`` hold N pages each.

    The encodings are written back to back into ``out`` (each limited to one
    page); returns an ``array('q')`` of N lengths, -1 for an overflow (which
    takes no space in ``out``).
    """
    return _core.encode_pages(old, new, out, page_size)


def decode_into(encoded, page) -> None:
    """Apply a delta to ``page`` in place.

    Raises DecodeError (naming the offset in the delta) on any invalid input,
    and then leaves ``page`` unchanged.
    """
    _core.decode_into(encoded, page)


def decode(encoded, old) -> bytes:
    """Convenience: the page that results from applying ``encoded`` to ``old``."""
    page = bytearray(old)
    _core.decode_into(encoded, page)
    return bytes(page)


def decode_pages(encoded, lengths, pages, page_size: int = 4096) -> None:
    """Apply deltas laid out as ``encode_pages`` writes them to ``pages``."""
    _core.decode_pages(encoded, lengths, pages, page_size)
