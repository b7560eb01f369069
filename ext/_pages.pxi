# Pages: the page hash of whole blocks (page_hashes, hash_marked,
# zero_page_hash), the dirty scan, and page lists (page_range, merge_pages,
# select_pages, page_runs, iovecs, page_count).

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


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def page_hashes(cbuf block, Py_ssize_t page_size=4096):
    """Hash of every page of block (the last partial page zero-padded)."""
    cdef Py_ssize_t length = block.shape[0], npages, p
    _check_page_size(page_size)
    npages = (length + page_size - 1) // page_size
    cdef array out = clone(array("Q"), npages, False)
    cdef uint64_t[::1] hv = out
    cdef uint8_t scratch[XB_MAX_PAGE]
    if npages:
        with nogil:
            for p in range(npages):
                hv[p] = _hash_page(&block[0], length, p, page_size, scratch)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def hash_marked(cbuf block, uint8_t[::1] marks, uint64_t[::1] hashes, Py_ssize_t page_size=4096):
    """Hash the pages of block whose mark is set, clearing each mark before
    reading its page (see Applier.set_blocks); returns how many. A page
    marked again meanwhile keeps its mark for the next call."""
    cdef Py_ssize_t length = block.shape[0], npages, p, n = 0
    cdef uint8_t scratch[XB_MAX_PAGE]
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


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def scan(cbuf block, uint64_t[::1] hashes, Py_ssize_t page_size=4096, Py_ssize_t first=0, Py_ssize_t end=-1,
         Py_ssize_t base=0):
    """Pages whose hash differs from hashes[p]; hashes is updated in place.
    Only pages first <= p < end (end -1: the last page) are looked at, so
    parts of one block can be scanned by several threads at once. `block`
    holds the pages from `base` on (base > 0: a piece of a larger block read
    through a buffer): page p is at byte (p - base) * page_size."""
    cdef Py_ssize_t length = block.shape[0], npages, p, n = 0
    cdef uint64_t h
    _check_page_size(page_size)
    if base < 0:
        raise ValueError("base must not be negative")
    npages = base + (length + page_size - 1) // page_size
    if hashes.shape[0] < npages:
        raise ValueError(f"hash array holds {hashes.shape[0]} pages, block has {npages}")
    if end < 0 or end > npages:
        end = npages
    first = min(max(first, base), end)
    cdef array out = clone(array("Q"), end - first, False)
    cdef uint64_t[::1] ov = out
    cdef uint8_t scratch[XB_MAX_PAGE]
    cdef xb_guard_t guard
    if end > first:
        with nogil:
            xb_guard_arm(&guard, &block[0], length)
            for p in range(first, end):
                h = _hash_page(&block[0], length, p - base, page_size, scratch)
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

@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
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


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
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


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def difference_pages(const uint64_t[::1] a, const uint64_t[::1] b):
    """The pages of ascending list a that are not in ascending list b."""
    cdef Py_ssize_t na = a.shape[0], nb = b.shape[0], i = 0, j = 0, n = 0
    cdef array out = clone(array("Q"), na, False)
    cdef uint64_t[::1] ov = out
    if na:
        with nogil:
            while i < na:
                while j < nb and b[j] < a[i]:
                    j += 1
                if j >= nb or b[j] != a[i]:
                    ov[n] = a[i]
                    n += 1
                i += 1
    resize(out, n)
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
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


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def cleared_pages(const uint64_t[::1] before, const uint64_t[::1] now, uint64_t mask):
    """Indexes where an entry of before has a bit of mask set and the same
    entry of now has none (pagemap: pages that went from present or swapped
    to absent). Entries past the shorter array are not compared."""
    cdef Py_ssize_t n = min(before.shape[0], now.shape[0]), i, k = 0
    cdef array out = clone(array("Q"), n, False)
    cdef uint64_t[::1] ov = out
    if n:
        with nogil:
            for i in range(n):
                if (before[i] & mask) != 0 and (now[i] & mask) == 0:
                    ov[k] = i
                    k += 1
    resize(out, k)
    return out


_ZERO_PAGE_HASH = {}  # page size -> page hash of an all-zero page


