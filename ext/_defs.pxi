# Shared declarations of migrated._core: cimports, the C headers, buffer
# types, the SIGBUS guard, the page-size check, and the constants more than
# one part uses.

cimport cython
from libc.stdint cimport uint8_t, uint16_t, int32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset, memcmp
from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.array cimport array, clone, resize
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
    int xb_take(uint8_t *mark)


cdef extern from "xbzrle_kernel.h" nogil:
    int XB_MAX_PAGE
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

MAX_PAGE_SIZE = XB_MAX_PAGE

cdef enum:
    F_ZERO = 0x02
    F_MEM_SIZE = 0x04
    F_PAGE = 0x08
    F_EOS = 0x10
    F_CONTINUE = 0x20
    F_XBZRLE = 0x40
    F_CONTROL = 0x80
    F_MASK = 0x1FF
    ENCODING_XBZRLE = 0x01


cdef inline int _check_page_size(Py_ssize_t n) except -1:
    if n < 512 or n > XB_MAX_PAGE or (n & (n - 1)) != 0:
        raise ValueError(f"page size must be a power of two from 512 to {XB_MAX_PAGE}, got {n}")
    return 0
