"""The page hash (docs/format.md, "Page hash"), frozen by golden vectors and checked
against a pure-Python implementation of the specification.

The hash is on the wire (the image digest) and in the receiver's kept
hashes, so a change to it must break these tests on purpose.
"""

import random

import pytest

import migrated._core

M64 = 0xFFFF_FFFF_FFFF_FFFF
P1 = 0x9E3779B185EBCA87
P2 = 0xC2B2AE3D27D4EB4F
P3 = 0x165667B19E3779F9
P4 = 0x85EBCA77C2B2AE63

GOLDEN = [
    ("zero-4096", bytes(4096), 0xAC869B6F32D8BBDB),
    ("mod251-4096", bytes(i % 251 for i in range(4096)), 0x122A8C8D994AD3EC),
    ("ff-512", b"\xff" * 512, 0x81A7E47B830ADA04),
]


def rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def lane(acc: int, word: int) -> int:
    acc = (acc + word * P2) & M64
    return (rotl(acc, 31) * P1) & M64


def page_hash(page: bytes) -> int:
    """The page hash of one page (a multiple of 32 bytes), as specified."""
    n = len(page)
    assert n % 32 == 0
    acc = [(P1 + P2) & M64, P2, 0, (0 - P1) & M64]
    for i in range(0, n, 32):
        for k in range(4):
            word = int.from_bytes(page[i + 8 * k : i + 8 * k + 8], "little")
            acc[k] = lane(acc[k], word)
    h = (rotl(acc[0], 1) + rotl(acc[1], 7) + rotl(acc[2], 12) + rotl(acc[3], 18)) & M64
    for a in acc:
        h = ((h ^ lane(0, a)) * P1 + P4) & M64
    h = (h + n) & M64
    h ^= h >> 33
    h = (h * P2) & M64
    h ^= h >> 29
    h = (h * P3) & M64
    h ^= h >> 32
    return h


def block_hashes(block: bytes, page_size: int) -> list[int]:
    """Hash of every page of block, the last partial page zero-padded."""
    out = []
    for start in range(0, len(block), page_size):
        page = block[start : start + page_size]
        out.append(page_hash(page + bytes(page_size - len(page))))
    return out


@pytest.mark.parametrize(("name", "page", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_vectors(name, page, expected):
    assert list(migrated._core.page_hashes(page, len(page))) == [expected]


@pytest.mark.parametrize(("name", "page", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_reference_gives_the_golden_vectors(name, page, expected):
    assert page_hash(page) == expected


def test_zero_page_hash_is_the_golden_vector():
    assert migrated._core.zero_page_hash(4096) == GOLDEN[0][2]


@pytest.mark.parametrize("page_size", [512, 4096, 16384])
def test_extension_matches_reference_on_random_pages(page_size):
    rng = random.Random(page_size)
    block = rng.randbytes(50 * page_size)
    assert list(migrated._core.page_hashes(block, page_size)) == block_hashes(block, page_size)


@pytest.mark.parametrize("tail", [1, 31, 100, 4095])
def test_partial_last_page_is_hashed_zero_padded(tail):
    rng = random.Random(tail)
    block = rng.randbytes(4096 + tail)
    hashes = list(migrated._core.page_hashes(block, 4096))
    assert hashes == block_hashes(block, 4096)
    assert hashes[1] == page_hash(block[4096:] + bytes(4096 - tail))
