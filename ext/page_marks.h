/*
 * Per-page "written since last hashed" marks, shared by two threads: the
 * receiver's applier marks a page after writing it, and a hasher takes the
 * mark before reading the page. A page written while it is being hashed is
 * marked again afterwards, so its hash is refreshed on the next round.
 */
#ifndef MIGRATED_PAGE_MARKS_H
#define MIGRATED_PAGE_MARKS_H

#include <stdint.h>

static inline void xb_mark(uint8_t *mark)
{
    __atomic_store_n(mark, 1, __ATOMIC_RELEASE);
}

static inline int xb_marked(const uint8_t *mark)
{
    return __atomic_load_n(mark, __ATOMIC_RELAXED);
}

static inline int xb_take(uint8_t *mark)
{
    if (!__atomic_load_n(mark, __ATOMIC_RELAXED))
        return 0;
    return __atomic_exchange_n(mark, 0, __ATOMIC_ACQ_REL);
}

#endif
