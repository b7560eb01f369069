"""The sender's LRU cache of last-sent pages (implemented in the extension).

``PageCache(capacity_bytes, page_size=4096)`` holds copies of pages keyed by
``page_key(block_index, page_number)``: the block index in the high bits,
the page number in the low ``KEY_PAGE_BITS`` (the layout is defined once, in
the extension, which builds the same keys in its batch encoder). Page data
lives in one slab allocated up front; zero pages are remembered by their
fill byte alone. ``resize()`` keeps the most recently used pages that fit.
"""

from __future__ import annotations

from migrated._core import KEY_BLOCK_LIMIT, KEY_PAGE_BITS, KEY_PAGE_LIMIT, PageCache, page_key

__all__ = ["KEY_BLOCK_LIMIT", "KEY_PAGE_BITS", "KEY_PAGE_LIMIT", "PageCache", "page_key"]
