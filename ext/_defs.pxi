# Shared declarations of migrated._core: cimports, the C headers, buffer
# types, the SIGBUS guard check, the page-size check, and every constant more
# than one part uses (record flags, page sizes, block ids, cache key layout),
# each defined once here and visible from Python as a module attribute.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset, memcmp
from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.array cimport array, clone, resize
from cpython.number cimport PyNumber_Index
from libc.errno cimport errno, EINTR
from posix.uio cimport iovec, pwritev

import os

from migrated.errors import DecodeError, RecordError, SourceFault


cdef extern from "fault_guard.h" nogil:
    ctypedef struct xb_guard_t:
        uint64_t faults
        size_t first
    int xb_guard_install()
    void xb_guard_arm(xb_guard_t *g, const uint8_t *p, size_t n)
    void xb_guard_disarm()

if xb_guard_install() != 0:
    raise ImportError(f"cannot install the SIGBUS handler: {os.strerror(errno)}")


cdef inline int _check_guard(xb_guard_t *g, const uint8_t *base, Py_ssize_t length) except -1:
    """Raise SourceFault when a guarded loop over base[0..length) faulted."""
    if g.faults:
        raise SourceFault(
            f"the source shrank while it was being read: byte {<size_t>g.first - <size_t>base} of a "
            f"{length}-byte block is gone ({g.faults} page(s) faulted; was a source file truncated?)"
        )
    return 0


cdef extern from "page_marks.h" nogil:
    void xb_mark(uint8_t *mark)
    int xb_marked(const uint8_t *mark)
    int xb_take(uint8_t *mark)


cdef extern from "xbzrle_kernel.h" nogil:
    enum: XB_MAX_PAGE     # a compile-time constant: sizes the scratch pages
    int XB_MAX_RUN
    int XB_ERR_LEN_TRUNCATED, XB_ERR_LEN_TOO_LONG, XB_ERR_ZERO_ZRUN
    int XB_ERR_ZERO_NZRUN, XB_ERR_PAST_PAGE, XB_ERR_DATA_TRUNCATED
    int XB_ERR_MISSING_NZRUN
    int xb_kernel_id
    int xb_kernel_supported(int id)
    int xb_set_kernel(int id)
    int xb_best_kernel()
    ptrdiff_t xb_encode(const uint8_t *old, const uint8_t *new_, size_t n,
                        uint8_t *out, size_t limit)
    int xb_decode_check(const uint8_t *src, size_t slen, size_t n, size_t *err_at)
    void xb_decode_apply(const uint8_t *src, size_t slen, uint8_t *page)
    uint64_t xb_page_hash(const uint8_t *p, size_t n)
    int xb_is_uniform(const uint8_t *p, size_t n)
    int xb_is_zero(const uint8_t *p, size_t n)

ctypedef const uint8_t[::1] cbuf
ctypedef uint8_t[::1] wbuf


# ---------------------------------------------------------------------------
# Shared constants (anonymous cpdef enums: C constants in the kernels, ints
# as module attributes for Python)
# ---------------------------------------------------------------------------

# record header flags (the low 9 bits of the 8-byte big-endian header)
cpdef enum:
    FLAG_ZERO = 0x02
    FLAG_MEM_SIZE = 0x04
    FLAG_PAGE = 0x08
    FLAG_EOS = 0x10
    FLAG_CONTINUE = 0x20
    FLAG_XBZRLE = 0x40
    FLAG_CONTROL = 0x80
    FLAG_MASK = 0x1FF
    ENCODING_XBZRLE = 0x01   # the encoding byte of an XBZRLE record

# page sizes: a power of two from MIN_PAGE_SIZE to MAX_PAGE_SIZE
cpdef enum:
    MIN_PAGE_SIZE = 512

MAX_PAGE_SIZE = XB_MAX_PAGE

# block ids are 1 to MAX_BLOCK_ID_LENGTH bytes (their length is one byte)
cpdef enum:
    MAX_BLOCK_ID_LENGTH = 255

# cache keys: (block index << KEY_PAGE_BITS) | page number
cpdef enum:
    KEY_PAGE_BITS = 40
    KEY_BLOCK_LIMIT = 1 << 24   # block indexes are below this

KEY_PAGE_LIMIT = (<uint64_t>1) << KEY_PAGE_BITS   # page numbers are below this


cdef inline int _check_page_size(Py_ssize_t n) except -1:
    if n < MIN_PAGE_SIZE or n > XB_MAX_PAGE or (n & (n - 1)) != 0:
        raise ValueError(f"page size must be a power of two from {MIN_PAGE_SIZE} to {XB_MAX_PAGE}, got {n}")
    return 0


def check_page_size(n):
    """Raise ValueError unless n is a power of two from MIN_PAGE_SIZE to
    MAX_PAGE_SIZE. Any int: a peer's number may not fit a C integer."""
    if not MIN_PAGE_SIZE <= n <= XB_MAX_PAGE:
        raise ValueError(f"page size must be a power of two from {MIN_PAGE_SIZE} to {XB_MAX_PAGE}, got {n}")
    _check_page_size(n)


cdef inline bint _block_id_ok(Py_ssize_t length) noexcept nogil:
    return 1 <= length <= MAX_BLOCK_ID_LENGTH


cdef inline uint64_t _page_key(uint64_t block_index, uint64_t page_number) noexcept nogil:
    """The cache key of a page (block_index < KEY_BLOCK_LIMIT, page_number
    < KEY_PAGE_LIMIT, checked by the caller)."""
    return (block_index << KEY_PAGE_BITS) | page_number


def page_key(block_index, page_number):
    """The cache key of page page_number of block block_index; ValueError
    when either is out of range."""
    cdef object b = PyNumber_Index(block_index), p = PyNumber_Index(page_number)
    if not 0 <= b < KEY_BLOCK_LIMIT or not 0 <= p < KEY_PAGE_LIMIT:
        raise ValueError("block index or page number out of range")
    return _page_key(b, p)
