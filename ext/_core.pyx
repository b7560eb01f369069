# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Per-page hot loops of migrated: XBZRLE codec, LRU page cache, page-record
batch encoder and applier, dirty scan.

Every loop over pages or bytes lives here and runs with the GIL released.
Python wrappers in migrated.xbzrle, migrated.cache and migrated.records
check arguments and give the public API; this module is private.
"""
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

KERNELS = ("generic", "avx2", "avx512bw")
xb_set_kernel(xb_best_kernel())

MAX_PAGE_SIZE = XB_MAX_PAGE

_DECODE_MESSAGES = {
    XB_ERR_LEN_TRUNCATED: "length runs past the end of the input",
    XB_ERR_LEN_TOO_LONG: "length is longer than 2 bytes",
    XB_ERR_ZERO_ZRUN: "zero run of length 0 after the first pair",
    XB_ERR_ZERO_NZRUN: "non-zero run of length 0",
    XB_ERR_PAST_PAGE: "run goes past the end of the page",
    XB_ERR_DATA_TRUNCATED: "non-zero run bytes run past the end of the input",
    XB_ERR_MISSING_NZRUN: "input ends between a zero run and its non-zero run",
}


def kernel_name():
    """Name of the changed-byte compare kernel in use."""
    return KERNELS[xb_kernel_id]


def available_kernels():
    return tuple(name for i, name in enumerate(KERNELS) if xb_kernel_supported(i))


def set_kernel(str name):
    """Select a compare kernel by name ('best' picks the widest the CPU has)."""
    cdef int i = xb_best_kernel() if name == "best" else KERNELS.index(name)
    if xb_set_kernel(i) != 0:
        raise ValueError(f"kernel {name!r} is not supported by this CPU")


# ---------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------

cdef inline int _check_page_size(Py_ssize_t n) except -1:
    if n < 512 or n > XB_MAX_PAGE or (n & (n - 1)) != 0:
        raise ValueError(f"page size must be a power of two from 512 to {XB_MAX_PAGE}, got {n}")
    return 0


def encode_into(cbuf old, cbuf new, wbuf out):
    cdef Py_ssize_t n = new.shape[0]
    cdef ptrdiff_t r
    if old.shape[0] != n:
        raise ValueError(f"old and new pages differ in size ({old.shape[0]} != {n})")
    _check_page_size(n)
    with nogil:
        r = xb_encode(&old[0], &new[0], n, &out[0] if out.shape[0] else NULL, out.shape[0])
    return r


def encode_pages(cbuf old, cbuf new, wbuf out, Py_ssize_t page_size=4096):
    cdef Py_ssize_t total = new.shape[0], npages, i, d = 0
    cdef ptrdiff_t r
    _check_page_size(page_size)
    if old.shape[0] != total or total % page_size:
        raise ValueError("old and new must hold the same whole number of pages")
    npages = total // page_size
    if out.shape[0] < total:
        raise ValueError("out must hold at least as many bytes as the pages")
    cdef array lengths = clone(array("q"), npages, False)
    cdef int64_t[::1] lv = lengths
    with nogil:
        for i in range(npages):
            r = xb_encode(&old[i * page_size], &new[i * page_size], page_size,
                          &out[d], page_size)
            lv[i] = r
            if r > 0:
                d += r
    return lengths


cdef inline object _decode_error(int rc, size_t at):
    return DecodeError(f"invalid XBZRLE delta at offset {at}: {_DECODE_MESSAGES[rc]}", at)


def decode_into(cbuf encoded, wbuf page):
    cdef Py_ssize_t n = page.shape[0], slen = encoded.shape[0]
    cdef size_t at = 0
    cdef int rc
    _check_page_size(n)
    if slen == 0:
        return
    with nogil:
        rc = xb_decode_check(&encoded[0], slen, n, &at)
        if rc == 0:
            xb_decode_apply(&encoded[0], slen, &page[0])
    if rc:
        raise _decode_error(rc, at)


def decode_pages(cbuf encoded, const int64_t[::1] lengths, wbuf pages, Py_ssize_t page_size=4096):
    """Apply N deltas stored back to back (as encode_pages writes them);
    entries of length <= 0 are skipped. Raises DecodeError on the first bad one."""
    cdef Py_ssize_t npages = lengths.shape[0], i, s = 0
    cdef size_t at = 0
    cdef int rc = 0
    cdef int64_t ln
    _check_page_size(page_size)
    if pages.shape[0] < npages * page_size:
        raise ValueError("pages is shorter than the number of deltas")
    with nogil:
        for i in range(npages):
            ln = lengths[i]
            if ln <= 0:
                continue
            if s + ln > encoded.shape[0]:
                rc = XB_ERR_DATA_TRUNCATED
                at = s
                break
            rc = xb_decode_check(&encoded[s], ln, page_size, &at)
            if rc:
                at += s
                break
            xb_decode_apply(&encoded[s], ln, &pages[i * page_size])
            s += ln
    if rc:
        raise _decode_error(rc, at)


# ---------------------------------------------------------------------------
# Page hashes and the dirty scan
# ---------------------------------------------------------------------------

cdef inline uint64_t _hash_page(const uint8_t *block, Py_ssize_t length,
                                Py_ssize_t page, Py_ssize_t ps, uint8_t *scratch) noexcept nogil:
    cdef Py_ssize_t start = page * ps
    cdef Py_ssize_t avail = length - start
    if avail >= ps:
        return xb_page_hash(block + start, ps)
    memcpy(scratch, block + start, avail)
    memset(scratch + avail, 0, ps - avail)
    return xb_page_hash(scratch, ps)


def page_count(Py_ssize_t length, Py_ssize_t page_size):
    return (length + page_size - 1) // page_size


def page_hashes(cbuf block, Py_ssize_t page_size=4096):
    """Hash of every page of block (the last partial page zero-padded)."""
    cdef Py_ssize_t length = block.shape[0], npages, p
    _check_page_size(page_size)
    npages = (length + page_size - 1) // page_size
    cdef array out = clone(array("Q"), npages, False)
    cdef uint64_t[::1] hv = out
    cdef uint8_t scratch[16384]
    if npages:
        with nogil:
            for p in range(npages):
                hv[p] = _hash_page(&block[0], length, p, page_size, scratch)
    return out


def hash_marked(cbuf block, uint8_t[::1] marks, uint64_t[::1] hashes, Py_ssize_t page_size=4096):
    """Hash the pages of block whose mark is set, clearing each mark before
    reading its page (see Applier.set_blocks); returns how many. A page
    marked again meanwhile keeps its mark for the next call."""
    cdef Py_ssize_t length = block.shape[0], npages, p, n = 0
    cdef uint8_t scratch[16384]
    _check_page_size(page_size)
    npages = (length + page_size - 1) // page_size
    if marks.shape[0] < npages or hashes.shape[0] < npages:
        raise ValueError(f"marks ({marks.shape[0]}) or hashes ({hashes.shape[0]}) hold fewer than {npages} pages")
    if npages:
        with nogil:
            for p in range(npages):
                if xb_take(&marks[p]):
                    hashes[p] = _hash_page(&block[0], length, p, page_size, scratch)
                    n += 1
    return n


def scan(cbuf block, uint64_t[::1] hashes, Py_ssize_t page_size=4096, Py_ssize_t first=0, Py_ssize_t end=-1):
    """Pages whose hash differs from hashes[p]; hashes is updated in place.
    Only pages first <= p < end (end -1: the last page) are looked at, so
    parts of one block can be scanned by several threads at once."""
    cdef Py_ssize_t length = block.shape[0], npages, p, n = 0
    cdef uint64_t h
    _check_page_size(page_size)
    npages = (length + page_size - 1) // page_size
    if hashes.shape[0] < npages:
        raise ValueError(f"hash array holds {hashes.shape[0]} pages, block has {npages}")
    if end < 0 or end > npages:
        end = npages
    first = min(max(first, 0), end)
    cdef array out = clone(array("Q"), end - first, False)
    cdef uint64_t[::1] ov = out
    cdef uint8_t scratch[16384]
    cdef xb_guard_t guard
    if end > first:
        with nogil:
            xb_guard_arm(&guard, &block[0], length)
            for p in range(first, end):
                h = _hash_page(&block[0], length, p, page_size, scratch)
                if h != hashes[p]:
                    hashes[p] = h
                    ov[n] = p
                    n += 1
            xb_guard_disarm()
        _check_guard(&guard, &block[0], length)
    resize(out, n)
    return out


# ---------------------------------------------------------------------------
# Page lists: building, merging and reading /proc/PID/pagemap entries
# ---------------------------------------------------------------------------

def page_range(uint64_t start, uint64_t stop):
    """array('Q') of the page numbers start..stop-1."""
    cdef Py_ssize_t n = <Py_ssize_t>(stop - start) if stop > start else 0, i
    cdef array out = clone(array("Q"), n, False)
    cdef uint64_t[::1] ov = out
    if n:
        with nogil:
            for i in range(n):
                ov[i] = start + i
    return out


def merge_pages(const uint64_t[::1] a, const uint64_t[::1] b):
    """Union of two ascending page lists, ascending and without duplicates."""
    cdef Py_ssize_t na = a.shape[0], nb = b.shape[0], i = 0, j = 0, n = 0
    cdef array out = clone(array("Q"), na + nb, False)
    cdef uint64_t[::1] ov = out
    cdef uint64_t v
    if na + nb:
        with nogil:
            while i < na or j < nb:
                if j >= nb or (i < na and a[i] < b[j]):
                    v = a[i]; i += 1
                elif i >= na or b[j] < a[i]:
                    v = b[j]; j += 1
                else:
                    v = a[i]; i += 1; j += 1
                ov[n] = v
                n += 1
    resize(out, n)
    return out


def select_pages(const uint64_t[::1] entries, uint64_t mask, bint any_set=True):
    """Indexes of the 64-bit entries (e.g. pagemap) with any bit of mask set,
    or with none of them set when any_set is False."""
    cdef Py_ssize_t n = entries.shape[0], i, k = 0
    cdef array out = clone(array("Q"), n, False)
    cdef uint64_t[::1] ov = out
    if n:
        with nogil:
            for i in range(n):
                if ((entries[i] & mask) != 0) == any_set:
                    ov[k] = i
                    k += 1
    resize(out, k)
    return out


def page_runs(const uint64_t[::1] pages):
    """Runs of consecutive pages in an ascending list, as array('Q') of
    (first, count) pairs, so I/O can be done per run rather than per page."""
    cdef Py_ssize_t n = pages.shape[0], i, k = 0
    cdef array out = clone(array("Q"), 2 * n, False)
    cdef uint64_t[::1] ov = out
    if n:
        with nogil:
            ov[0] = pages[0]
            ov[1] = 1
            for i in range(1, n):
                if pages[i] == ov[2 * k] + ov[2 * k + 1]:
                    ov[2 * k + 1] += 1
                else:
                    k += 1
                    ov[2 * k] = pages[i]
                    ov[2 * k + 1] = 1
            k += 1
    resize(out, 2 * k)
    return out


def iovecs(const uint64_t[::1] runs, uint64_t local_base, uint64_t remote_base, uint64_t page_size):
    """struct iovec arrays (pointer, length pairs, as array('Q')) for page
    runs (first, count): one local and one remote, for process_vm_readv."""
    cdef Py_ssize_t n = runs.shape[0] // 2, i
    cdef array local = clone(array("Q"), 2 * n, False)
    cdef array remote = clone(array("Q"), 2 * n, False)
    cdef uint64_t[::1] lv = local
    cdef uint64_t[::1] rv = remote
    if n:
        with nogil:
            for i in range(n):
                lv[2 * i] = local_base + runs[2 * i] * page_size
                rv[2 * i] = remote_base + runs[2 * i] * page_size
                lv[2 * i + 1] = runs[2 * i + 1] * page_size
                rv[2 * i + 1] = runs[2 * i + 1] * page_size
    return local, remote


# ---------------------------------------------------------------------------
# LRU page cache
# ---------------------------------------------------------------------------

cdef uint64_t _HASH_MUL = 0x9E3779B97F4A7C15ULL

cdef class PageCache:
    """LRU cache of last-sent pages keyed by a 64-bit page key.

    Page data lives in one preallocated slab of capacity // page_size slots.
    Entries (data or zero) form one doubly linked LRU list in flat arrays;
    an open-addressing table maps keys to entries. A zero entry (a page all
    of one byte value) holds only its fill byte. Entries are bounded by
    twice the slot count, so the index stays small next to the slab.
    """
    cdef readonly Py_ssize_t page_size
    cdef readonly Py_ssize_t capacity
    cdef Py_ssize_t nslots, max_entries, nentries, ndata
    cdef uint8_t *slab
    cdef uint64_t *ekey
    cdef int32_t *eprev
    cdef int32_t *enext
    cdef int32_t *eslot
    cdef uint8_t *efill
    cdef int32_t *table
    cdef uint64_t tmask
    cdef int tbits
    cdef int32_t head, tail, free_entry
    cdef int32_t *free_slots
    cdef Py_ssize_t nfree_slots
    cdef uint8_t *fillpage
    cdef int fillpage_value
    cdef public uint64_t lookups, hits, misses, inserts, evictions

    def __cinit__(self, Py_ssize_t capacity_bytes, Py_ssize_t page_size=4096):
        _check_page_size(page_size)
        self.page_size = page_size
        self.fillpage = <uint8_t *>calloc(page_size, 1)
        if self.fillpage == NULL:
            raise MemoryError()
        self.fillpage_value = 0
        self._alloc(capacity_bytes)

    def __dealloc__(self):
        self._release()
        free(self.fillpage)

    cdef void _release(self) noexcept:
        free(self.slab); free(self.ekey); free(self.eprev); free(self.enext)
        free(self.eslot); free(self.efill); free(self.table); free(self.free_slots)
        self.slab = NULL; self.ekey = NULL; self.eprev = NULL; self.enext = NULL
        self.eslot = NULL; self.efill = NULL; self.table = NULL; self.free_slots = NULL

    cdef int _alloc(self, Py_ssize_t capacity_bytes) except -1:
        if capacity_bytes < 0:
            raise ValueError("cache capacity must be >= 0")
        cdef Py_ssize_t nslots = capacity_bytes // self.page_size
        cdef Py_ssize_t max_entries = 2 * nslots
        cdef Py_ssize_t tsize = 16, i
        cdef int tbits = 4
        while tsize < 2 * max_entries:
            tsize <<= 1
            tbits += 1
        self.capacity = nslots * self.page_size
        self.nslots = nslots
        self.max_entries = max_entries
        self.nentries = 0
        self.ndata = 0
        self.head = -1
        self.tail = -1
        self.tbits = tbits
        self.tmask = tsize - 1
        self.slab = <uint8_t *>malloc(max(1, nslots * self.page_size))
        self.ekey = <uint64_t *>malloc(max(1, max_entries) * sizeof(uint64_t))
        self.eprev = <int32_t *>malloc(max(1, max_entries) * sizeof(int32_t))
        self.enext = <int32_t *>malloc(max(1, max_entries) * sizeof(int32_t))
        self.eslot = <int32_t *>malloc(max(1, max_entries) * sizeof(int32_t))
        self.efill = <uint8_t *>malloc(max(1, max_entries))
        self.table = <int32_t *>malloc(tsize * sizeof(int32_t))
        self.free_slots = <int32_t *>malloc(max(1, nslots) * sizeof(int32_t))
        if (self.slab == NULL or self.ekey == NULL or self.eprev == NULL or self.enext == NULL
                or self.eslot == NULL or self.efill == NULL or self.table == NULL
                or self.free_slots == NULL):
            self._release()
            raise MemoryError(f"cannot allocate a page cache of {capacity_bytes} bytes")
        for i in range(tsize):
            self.table[i] = -1
        # free entry list threaded through enext
        self.free_entry = 0 if max_entries else -1
        for i in range(max_entries):
            self.enext[i] = <int32_t>(i + 1) if i + 1 < max_entries else -1
        self.nfree_slots = nslots
        for i in range(nslots):
            self.free_slots[i] = <int32_t>(nslots - 1 - i)
        return 0

    # -- index ------------------------------------------------------------

    cdef inline uint64_t _bucket(self, uint64_t key) noexcept nogil:
        return (key * _HASH_MUL) >> (64 - self.tbits)

    cdef int32_t find(self, uint64_t key) noexcept nogil:
        if self.max_entries == 0:
            return -1
        cdef uint64_t b = self._bucket(key)
        cdef int32_t e
        while True:
            e = self.table[b]
            if e < 0:
                return -1
            if self.ekey[e] == key:
                return e
            b = (b + 1) & self.tmask

    cdef void _table_insert(self, uint64_t key, int32_t e) noexcept nogil:
        cdef uint64_t b = self._bucket(key)
        while self.table[b] >= 0:
            b = (b + 1) & self.tmask
        self.table[b] = e

    cdef void _table_delete(self, uint64_t key) noexcept nogil:
        # backward-shift deletion keeps probe chains intact without tombstones
        cdef uint64_t b = self._bucket(key), j, home
        while self.ekey[self.table[b]] != key:
            b = (b + 1) & self.tmask
        j = b
        while True:
            j = (j + 1) & self.tmask
            if self.table[j] < 0:
                break
            home = self._bucket(self.ekey[self.table[j]])
            # move table[j] into the hole at b when its home is not in (b, j]
            if ((j - home) & self.tmask) >= ((j - b) & self.tmask):
                self.table[b] = self.table[j]
                b = j
        self.table[b] = -1

    # -- LRU list ---------------------------------------------------------

    cdef inline void _unlink(self, int32_t e) noexcept nogil:
        cdef int32_t p = self.eprev[e], n = self.enext[e]
        if p >= 0:
            self.enext[p] = n
        else:
            self.head = n
        if n >= 0:
            self.eprev[n] = p
        else:
            self.tail = p

    cdef inline void _push_front(self, int32_t e) noexcept nogil:
        self.eprev[e] = -1
        self.enext[e] = self.head
        if self.head >= 0:
            self.eprev[self.head] = e
        self.head = e
        if self.tail < 0:
            self.tail = e

    cdef inline void touch(self, int32_t e) noexcept nogil:
        if self.head != e:
            self._unlink(e)
            self._push_front(e)

    cdef void _drop(self, int32_t e) noexcept nogil:
        self._table_delete(self.ekey[e])
        self._unlink(e)
        if self.eslot[e] >= 0:
            self.free_slots[self.nfree_slots] = self.eslot[e]
            self.nfree_slots += 1
            self.ndata -= 1
        self.enext[e] = self.free_entry
        self.free_entry = e
        self.nentries -= 1

    cdef inline void _evict_tail(self) noexcept nogil:
        self._drop(self.tail)
        self.evictions += 1

    # -- operations used by the batch encoder -------------------------------

    cdef int32_t lookup(self, uint64_t key) noexcept nogil:
        """Counted lookup; a hit becomes most recently used."""
        self.lookups += 1
        cdef int32_t e = self.find(key)
        if e < 0:
            self.misses += 1
        else:
            self.hits += 1
            self.touch(e)
        return e

    cdef const uint8_t *data(self, int32_t e) noexcept nogil:
        """The page an entry holds (a fill page for a zero entry)."""
        if self.eslot[e] >= 0:
            return self.slab + <Py_ssize_t>self.eslot[e] * self.page_size
        if self.fillpage_value != self.efill[e]:
            memset(self.fillpage, self.efill[e], self.page_size)
            self.fillpage_value = self.efill[e]
        return self.fillpage

    cdef int32_t store(self, uint64_t key, const uint8_t *page, int fill) noexcept nogil:
        """Record key's page: a copy of page, or, with page NULL, a zero entry
        of byte fill. The entry becomes most recently used."""
        if self.max_entries == 0:
            return -1
        cdef int32_t e = self.find(key)
        if e < 0:
            if self.nentries == self.max_entries:
                self._evict_tail()
            e = self.free_entry
            self.free_entry = self.enext[e]
            self.ekey[e] = key
            self.eslot[e] = -1
            self._table_insert(key, e)
            self._push_front(e)
            self.nentries += 1
            self.inserts += 1
        else:
            self.touch(e)
        if page == NULL:
            if self.eslot[e] >= 0:
                self.free_slots[self.nfree_slots] = self.eslot[e]
                self.nfree_slots += 1
                self.ndata -= 1
                self.eslot[e] = -1
            self.efill[e] = <uint8_t>fill
            return e
        if self.eslot[e] < 0:
            while self.nfree_slots == 0:
                # e is at the head, so the tail is another entry
                self._evict_tail()
            self.nfree_slots -= 1
            self.eslot[e] = self.free_slots[self.nfree_slots]
            self.ndata += 1
        memcpy(self.slab + <Py_ssize_t>self.eslot[e] * self.page_size, page, self.page_size)
        return e

    cdef void remove(self, uint64_t key) noexcept nogil:
        cdef int32_t e = self.find(key)
        if e >= 0:
            self._drop(e)

    # -- Python API -------------------------------------------------------

    def _page_arg(self, page):
        cdef const uint8_t[::1] v = page
        if v.shape[0] != self.page_size:
            raise ValueError(f"page must be {self.page_size} bytes, got {v.shape[0]}")
        return v

    def insert(self, uint64_t key, page):
        """Store a copy of page under key (most recently used)."""
        cdef const uint8_t[::1] v = self._page_arg(page)
        self.store(key, &v[0], 0)

    def insert_zero(self, uint64_t key, int fill=0):
        """Record that key's page is all byte fill, without storing a page."""
        if not 0 <= fill <= 255:
            raise ValueError("fill must be a byte value")
        self.store(key, NULL, fill)

    def get(self, uint64_t key):
        """The cached page as bytes (a counted lookup), or None on a miss."""
        cdef int32_t e = self.lookup(key)
        if e < 0:
            return None
        return (<const char *>self.data(e))[:self.page_size]

    def is_zero(self, uint64_t key):
        cdef int32_t e = self.find(key)
        return e >= 0 and self.eslot[e] < 0

    def remove_key(self, uint64_t key):
        self.remove(key)

    def __contains__(self, uint64_t key):
        return self.find(key) >= 0

    def __len__(self):
        return self.nentries

    def keys(self):
        """Keys from most to least recently used."""
        out = []
        cdef int32_t e = self.head
        while e >= 0:
            out.append(self.ekey[e])
            e = self.enext[e]
        return out

    def resize(self, Py_ssize_t capacity_bytes):
        """Change the capacity, keeping the most recently used entries that fit."""
        cdef Py_ssize_t new_slots = max(0, capacity_bytes) // self.page_size
        cdef Py_ssize_t new_max = 2 * new_slots, kept = 0, kept_data = 0
        cdef int32_t e
        cdef list keep = []
        if capacity_bytes < 0:
            raise ValueError("cache capacity must be >= 0")
        e = self.head
        while e >= 0 and kept < new_max:
            if self.eslot[e] >= 0:
                if kept_data < new_slots:
                    keep.append((self.ekey[e], (<const char *>self.data(e))[:self.page_size], 0))
                    kept_data += 1
                    kept += 1
            else:
                keep.append((self.ekey[e], None, self.efill[e]))
                kept += 1
            e = self.enext[e]
        dropped = self.nentries - kept
        self._release()
        self._alloc(capacity_bytes)
        cdef const uint8_t[::1] v
        for key, page, fill in reversed(keep):
            if page is None:
                self.store(key, NULL, fill)
            else:
                v = page
                self.store(key, &v[0], 0)
        self.inserts -= kept
        self.evictions += dropped

    @property
    def pages(self):
        """Data pages held (zero entries hold none)."""
        return self.ndata

    @property
    def zero_entries(self):
        return self.nentries - self.ndata

    def stats(self):
        return {
            "capacity": self.capacity, "page_size": self.page_size,
            "entries": self.nentries, "pages": self.ndata,
            "lookups": self.lookups, "hits": self.hits, "misses": self.misses,
            "inserts": self.inserts, "evictions": self.evictions,
        }


