"""Pages: lists of page numbers, page hashes, and the image digest.

A page list is an ascending ``array('Q')`` of page numbers, which every batch
function of the extension takes. A page hash is the 64-bit hash of one page
(the last page of a block zero-padded), specified byte for byte in
docs/format.md; the sender keeps one per page as last sent, the receiver one
per page as held. The image digest hashes those, block by block, so both
ends can agree on an image without sending it twice.

The loops run in the extension with the GIL released; this module names
them and holds the digest, which loops over blocks, not pages.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable

from migrated import _core

__all__ = [
    "cleared_pages",
    "difference_pages",
    "hash_marked",
    "image_digest",
    "merge_pages",
    "page_count",
    "page_hashes",
    "page_numbers",
    "page_range",
    "scan",
    "select_pages",
    "zero_page_hash",
]

# -- page lists -----------------------------------------------------------------

page_range = _core.page_range  # (start, stop) -> the pages start..stop-1
merge_pages = _core.merge_pages  # union of two page lists
difference_pages = _core.difference_pages  # the pages of one list not in another
select_pages = _core.select_pages  # indexes of 64-bit entries with (or without) mask bits
cleared_pages = _core.cleared_pages  # indexes whose mask bits were set before and are clear now
page_count = _core.page_count  # (length, page size) -> pages, the last one partial


def page_numbers(numbers: Iterable[int]) -> array:
    """A page list from any iterable of page numbers."""
    return array("Q", numbers)


# -- page hashes ------------------------------------------------------------------

page_hashes = _core.page_hashes  # the hash of every page of a buffer
hash_marked = _core.hash_marked  # re-hash the pages whose mark is set, clearing it
scan = _core.scan  # the pages whose hash changed, updating the hashes
zero_page_hash = _core.zero_page_hash  # the hash of a page of zeros

# -- the image digest ---------------------------------------------------------------

_DIGEST_BLOCK = struct.Struct("<HQ")


def image_digest(blocks: Iterable[tuple[str | bytes, int, array]]) -> str:
    """Digest of an image from its per-page hashes (docs/format.md).

    ``blocks`` yields ``(id, length, hashes)`` in block-list order, where
    ``hashes`` is the ``array('Q')`` of page hashes (as ``page_hashes`` and
    ``encode_batch`` keep them). The sender computes it from the hashes of
    the pages as sent, the receiver from the pages it holds; the hashes are
    taken little-endian so both hosts agree whatever their byte order.
    """
    h = hashlib.blake2b(digest_size=32)
    for block_id, length, hashes in blocks:
        bid = block_id.encode() if isinstance(block_id, str) else block_id
        h.update(_DIGEST_BLOCK.pack(len(bid), length))
        h.update(bid)
        if sys.byteorder == "big":
            hashes = array("Q", hashes)
            hashes.byteswap()
        h.update(memoryview(hashes).cast("B"))
    return h.hexdigest()
