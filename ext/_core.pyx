# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Per-page hot loops of migrated: XBZRLE codec, LRU page cache, page-record
batch encoder and applier, dirty scan.

Every loop over pages or bytes lives here and runs with the GIL released.
Python wrappers in migrated.xbzrle, migrated.cache and migrated.records
check arguments and give the public API; this module is private.

One compiled module, in parts by concept (each .pxi says what it holds).
"""

include "_defs.pxi"
include "_codec.pxi"
include "_pages.pxi"
include "_cache.pxi"
include "_encoder.pxi"
include "_applier.pxi"
include "_ceilings.pxi"