# ---------------------------------------------------------------------------
# Page records
# ---------------------------------------------------------------------------

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

# batch options
cdef enum:
    OPT_XBZRLE = 1      # delta-encode cache hits
    OPT_LOOKUP = 2      # look pages up in the cache (off in a first pass)
    OPT_INSERT = 4      # cache pages sent raw

OPTION_XBZRLE = OPT_XBZRLE
OPTION_LOOKUP = OPT_LOOKUP
OPTION_INSERT = OPT_INSERT

cdef inline void _put_be64(uint8_t *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <uint8_t>(v >> (56 - 8 * i))

cdef inline uint64_t _get_be64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v = (v << 8) | p[i]
    return v


# counters returned by encode_batch, in this order
BATCH_COUNTERS = ("zero_pages", "normal_pages", "normal_bytes", "xbzrle_pages",
                  "xbzrle_bytes", "cache_lookups", "cache_miss", "overflow",
                  "unchanged", "record_bytes")


cpdef Py_ssize_t encode_capacity(Py_ssize_t npages, Py_ssize_t id_length, Py_ssize_t page_size):
    """The most bytes encode_batch can write for npages pages."""
    return 1 + id_length + npages * (8 + 3 + page_size)


_ZERO_PAGE_HASH = {}  # page size -> page hash of an all-zero page


cpdef uint64_t zero_page_hash(Py_ssize_t page_size) except? 0:
    """The page hash of a page of zero bytes."""
    h = _ZERO_PAGE_HASH.get(page_size)
    if h is None:
        _check_page_size(page_size)
        zeros = bytes(page_size)
        h = _ZERO_PAGE_HASH[page_size] = xb_page_hash(<const uint8_t *><const char *>zeros, page_size)
    return h


def encode_batch(PageCache cache, uint64_t block_index, bytes block_id, cbuf block,
                 const uint64_t[::1] pages, int options, hashes=None, into=None):
    """Frame the records for `pages` of one block into a new bytearray, or
    into `into` (a writable buffer of at least encode_capacity() bytes).

    Returns (data, counters): data is the bytearray, or a memoryview of the
    used part of `into`; counters are ordered as BATCH_COUNTERS.
    """
    cdef Py_ssize_t ps = cache.page_size, length = block.shape[0]
    cdef Py_ssize_t npages_block = (length + ps - 1) // ps
    cdef Py_ssize_t n = pages.shape[0], i, idlen = len(block_id)
    cdef Py_ssize_t limit = ps - 3       # an XBZRLE record never outgrows a PAGE record
    cdef uint64_t[::1] hv
    cdef bint with_hashes = hashes is not None
    cdef uint64_t p
    if idlen < 1 or idlen > 255:
        raise ValueError("block id must be 1 to 255 bytes")
    if block_index >= (1 << 24):
        raise ValueError("block index out of range")
    for i in range(n):
        if pages[i] >= <uint64_t>npages_block:
            raise ValueError(f"page {pages[i]} is outside the block ({npages_block} pages)")
    if with_hashes:
        hv = hashes
        if hv.shape[0] < npages_block:
            raise ValueError("hash array is shorter than the block")
    cdef Py_ssize_t cap = encode_capacity(n, idlen, ps)
    cdef uint8_t[::1] given
    cdef uint8_t *out
    if into is None:
        out_obj = PyByteArray_FromStringAndSize(NULL, cap)
        out = <uint8_t *>PyByteArray_AS_STRING(out_obj)
    else:
        given = into
        if given.shape[0] < cap:
            raise ValueError(f"output buffer of {given.shape[0]} bytes is smaller than {cap}")
        out = &given[0]
    cdef uint8_t *snap = <uint8_t *>malloc(ps)
    if snap == NULL:
        raise MemoryError()
    cdef const char *idp = block_id
    cdef uint64_t c_zero = 0, c_normal = 0, c_xpages = 0, c_xbytes = 0
    cdef uint64_t c_lookups = 0, c_miss = 0, c_overflow = 0, c_unchanged = 0
    cdef Py_ssize_t d = 0, avail, hdr
    cdef uint64_t key, flags
    cdef int32_t e
    cdef ptrdiff_t r
    cdef bint first = True
    cdef bint use_cache = cache.max_entries > 0
    cdef uint8_t *pg
    cdef uint64_t zero_hash = zero_page_hash(ps)
    cdef xb_guard_t guard
    with nogil:
        xb_guard_arm(&guard, &block[0] if length else NULL, length)
        for i in range(n):
            p = pages[i]
            key = (block_index << 40) | p
            flags = 0 if first else F_CONTINUE
            hdr = d
            d += 8
            if first:
                out[d] = <uint8_t>idlen
                memcpy(out + d + 1, idp, idlen)
                d += 1 + idlen
            # The private snapshot of the page is taken straight into the
            # output, where a PAGE record carries it: a raw page is copied
            # once. Only a delta needs a second copy (the delta is written
            # over that place).
            pg = out + d
            avail = length - <Py_ssize_t>p * ps
            if avail >= ps and xb_is_zero(&block[p * ps], ps):
                # A zero page needs no snapshot: what is sent (fill 0), hashed
                # and cached is the constant, whatever a writer does meanwhile
                if with_hashes:
                    hv[p] = zero_hash
                flags |= F_ZERO
                out[d] = 0
                d += 1
                c_zero += 1
                if use_cache:
                    cache.store(key, NULL, 0)
                _put_be64(out + hdr, (<uint64_t>p * ps) | flags)
                first = False
                continue
            if avail >= ps:
                memcpy(pg, &block[p * ps], ps)
            else:
                memcpy(pg, &block[p * ps], avail)
                memset(pg + avail, 0, ps - avail)
            if xb_is_uniform(pg, ps):
                if with_hashes:
                    hv[p] = zero_hash if pg[0] == 0 else xb_page_hash(pg, ps)
                flags |= F_ZERO
                # out[d] is pg[0] already: the fill byte
                d += 1
                c_zero += 1
                if use_cache:
                    cache.store(key, NULL, pg[0])
            else:
                if with_hashes:
                    hv[p] = xb_page_hash(pg, ps)
                e = -1
                if use_cache and (options & OPT_LOOKUP):
                    c_lookups += 1
                    e = cache.lookup(key)
                    if e < 0:
                        c_miss += 1
                if e >= 0 and (options & OPT_XBZRLE):
                    memcpy(snap, pg, ps)
                    r = xb_encode(cache.data(e), snap, ps, out + d + 3, limit)
                    if r == 0:
                        # the receiver already holds exactly this page
                        c_unchanged += 1
                        d = hdr
                        continue
                    cache.store(key, snap, 0)
                    if r > 0:
                        flags |= F_XBZRLE
                        out[d] = ENCODING_XBZRLE
                        out[d + 1] = <uint8_t>(r >> 8)
                        out[d + 2] = <uint8_t>r
                        d += 3 + r
                        c_xpages += 1
                        c_xbytes += 3 + r
                    else:
                        c_overflow += 1
                        flags |= F_PAGE
                        memcpy(out + d, snap, ps)  # the failed delta wrote over it
                        d += ps
                        c_normal += 1
                else:
                    flags |= F_PAGE
                    if use_cache:
                        if options & OPT_INSERT and options & OPT_XBZRLE:
                            cache.store(key, pg, 0)
                        else:
                            # a page sent raw with the cache unused: a stale
                            # cached copy would corrupt a later delta
                            cache.remove(key)
                    d += ps
                    c_normal += 1
            _put_be64(out + hdr, (<uint64_t>p * ps) | flags)
            first = False
        xb_guard_disarm()
    free(snap)
    _check_guard(&guard, &block[0] if length else NULL, length)
    if into is None:
        PyByteArray_Resize(out_obj, d)
        data = out_obj
    else:
        data = memoryview(into)[:d]
    return data, (c_zero, c_normal, c_normal * ps, c_xpages, c_xbytes, c_lookups,
                     c_miss, c_overflow, c_unchanged, d)


# applier error codes
cdef enum:
    E_FLAGS = 1
    E_KIND = 2
    E_NO_BLOCK = 3
    E_ID_LEN = 4
    E_UNKNOWN_BLOCK = 5
    E_UNALIGNED = 6
    E_PAST_BLOCK = 7
    E_ENCODING = 8
    E_XLEN = 9
    E_DELTA = 10
    E_NOT_NEGOTIATED = 11

_RECORD_MESSAGES = {
    E_FLAGS: "unknown flag bits",
    E_KIND: "invalid combination of page flags",
    E_NO_BLOCK: "CONTINUE record with no block before it",
    E_ID_LEN: "empty block id",
    E_UNKNOWN_BLOCK: "unknown block id",
    E_UNALIGNED: "page offset is not page-aligned",
    E_PAST_BLOCK: "page offset is past the end of the block",
    E_ENCODING: "unknown XBZRLE encoding byte",
    E_XLEN: "XBZRLE length is 0 or larger than a page",
    E_NOT_NEGOTIATED: "XBZRLE record, but XBZRLE was not negotiated",
}

# stop reasons of Applier.apply
cdef enum:
    R_NEED_DATA = 0    # every complete page record was applied
    R_CONTROL = 1      # the next record is not a page record (EOS, MEM_SIZE, control)

NEED_DATA = R_NEED_DATA
CONTROL = R_CONTROL

cdef enum:
    IOV_BATCH = 1024   # iovecs per pwritev (Linux's IOV_MAX)


cdef struct _Target:
    uint8_t *ptr            # the block's writable buffer
    Py_ssize_t length
    const uint8_t *id
    Py_ssize_t idlen
    bint fresh              # known all zero bytes (see set_blocks)
    int fd                  # the file the buffer maps, or -1
    uint8_t *marks          # per-page written marks, or NULL


cdef class Applier:
    """Applies page records to writable block buffers (the receiver side).

    Feed it the stream in chunks of any size: apply() consumes every complete
    page record at the front of data and stops before an incomplete one or
    before a non-page record, reporting how many bytes it consumed.
    """
    cdef readonly Py_ssize_t page_size
    cdef readonly uint64_t position
    cdef list _keep
    cdef int nblocks
    cdef _Target *t
    cdef int current
    cdef public uint64_t zero_pages, normal_pages, xbzrle_pages, xbzrle_bytes
    cdef public bint allow_xbzrle
    # whole pages for a fresh block with a file behind it, waiting to be
    # written with one pwritev: consecutive pages of one block
    cdef iovec *iov
    cdef int niov, pend_blk
    cdef uint64_t pend_off

    def __cinit__(self, Py_ssize_t page_size=4096):
        _check_page_size(page_size)
        self.page_size = page_size
        self.allow_xbzrle = True
        self.current = -1
        self._keep = []
        self.iov = <iovec *>malloc(IOV_BATCH * sizeof(iovec))
        if self.iov == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.t)
        free(self.iov)

    cdef inline void _mark(self, int blk, uint64_t offset) noexcept nogil:
        """The page at offset of block blk was written (after the write)."""
        if self.t[blk].marks != NULL:
            xb_mark(&self.t[blk].marks[offset // <uint64_t>self.page_size])

    cdef int _flush(self) noexcept nogil:
        """Write the pending pages; 0 or an errno."""
        cdef int fd, first = 0
        cdef ssize_t done
        cdef uint64_t off = self.pend_off
        if self.niov == 0:
            return 0
        fd = self.t[self.pend_blk].fd
        while first < self.niov:
            done = pwritev(fd, self.iov + first, self.niov - first, off)
            if done < 0:
                if errno == EINTR:
                    continue
                self.niov = 0
                return errno
            if done == 0:
                self.niov = 0
                return 5  # EIO: a regular file that takes nothing
            off += done
            while first < self.niov and <size_t>done >= self.iov[first].iov_len:
                done -= self.iov[first].iov_len
                first += 1
            if done:  # a short write inside one page
                self.iov[first].iov_base = <uint8_t *>self.iov[first].iov_base + done
                self.iov[first].iov_len -= done
        for first in range(self.niov):
            self._mark(self.pend_blk, self.pend_off + <uint64_t>first * <uint64_t>self.page_size)
        self.niov = 0
        return 0

    def set_blocks(self, blocks):
        """blocks: sequence of (id: bytes, writable buffer[, fresh[, fd[,
        marks]]]). The buffers are held until the next call. The current
        block is forgotten.

        fresh: the block is known to be all zero bytes, until clear_fresh().
        A ZERO record of fill 0 for it is not written (it would only fault in
        memory), and when the buffer maps a file open as fd (else None or
        -1), whole pages are written to the file with pwritev rather than
        copied through the mapping (a first write through a mapping faults
        each page in, and the kernel zero-fills it before the copy).

        marks: a writable buffer of one byte per page, set to 1 for every
        page written (see hash_marked); None for none.
        """
        cdef list keep = []
        cdef int n = len(blocks), i
        cdef uint8_t[::1] mv, mk
        cdef _Target *t = <_Target *>calloc(max(n, 1), sizeof(_Target))
        if t == NULL:
            raise MemoryError()
        try:
            for i, entry in enumerate(blocks):
                bid, buf = entry[0], entry[1]
                if not isinstance(bid, bytes) or not 1 <= len(bid) <= 255:
                    raise ValueError("block ids must be bytes of length 1 to 255")
                mv = buf
                keep.append((bid, mv))
                t[i].ptr = &mv[0] if mv.shape[0] else NULL
                t[i].length = mv.shape[0]
                t[i].id = <const uint8_t *><const char *>bid
                t[i].idlen = len(bid)
                t[i].fresh = len(entry) > 2 and bool(entry[2])
                t[i].fd = entry[3] if len(entry) > 3 and entry[3] is not None else -1
                if len(entry) > 4 and entry[4] is not None:
                    mk = entry[4]
                    if mk.shape[0] < (mv.shape[0] + self.page_size - 1) // self.page_size:
                        raise ValueError("marks hold fewer bytes than the block has pages")
                    keep.append(mk)
                    t[i].marks = &mk[0] if mk.shape[0] else NULL
        except BaseException:
            free(t)
            raise
        free(self.t)
        self.t = t
        self.niov = 0
        self.nblocks = n
        self._keep = keep
        self.current = -1

    def clear_fresh(self):
        """From now on every ZERO record is written (call at the end of the
        pass that sent the fresh blocks whole)."""
        for i in range(self.nblocks):
            self.t[i].fresh = False

    def release(self):
        """Drop the block buffers (so an mmap behind them can be closed)."""
        self.set_blocks([])

    def forget_current(self):
        """Require the next page record to name its block."""
        self.current = -1

    def skip(self, Py_ssize_t nbytes):
        """Account for nbytes of non-page records consumed by the caller."""
        self.position += nbytes

    def apply(self, cbuf data):
        """Apply complete page records from the front of data.

        Returns (consumed, reason): reason NEED_DATA when the rest of data is
        an incomplete record (or nothing), CONTROL when the next record is
        not a page record. Raises RecordError on invalid input.
        """
        cdef Py_ssize_t n = data.shape[0], i = 0, rec, ps = self.page_size
        cdef uint64_t h, flags, kind, offset
        cdef int err = 0, reason = R_NEED_DATA, blk, k, rc = 0
        cdef Py_ssize_t idl, need, xlen
        cdef const uint8_t *src = &data[0] if n else NULL
        cdef uint8_t *page
        cdef size_t at = 0
        cdef uint64_t pend_end
        cdef bint must
        cdef int wr = 0
        with nogil:
            while True:
                rec = i
                if n - i < 8:
                    break
                h = _get_be64(src + i)
                flags = h & F_MASK
                offset = h & ~(<uint64_t>F_MASK)
                if flags & ~(<uint64_t>(F_ZERO | F_MEM_SIZE | F_PAGE | F_EOS | F_CONTINUE | F_XBZRLE | F_CONTROL)):
                    err = E_FLAGS
                    break
                kind = flags & (F_ZERO | F_PAGE | F_XBZRLE | F_MEM_SIZE | F_EOS | F_CONTROL)
                if kind == F_MEM_SIZE or kind == F_EOS or kind == F_CONTROL:
                    if flags & F_CONTINUE:
                        err = E_KIND
                        break
                    reason = R_CONTROL
                    break
                if kind != F_ZERO and kind != F_PAGE and kind != F_XBZRLE:
                    err = E_KIND
                    break
                if kind == F_XBZRLE and not self.allow_xbzrle:
                    err = E_NOT_NEGOTIATED
                    break
                i += 8
                blk = self.current
                if not (flags & F_CONTINUE):
                    if i >= n:
                        i = rec
                        break
                    idl = src[i]
                    if idl == 0:
                        err = E_ID_LEN
                        break
                    if n - i - 1 < idl:
                        i = rec
                        break
                    blk = -1
                    for k in range(self.nblocks):
                        if self.t[k].idlen == idl and memcmp(self.t[k].id, src + i + 1, idl) == 0:
                            blk = k
                            break
                    if blk < 0:
                        err = E_UNKNOWN_BLOCK
                        break
                    i += 1 + idl
                elif blk < 0:
                    err = E_NO_BLOCK
                    break
                if offset % ps:
                    err = E_UNALIGNED
                    break
                # written so that it cannot wrap: offset comes from the peer
                # (up to 2^64 - 512), and a block may be shorter than a page
                if <uint64_t>self.t[blk].length < <uint64_t>ps or \
                        offset > <uint64_t>self.t[blk].length - <uint64_t>ps:
                    err = E_PAST_BLOCK
                    break
                page = self.t[blk].ptr + offset
                # pending writes keep stream order: a record for a page among
                # them (or for another block, or one more than fits) writes
                # them first
                if self.niov:
                    pend_end = self.pend_off + <uint64_t>(self.niov * ps)
                    if kind == F_PAGE and self.t[blk].fresh and self.t[blk].fd >= 0:
                        must = blk != self.pend_blk or offset != pend_end or self.niov == IOV_BATCH
                    else:
                        must = blk == self.pend_blk and self.pend_off <= offset < pend_end
                    if must:
                        wr = self._flush()
                        if wr:
                            break
                if kind == F_ZERO:
                    if i >= n:
                        i = rec
                        break
                    if not (self.t[blk].fresh and src[i] == 0):
                        memset(page, src[i], ps)
                        self._mark(blk, offset)
                    i += 1
                    self.zero_pages += 1
                elif kind == F_PAGE:
                    if n - i < ps:
                        i = rec
                        break
                    if self.t[blk].fresh and self.t[blk].fd >= 0:
                        if self.niov == 0:
                            self.pend_blk = blk
                            self.pend_off = offset
                        self.iov[self.niov].iov_base = <void *>(src + i)
                        self.iov[self.niov].iov_len = ps
                        self.niov += 1
                    else:
                        memcpy(page, src + i, ps)
                        self._mark(blk, offset)
                    i += ps
                    self.normal_pages += 1
                else:
                    if n - i < 3:
                        i = rec
                        break
                    if src[i] != ENCODING_XBZRLE:
                        err = E_ENCODING
                        break
                    xlen = (<Py_ssize_t>src[i + 1] << 8) | src[i + 2]
                    if xlen == 0 or xlen > ps:
                        err = E_XLEN
                        break
                    if n - i - 3 < xlen:
                        i = rec
                        break
                    rc = xb_decode_check(src + i + 3, xlen, ps, &at)
                    if rc:
                        err = E_DELTA
                        break
                    xb_decode_apply(src + i + 3, xlen, page)
                    self._mark(blk, offset)
                    i += 3 + xlen
                    self.xbzrle_pages += 1
                    self.xbzrle_bytes += 3 + xlen
                self.current = blk
            if self.niov:  # the pending pages point into data
                if wr == 0:
                    wr = self._flush()
                self.niov = 0
        if wr:
            self.position += rec
            raise OSError(wr, f"cannot write pages to the image file: {os.strerror(wr)}")
        if err:
            at_stream = self.position + rec
            self.position += rec
            if err == E_DELTA:
                msg = f"invalid XBZRLE delta at byte {at} of the delta: {_DECODE_MESSAGES[rc]}"
            else:
                msg = _RECORD_MESSAGES[err]
            raise RecordError(f"invalid page record at stream offset {at_stream}: {msg}", at_stream)
        self.position += i
        return i, reason


# ---------------------------------------------------------------------------
# Ceilings for the benchmarks, measured the same way as the kernels
# ---------------------------------------------------------------------------

def ceiling_memcmp(cbuf a, cbuf b, Py_ssize_t page_size=4096):
    """memcmp of every page of a against b; returns the count of differing pages."""
    cdef Py_ssize_t n = min(a.shape[0], b.shape[0]) // page_size, i, diff = 0
    with nogil:
        for i in range(n):
            if memcmp(&a[i * page_size], &b[i * page_size], page_size) != 0:
                diff += 1
    return diff


def ceiling_memcpy(wbuf dst, cbuf src, Py_ssize_t page_size=4096):
    """memcpy of every page of src into dst."""
    cdef Py_ssize_t n = min(dst.shape[0], src.shape[0]) // page_size, i
    with nogil:
        for i in range(n):
            memcpy(&dst[i * page_size], &src[i * page_size], page_size)
    return n
