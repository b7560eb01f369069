/*
 * Reading a mapped file that shrinks underneath: survive it, and say so.
 *
 * A file source is mapped shared. When a writer truncates the file while a
 * pass reads it, an access past the new end raises SIGBUS, whose default
 * action kills the sender with no word of why. A loop that reads a source
 * arms a guard for the range it reads (one per thread); the SIGBUS handler
 * maps a private zero page over the faulting page of an armed range, counts
 * the fault and lets the access run again. After the loop the caller sees
 * the count and fails the pass with a clear error; the patched mapping is
 * only ever closed after that.
 *
 * A SIGBUS anywhere else goes to the handler that was there before (Python's
 * faulthandler, or the default action, which kills the process).
 */
#ifndef MIGRATED_FAULT_GUARD_H
#define MIGRATED_FAULT_GUARD_H

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    const uint8_t *lo, *hi;  /* the armed range */
    uint64_t faults;
    uintptr_t first;         /* address of the first fault */
} xb_guard_t;

static __thread xb_guard_t *xb_guard_current;
static struct sigaction xb_guard_previous;
static uintptr_t xb_guard_page = 4096;

static void xb_guard_handler(int sig, siginfo_t *si, void *uc)
{
    xb_guard_t *g = xb_guard_current;
    const uint8_t *a = (const uint8_t *)si->si_addr;
    if (g && si->si_code == BUS_ADRERR && a >= g->lo && a < g->hi) {
        int saved = errno;
        void *page = (void *)((uintptr_t)a & ~(xb_guard_page - 1));
        void *r = mmap(page, xb_guard_page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        errno = saved;
        if (r != MAP_FAILED) {
            if (g->faults++ == 0)
                g->first = (uintptr_t)a;
            return; /* the access runs again and reads zeros */
        }
    }
    if (xb_guard_previous.sa_flags & SA_SIGINFO) {
        xb_guard_previous.sa_sigaction(sig, si, uc);
    } else if (xb_guard_previous.sa_handler != SIG_DFL && xb_guard_previous.sa_handler != SIG_IGN) {
        xb_guard_previous.sa_handler(sig);
    } else {
        /* the access faults again on return, now with the default action */
        signal(sig, SIG_DFL);
    }
}

/* Install the handler once, when the module loads; 0, or -1 with errno set.
 * A handler installed later (faulthandler.enable() after the import) runs
 * first and ends the process on any SIGBUS, guarded or not. */
static int xb_guard_install(void)
{
    struct sigaction sa;
    long ps = sysconf(_SC_PAGESIZE);
    if (ps > 0)
        xb_guard_page = (uintptr_t)ps;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = xb_guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &xb_guard_previous);
}

static inline void xb_guard_arm(xb_guard_t *g, const uint8_t *p, size_t n)
{
    g->lo = p;
    g->hi = p + n;
    g->faults = 0;
    g->first = 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    xb_guard_current = g;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static inline void xb_guard_disarm(void)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    xb_guard_current = NULL;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

#endif
