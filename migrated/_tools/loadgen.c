/* The XBZRLE work's load generator: a 16 MiB zeroed buffer in which one
 * byte every KiB is incremented in an endless loop (4 changed bytes in
 * each 4 KiB page, every page dirtied continuously).
 *
 * It prints the addresses of its buffer and of its loop counter, then
 * loops until killed; migrated's tests and benchmark read both back
 * through /proc/PID/mem (see migrated/_tools/loadgen.py).
 *
 *     cc -O2 -o loadgen loadgen.c && ./loadgen
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define SIZE (16u << 20)
#define STRIDE 1024u

/* volatile: each loop's count is stored, so a reader sees it advance */
static volatile uint64_t loops;

int main(void)
{
    uint8_t *buf = mmap(NULL, SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        perror("loadgen: mmap");
        return 1;
    }
    printf("ready buf=%#" PRIxPTR " size=%u counter=%#" PRIxPTR "\n",
           (uintptr_t)buf, SIZE, (uintptr_t)&loops);
    fflush(stdout);
    for (;;) {
        for (uint32_t i = 0; i < SIZE; i += STRIDE)
            ((volatile uint8_t *)buf)[i]++;
        loops++;
    }
}
