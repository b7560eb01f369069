# cython: language_level=3
"""Per-page hot loops of migrated: XBZRLE codec, LRU page cache, page-record
batch encoder and applier, dirty scan.

Every loop over pages or bytes lives here and runs with the GIL released.
Python wrappers in migrated.xbzrle, migrated.cache and migrated.records
check arguments and give the public API; this module is private.

One compiled module, in parts by concept (each .pxi says what it holds).
Bounds, wraparound and initialization checks are off, and C division on,
only on the kernels whose loops need it (by decorator); everything else
keeps Cython's default checks.
"""

include "_defs.pxi"
include "_codec.pxi"
include "_pages.pxi"
include "_cache.pxi"
include "_encoder.pxi"
include "_applier.pxi"
include "_ceilings.pxi"
