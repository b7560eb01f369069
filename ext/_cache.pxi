# The LRU PageCache of last-sent pages, keyed by page_key(); the batch
# encoder uses its cdef methods with the GIL released.

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
