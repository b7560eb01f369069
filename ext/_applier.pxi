# The Applier (receiver side): applies page records to writable block
# buffers, with its error codes and messages and its stop reasons.

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
cpdef enum:
    NEED_DATA = 0    # every complete page record was applied
    CONTROL = 1      # the next record is not a page record (EOS, MEM_SIZE, control)

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

    @cython.cdivision(True)
    cdef inline void _mark(self, int blk, uint64_t offset) noexcept nogil:
        """The page at offset of block blk was written (after the write)."""
        if self.t[blk].marks != NULL:
            xb_mark(&self.t[blk].marks[offset // <uint64_t>self.page_size])

    @cython.cdivision(True)
    cdef inline bint _unwritten(self, int blk, uint64_t offset) noexcept nogil:
        """Whether the page at offset of block blk has no written mark (a
        block without marks keeps none: taken as unwritten)."""
        if self.t[blk].marks == NULL:
            return True
        return not xb_marked(&self.t[blk].marks[offset // <uint64_t>self.page_size])

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
                if not isinstance(bid, bytes) or not _block_id_ok(len(bid)):
                    raise ValueError(f"block ids must be bytes of length 1 to {MAX_BLOCK_ID_LENGTH}")
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

    @cython.cdivision(True)
    def apply(self, cbuf data):
        """Apply complete page records from the front of data.

        Returns (consumed, reason): reason NEED_DATA when the rest of data is
        an incomplete record (or nothing), CONTROL when the next record is
        not a page record. Raises RecordError on invalid input.
        """
        cdef Py_ssize_t n = data.shape[0], i = 0, rec, ps = self.page_size
        cdef uint64_t h, flags, kind, offset
        cdef int err = 0, reason = NEED_DATA, blk, k, rc = 0
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
                flags = h & FLAG_MASK
                offset = h & ~(<uint64_t>FLAG_MASK)
                if flags & ~(<uint64_t>(FLAG_ZERO | FLAG_MEM_SIZE | FLAG_PAGE | FLAG_EOS | FLAG_CONTINUE | FLAG_XBZRLE | FLAG_CONTROL)):
                    err = E_FLAGS
                    break
                kind = flags & (FLAG_ZERO | FLAG_PAGE | FLAG_XBZRLE | FLAG_MEM_SIZE | FLAG_EOS | FLAG_CONTROL)
                if kind == FLAG_MEM_SIZE or kind == FLAG_EOS or kind == FLAG_CONTROL:
                    if flags & FLAG_CONTINUE:
                        err = E_KIND
                        break
                    reason = CONTROL
                    break
                if kind != FLAG_ZERO and kind != FLAG_PAGE and kind != FLAG_XBZRLE:
                    err = E_KIND
                    break
                if kind == FLAG_XBZRLE and not self.allow_xbzrle:
                    err = E_NOT_NEGOTIATED
                    break
                i += 8
                blk = self.current
                if not (flags & FLAG_CONTINUE):
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
                    if kind == FLAG_PAGE and self.t[blk].fresh and self.t[blk].fd >= 0:
                        must = blk != self.pend_blk or offset != pend_end or self.niov == IOV_BATCH
                    else:
                        must = blk == self.pend_blk and self.pend_off <= offset < pend_end
                    if must:
                        wr = self._flush()
                        if wr:
                            break
                if kind == FLAG_ZERO:
                    if i >= n:
                        i = rec
                        break
                    # a fresh block is zeros already, unless this pass wrote
                    # the page (a peer may send a page twice: stream order wins)
                    if not (self.t[blk].fresh and src[i] == 0 and self._unwritten(blk, offset)):
                        memset(page, src[i], ps)
                        self._mark(blk, offset)
                    i += 1
                    self.zero_pages += 1
                elif kind == FLAG_PAGE:
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
