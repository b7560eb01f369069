/* A churning child for the process-source tests: random writes (many to pages never
   touched before), runs of pages dropped with MADV_DONTNEED, and a second mapping
   grown and moved with mremap (mode bits 1, 2, 4: drop, grow, remap in place).
   It prints "ready" once set up. Written for a review of the uffd tracking. */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#define PG 4096UL
static uint64_t rng = 88172645463325252ULL;
static inline uint64_t xr(void){ rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
int main(int argc, char **argv) {
    size_t n = 8192;   /* 32 MiB sparse region */
    int thp = argc > 1 && atoi(argv[1]);
    size_t mode = argc > 2 ? atoi(argv[2]) : 7;
    char *a = mmap(NULL, n * PG, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    if (thp) madvise(a, n * PG, MADV_HUGEPAGE);
    for (size_t i = 0; i < n; i += 3) a[i * PG + 100] = 1;    /* a third present */
    size_t bn = 256; char *b = mmap(NULL, bn * PG, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
    memset(b, 0x5a, bn * PG);
    printf("ready\n"); fflush(stdout);
    uint64_t it = 0;
    for (;;) {
        it++;
        uint64_t r = xr();
        size_t p = r % n;
        uint64_t v = xr() | 1;
        memcpy(a + p * PG + (r >> 40) % (PG - 8), &v, 8);           /* writes, many first-touch */
        if ((mode & 1) && it % 2000 == 0) {                          /* drop a run of pages */
            size_t q = xr() % (n - 600);
            madvise(a + q * PG, (1 + xr() % 600) * PG, MADV_DONTNEED);
        }
        if ((mode & 2) && it % 5000 == 0) {                          /* grow/move b */
            size_t nn = bn + 1 + xr() % 64;
            char *nb = mremap(b, bn * PG, nn * PG, MREMAP_MAYMOVE);
            if (nb != MAP_FAILED) { memset(nb + bn * PG, 0x33, (nn - bn) * PG); b = nb; bn = nn; }
        }
        if ((mode & 4) && it % 3000 == 0) {                          /* unmap + remap b at same place, same size */
            char *nb = mmap(b, bn * PG, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED, -1, 0);
            if (nb != MAP_FAILED) memset(nb, (int)(it & 0x7f) | 1, bn * PG);
        }
        if (it % 50 == 0) { struct timespec ts = {0, 20000}; nanosleep(&ts, NULL); }
    }
}
