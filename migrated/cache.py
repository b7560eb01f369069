"""The sender's LRU cache of last-sent pages (implemented in the extension).

``PageCache(capacity_bytes, page_size=4096)`` holds copies of pages keyed by
``page_key(block_index, page_number)``. Page data lives in one slab
allocated up front; zero pages are remembered by their fill byte alone.
``resize()`` keeps the most recently used pages that fit.
"""
from __future__ import annotations

from migrated._core import PageCache

__all__ = ["PageCache", "page_key", "MAX_BLOCKS", "MAX_PAGES_PER_BLOCK"]

MAX_BLOCKS = 1 << 24
MAX_PAGES_PER_BLOCK = 1 << 40


def page_key(block_index: int, page_number: int) -> int:
    """Pack a block index and a page number into a cache key."""
    if not 0 <= block_index < MAX_BLOCKS or not 0 <= page_number < MAX_PAGES_PER_BLOCK:
        raise ValueError("block index or page number out of range")
    return (block_index << 40) | page_number