cpdef uint64_t zero_page_hash(Py_ssize_t page_size) except? 0:
    """The page hash of a page of zero bytes."""
    h = _ZERO_PAGE_HASH.get(page_size)
    if h is None:
        _check_page_size(page_size)
        zeros = bytes(page_size)
        h = _ZERO_PAGE_HASH[page_size] = xb_page_hash(<const uint8_t *><const char *>zeros, page_size)
    return h


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def gather_iovecs(wbuf into, const uint64_t[::1] pages, const uint64_t[::1] zeros, uint64_t remote_base,
                  Py_ssize_t page_size):
    """To read `pages` (ascending) of a mapping at remote_base into `into`,
    page i of the list at byte i * page_size: (local, remote) struct iovec
    arrays (pointer, length pairs, as array('Q')) for process_vm_readv, runs
    of consecutive pages merged. Pages also in `zeros` (ascending: pages
    known to be zero) are not read: their places are zero-filled here."""
    cdef Py_ssize_t n = pages.shape[0], nz = zeros.shape[0], i, j = 0, k = 0
    _check_page_size(page_size)
    if into.shape[0] // page_size < n:
        raise ValueError(f"buffer of {into.shape[0]} bytes is too small for {n} pages")
    cdef array local = clone(array("Q"), 2 * n, False)
    cdef array remote = clone(array("Q"), 2 * n, False)
    cdef uint64_t[::1] lv = local
    cdef uint64_t[::1] rv = remote
    cdef uint64_t base = <uint64_t>&into[0] if n else 0, la, ra, ps = page_size
    if n:
        with nogil:
            for i in range(n):
                while j < nz and zeros[j] < pages[i]:
                    j += 1
                la = base + <uint64_t>i * ps
                if j < nz and zeros[j] == pages[i]:
                    memset(<void *>la, 0, ps)
                    continue
                ra = remote_base + pages[i] * ps
                if k and lv[2 * k - 2] + lv[2 * k - 1] == la and rv[2 * k - 2] + rv[2 * k - 1] == ra:
                    lv[2 * k - 1] += ps
                    rv[2 * k - 1] += ps
                else:
                    lv[2 * k] = la
                    rv[2 * k] = ra
                    lv[2 * k + 1] = ps
                    rv[2 * k + 1] = ps
                    k += 1
    resize(local, 2 * k)
    resize(remote, 2 * k)
    return local, remote


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def region_pages(array out, const uint64_t[::1] regions, Py_ssize_t count, uint64_t base, Py_ssize_t page_size):
    """Append to `out` the page numbers (from `base`) of the first `count`
    regions of a PAGEMAP_SCAN answer: (start, end, categories) triples of
    page-aligned addresses. Pages at or before the last one in `out` are
    skipped, so `out` stays ascending and without repeats even when a scan
    restarted inside a region it had already returned."""
    cdef Py_ssize_t i, k, n = 0, at = len(out)
    cdef uint64_t p, first, last, nxt, start_nxt, ps = page_size
    cdef uint64_t[::1] ov
    _check_page_size(page_size)
    if count < 0 or count > regions.shape[0] // 3:
        raise ValueError("more regions than the buffer holds")
    if base % ps:
        raise ValueError("base must be page-aligned")
    if at:
        ov = out
        start_nxt = ov[at - 1] + 1
    else:
        start_nxt = 0
    nxt = start_nxt
    for i in range(count):
        if regions[3 * i] < base or regions[3 * i + 1] < regions[3 * i]:
            raise ValueError("a region outside the range scanned")
        if regions[3 * i] % ps or regions[3 * i + 1] % ps:
            raise ValueError("a region that is not page-aligned")
        first = max((regions[3 * i] - base) // ps, nxt)
        last = (regions[3 * i + 1] - base) // ps
        if last > first:
            n += <Py_ssize_t>(last - first)
            nxt = last
    resize(out, at + n)
    ov = out
    k = at
    nxt = start_nxt
    with nogil:
        for i in range(count):
            first = max((regions[3 * i] - base) // ps, nxt)
            last = (regions[3 * i + 1] - base) // ps
            if last > first:
                for p in range(first, last):
                    ov[k] = p
                    k += 1
                nxt = last
    return out
