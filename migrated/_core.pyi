"""Typed interface of the extension migrated._core (built from ext/_core.pyx).

Buffers: any object with the buffer protocol, C-contiguous. Byte buffers
(format "B") hold pages and records; the page lists, hash arrays and delta
lengths are buffers of 64-bit items (array("Q") / array("q"), or a
memoryview of that format). Where the extension writes, the buffer must be
writable.
"""

import sys
from array import array
from collections.abc import Sequence
from typing import Any, Final, Self, TypeAlias

if sys.version_info >= (3, 12):
    from collections.abc import Buffer as _Buffer
else:
    import mmap

    _Buffer: TypeAlias = bytes | bytearray | memoryview | array[Any] | mmap.mmap

# -- shared constants (ext/_defs.pxi) ------------------------------------------

FLAG_ZERO: Final = 0x02
FLAG_MEM_SIZE: Final = 0x04
FLAG_PAGE: Final = 0x08
FLAG_EOS: Final = 0x10
FLAG_CONTINUE: Final = 0x20
FLAG_XBZRLE: Final = 0x40
FLAG_CONTROL: Final = 0x80
FLAG_MASK: Final = 0x1FF
ENCODING_XBZRLE: Final = 0x01

MIN_PAGE_SIZE: Final = 512
MAX_PAGE_SIZE: Final[int]  # 16384

MAX_BLOCK_ID_LENGTH: Final = 255

KEY_PAGE_BITS: Final = 40
KEY_BLOCK_LIMIT: Final = 16777216  # 1 << 24: block indexes are below this
KEY_PAGE_LIMIT: Final = 1099511627776  # 1 << 40: page numbers are below this

def check_page_size(n: int) -> None:
    """Raise ValueError unless n is a power of two from MIN_PAGE_SIZE to
    MAX_PAGE_SIZE. Any int: a peer's number may not fit a C integer."""

def page_key(block_index: int, page_number: int) -> int:
    """(block_index << KEY_PAGE_BITS) | page_number; ValueError when out of range."""

# -- codec (ext/_codec.pxi) ----------------------------------------------------

KERNELS: Final[tuple[str, str, str]]  # ("generic", "avx2", "avx512bw")

def kernel_name() -> str: ...
def available_kernels() -> tuple[str, ...]: ...
def set_kernel(name: str) -> None: ...
def encode_into(old: _Buffer, new: _Buffer, out: _Buffer) -> int:
    """Delta from old to new into out: its length, 0 when unchanged, -1 when it does not fit."""

def encode_pages(old: _Buffer, new: _Buffer, out: _Buffer, page_size: int = 4096) -> array[int]:
    """Deltas of every page, back to back in out; array("q") of their lengths."""

def decode_into(encoded: _Buffer, page: _Buffer) -> None: ...
def decode_pages(encoded: _Buffer, lengths: _Buffer, pages: _Buffer, page_size: int = 4096) -> None: ...

# -- pages (ext/_pages.pxi) ----------------------------------------------------

def page_count(length: int, page_size: int) -> int: ...
def page_hashes(block: _Buffer, page_size: int = 4096) -> array[int]: ...
def hash_marked(block: _Buffer, marks: _Buffer, hashes: _Buffer, page_size: int = 4096) -> int: ...
def scan(
    block: _Buffer, hashes: _Buffer, page_size: int = 4096, first: int = 0, end: int = -1, base: int = 0
) -> array[int]: ...
def zero_page_hash(page_size: int) -> int: ...
def page_range(start: int, stop: int) -> array[int]: ...
def merge_pages(a: _Buffer, b: _Buffer) -> array[int]: ...
def select_pages(entries: _Buffer, mask: int, any_set: bool = True) -> array[int]: ...
def cleared_pages(before: _Buffer, now: _Buffer, mask: int) -> array[int]: ...
def difference_pages(a: _Buffer, b: _Buffer) -> array[int]: ...
def region_pages(out: array[int], regions: _Buffer, count: int, base: int, page_size: int) -> array[int]: ...
def gather_iovecs(
    into: _Buffer, pages: _Buffer, zeros: _Buffer, remote_base: int, page_size: int
) -> tuple[array[int], array[int]]: ...

# -- cache (ext/_cache.pxi) ----------------------------------------------------

class PageCache:
    """LRU cache of last-sent pages keyed by page_key()."""

    @property
    def page_size(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    lookups: int
    hits: int
    misses: int
    inserts: int
    evictions: int
    def __new__(cls, capacity_bytes: int, page_size: int = 4096) -> Self: ...
    def insert(self, key: int, page: _Buffer) -> None: ...
    def insert_zero(self, key: int, fill: int = 0) -> None: ...
    def get(self, key: int) -> bytes | None: ...
    def is_zero(self, key: int) -> bool: ...
    def remove_key(self, key: int) -> None: ...
    def __contains__(self, key: int, /) -> bool: ...
    def __len__(self) -> int: ...
    def keys(self) -> list[int]: ...
    def resize(self, capacity_bytes: int) -> None: ...
    @property
    def pages(self) -> int: ...
    @property
    def zero_entries(self) -> int: ...
    def stats(self) -> dict[str, int]: ...

# -- batch encoder (ext/_encoder.pxi) ------------------------------------------

OPTION_XBZRLE: Final = 1
OPTION_LOOKUP: Final = 2
OPTION_INSERT: Final = 4

BATCH_COUNTERS: Final[tuple[str, ...]]  # the order of encode_batch's counters

def encode_capacity(npages: int, id_length: int, page_size: int) -> int: ...
def encode_batch(
    cache: PageCache,
    block_index: int,
    block_id: bytes,
    block: _Buffer,
    pages: _Buffer,
    options: int,
    hashes: _Buffer | None = None,
    into: _Buffer | None = None,
    gathered_pages: int = -1,
) -> tuple[bytearray | memoryview, tuple[int, ...]]:
    """(data, counters): a new bytearray, or a memoryview of the used part of
    into; counters ordered as BATCH_COUNTERS."""

# -- applier (ext/_applier.pxi) ------------------------------------------------

NEED_DATA: Final = 0
CONTROL: Final = 1

# (id, buffer[, fresh[, fd or None[, marks or None]]])
_BlockEntry: TypeAlias = (
    tuple[bytes, _Buffer]
    | tuple[bytes, _Buffer, bool]
    | tuple[bytes, _Buffer, bool, int | None]
    | tuple[bytes, _Buffer, bool, int | None, _Buffer | None]
)

class Applier:
    """Applies page records to writable block buffers (the receiver side)."""

    @property
    def page_size(self) -> int: ...
    @property
    def position(self) -> int: ...
    zero_pages: int
    normal_pages: int
    xbzrle_pages: int
    xbzrle_bytes: int
    allow_xbzrle: bool
    def __new__(cls, page_size: int = 4096) -> Self: ...
    def set_blocks(self, blocks: Sequence[_BlockEntry]) -> None: ...
    def clear_fresh(self) -> None: ...
    def release(self) -> None: ...
    def forget_current(self) -> None: ...
    def skip(self, nbytes: int) -> None: ...
    def apply(self, data: _Buffer) -> tuple[int, int]:
        """(consumed, NEED_DATA or CONTROL); RecordError on invalid input."""

# -- benchmark ceilings (ext/_ceilings.pxi) ------------------------------------

def ceiling_memcmp(a: _Buffer, b: _Buffer, page_size: int = 4096) -> int: ...
def ceiling_memcpy(dst: _Buffer, src: _Buffer, page_size: int = 4096) -> int: ...
