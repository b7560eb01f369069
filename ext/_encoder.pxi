# The batch encoder: encode_batch frames the page records for a list of
# pages of one block (cache lookups, XBZRLE deltas, zero pages, hashes);
# encode_capacity, BATCH_COUNTERS and the big-endian header helpers.

# batch options
cpdef enum:
    OPTION_XBZRLE = 1      # delta-encode cache hits
    OPTION_LOOKUP = 2      # look pages up in the cache (off in a first pass)
    OPTION_INSERT = 4      # cache pages sent raw

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


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def encode_batch(PageCache cache, uint64_t block_index, bytes block_id, cbuf block,
                 const uint64_t[::1] pages, int options, hashes=None, into=None,
                 Py_ssize_t gathered_pages=-1):
    """Frame the records for `pages` of one block into a new bytearray, or
    into `into` (a writable buffer of at least encode_capacity() bytes).

    `block` is the whole block (page p at byte p * page size), or, with
    gathered_pages >= 0, just the batch's pages read into a buffer in order
    (page i of `pages` at byte i * page size) of a block of gathered_pages
    pages: a source that does not keep a copy of its memory reads each batch
    into one reused buffer.

    Returns (data, counters): data is the bytearray, or a memoryview of the
    used part of `into`; counters are ordered as BATCH_COUNTERS.
    """
    cdef Py_ssize_t ps = cache.page_size, length = block.shape[0]
    cdef Py_ssize_t n = pages.shape[0], i, idlen = len(block_id)
    cdef bint gathered = gathered_pages >= 0
    cdef Py_ssize_t npages_block = gathered_pages if gathered else (length + ps - 1) // ps
    if gathered and length // ps < n:
        raise ValueError(f"gathered buffer of {length} bytes is too small for {n} pages")
    cdef Py_ssize_t limit = ps - 3       # an XBZRLE record never outgrows a PAGE record
    cdef uint64_t[::1] hv
    cdef bint with_hashes = hashes is not None
    cdef uint64_t p
    if not _block_id_ok(idlen):
        raise ValueError(f"block id must be 1 to {MAX_BLOCK_ID_LENGTH} bytes")
    if block_index >= KEY_BLOCK_LIMIT:
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
    cdef Py_ssize_t at
    cdef uint64_t zero_hash = zero_page_hash(ps)
    cdef xb_guard_t guard
    with nogil:
        xb_guard_arm(&guard, &block[0] if length else NULL, length)
        for i in range(n):
            p = pages[i]
            key = _page_key(block_index, p)
            flags = 0 if first else FLAG_CONTINUE
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
            at = i * ps if gathered else <Py_ssize_t>p * ps
            avail = ps if gathered else length - at
            if avail >= ps and xb_is_zero(&block[at], ps):
                # A zero page needs no snapshot: what is sent (fill 0), hashed
                # and cached is the constant, whatever a writer does meanwhile
                if with_hashes:
                    hv[p] = zero_hash
                flags |= FLAG_ZERO
                out[d] = 0
                d += 1
                c_zero += 1
                if use_cache:
                    cache.store(key, NULL, 0)
                _put_be64(out + hdr, (<uint64_t>p * ps) | flags)
                first = False
                continue
            if avail >= ps:
                memcpy(pg, &block[at], ps)
            else:
                memcpy(pg, &block[at], avail)
                memset(pg + avail, 0, ps - avail)
            if xb_is_uniform(pg, ps):
                if with_hashes:
                    hv[p] = zero_hash if pg[0] == 0 else xb_page_hash(pg, ps)
                flags |= FLAG_ZERO
                # out[d] is pg[0] already: the fill byte
                d += 1
                c_zero += 1
                if use_cache:
                    cache.store(key, NULL, pg[0])
            else:
                if with_hashes:
                    hv[p] = xb_page_hash(pg, ps)
                e = -1
                if use_cache and (options & OPTION_LOOKUP):
                    c_lookups += 1
                    e = cache.lookup(key)
                    if e < 0:
                        c_miss += 1
                if e >= 0 and (options & OPTION_XBZRLE):
                    memcpy(snap, pg, ps)
                    r = xb_encode(cache.data(e), snap, ps, out + d + 3, limit)
                    if r == 0:
                        # the receiver already holds exactly this page
                        c_unchanged += 1
                        d = hdr
                        continue
                    cache.store(key, snap, 0)
                    if r > 0:
                        flags |= FLAG_XBZRLE
                        out[d] = ENCODING_XBZRLE
                        out[d + 1] = <uint8_t>(r >> 8)
                        out[d + 2] = <uint8_t>r
                        d += 3 + r
                        c_xpages += 1
                        c_xbytes += 3 + r
                    else:
                        c_overflow += 1
                        flags |= FLAG_PAGE
                        memcpy(out + d, snap, ps)  # the failed delta wrote over it
                        d += ps
                        c_normal += 1
                else:
                    flags |= FLAG_PAGE
                    if use_cache:
                        if options & OPTION_INSERT and options & OPTION_XBZRLE:
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
