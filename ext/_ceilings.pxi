# Ceilings for the benchmarks: memcmp and memcpy over every page, compiled
# the way the kernels are so that the ratios compare like with like.

@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def ceiling_memcmp(cbuf a, cbuf b, Py_ssize_t page_size=4096):
    """memcmp of every page of a against b; returns the count of differing pages."""
    cdef Py_ssize_t n = min(a.shape[0], b.shape[0]) // page_size, i, diff = 0
    with nogil:
        for i in range(n):
            if memcmp(&a[i * page_size], &b[i * page_size], page_size) != 0:
                diff += 1
    return diff


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.initializedcheck(False)
def ceiling_memcpy(wbuf dst, cbuf src, Py_ssize_t page_size=4096):
    """memcpy of every page of src into dst."""
    cdef Py_ssize_t n = min(dst.shape[0], src.shape[0]) // page_size, i
    with nogil:
        for i in range(n):
            memcpy(&dst[i * page_size], &src[i * page_size], page_size)
    return n
