# XBZRLE codec: selection of the changed-byte compare kernel, and the
# encode/decode entry points for one page (encode_into, decode_into) and for
# many pages stored back to back (encode_pages, decode_pages).

KERNELS = ("generic", "avx2", "avx512bw")
xb_set_kernel(xb_best_kernel())

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


def encode_into(cbuf old, cbuf new, wbuf out):
    cdef Py_ssize_t n = new.shape[0]
    cdef ptrdiff_t r
    if old.shape[0] != n:
        raise ValueError(f"old and new pages differ in size ({old.shape[0]} != {n})")
    _check_page_size(n)
    cdef const uint8_t *o = &old[0]
    cdef const uint8_t *w = &new[0]
    cdef uint8_t *dst = &out[0] if out.shape[0] else NULL
    with nogil:
        r = xb_encode(o, w, n, dst, out.shape[0])
    return r


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
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
    cdef const uint8_t *src = &encoded[0]
    cdef uint8_t *dst = &page[0]
    with nogil:
        rc = xb_decode_check(src, slen, n, &at)
        if rc == 0:
            xb_decode_apply(src, slen, dst)
    if rc:
        raise _decode_error(rc, at)


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
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
