"""A readable pure-Python XBZRLE codec: the test oracle for the extension.

It follows docs/format.md literally: canonical encoding (no folding) and a
decoder that validates every rule before touching the page.
"""

from __future__ import annotations

import operator
import re

from migrated.errors import DecodeError


def uleb(value: int) -> bytes:
    assert 0 <= value < 16384
    return bytes([value]) if value < 128 else bytes([(value & 0x7F) | 0x80, value >> 7])


def canonical_encode(old: bytes, new: bytes) -> bytes:
    """The straightforward encoding: every zero run becomes its own pair."""
    xor = bytes(map(operator.xor, old, new))
    out = bytearray()
    pos = 0
    for run in re.finditer(rb"[^\x00]+", xor):
        start, end = run.span()
        out += uleb(start - pos) + uleb(end - start) + new[start:end]
        pos = end
    return bytes(out)


def decode(encoded: bytes, old: bytes) -> bytes:
    """Apply encoded to old; DecodeError on any rule of the format."""
    page = bytearray(old)
    n = len(page)
    i = d = 0
    first = True

    def length(at: int) -> tuple[int, int]:
        if at >= len(encoded):
            raise DecodeError("length runs past the end of the input", at)
        b0 = encoded[at]
        if b0 < 0x80:
            return b0, at + 1
        if at + 1 >= len(encoded):
            raise DecodeError("length runs past the end of the input", at)
        b1 = encoded[at + 1]
        if b1 & 0x80:
            raise DecodeError("length is longer than 2 bytes", at)
        return (b0 & 0x7F) | (b1 << 7), at + 2

    while i < len(encoded):
        zrun, j = length(i)
        if zrun == 0 and not first:
            raise DecodeError("zero run of length 0 after the first pair", i)
        first = False
        if d + zrun > n:
            raise DecodeError("run goes past the end of the page", i)
        d += zrun
        if j >= len(encoded):
            raise DecodeError("input ends between a zero run and its non-zero run", j)
        nz, k = length(j)
        if nz == 0:
            raise DecodeError("non-zero run of length 0", j)
        if d + nz > n:
            raise DecodeError("run goes past the end of the page", j)
        if k + nz > len(encoded):
            raise DecodeError("non-zero run bytes run past the end of the input", k)
        page[d : d + nz] = encoded[k : k + nz]
        d += nz
        i = k + nz
    return bytes(page)
