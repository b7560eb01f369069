/*
 * XBZRLE page kernels: delta encoder, validating decoder, page hash.
 *
 * The format is described in docs/format.md. Everything here works on one
 * page at a time with no allocation, takes no Python objects and is called
 * by ext/_core.pyx with the GIL released.
 *
 * The encoder builds a bitmap of changed bytes with the widest compare the
 * CPU has (AVX-512BW, AVX2, or 64-bit words), folds one-byte unchanged gaps
 * into the surrounding changed runs on the bitmap, rejects pages whose
 * encoding cannot fit from a popcount lower bound, and only then walks the
 * runs with count-trailing-zeros to emit pairs.
 */
#ifndef MIGRATED_XBZRLE_KERNEL_H
#define MIGRATED_XBZRLE_KERNEL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define XB_X86 1
#endif

#define XB_MAX_PAGE 16384
#define XB_MAX_RUN 16383 /* largest length a 2-byte ULEB128 holds */

/* Decoder error codes (negative return values of xb_decode_check). */
#define XB_ERR_LEN_TRUNCATED -1   /* ULEB128 runs past the end of the input */
#define XB_ERR_LEN_TOO_LONG -2    /* ULEB128 longer than 2 bytes */
#define XB_ERR_ZERO_ZRUN -3       /* zrun of 0 after the first pair */
#define XB_ERR_ZERO_NZRUN -4      /* nzrun of 0 */
#define XB_ERR_PAST_PAGE -5       /* run goes past the end of the page */
#define XB_ERR_DATA_TRUNCATED -6  /* nzrun bytes run past the end of input */
#define XB_ERR_MISSING_NZRUN -7   /* input ends between a zrun and its nzrun */

/* ------------------------------------------------------------------ */
/* Changed-byte bitmaps: bit i of map is set when a[i] != b[i].        */
/* n is a multiple of 64. Returns the OR of all words (0: identical).  */
/* ------------------------------------------------------------------ */

/* The 8 bytes at p as a little-endian word (byte k is bits 8k..8k+7), on
 * hosts of either byte order: the page hash and the byte-to-bit mapping of
 * the changed-byte bitmaps both depend on it. One load on little-endian. */
static inline uint64_t xb_load64_le(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Pages are compared from memory much larger than the caches: asking for
 * the lines 2 KiB ahead keeps enough loads in flight to run at memcmp's
 * speed. A prefetch never faults, so reading ahead past a page is safe. */
#define XB_PREFETCH 2048
static inline __attribute__((always_inline)) void xb_prefetch(const uint8_t *p)
{
    __builtin_prefetch(p + XB_PREFETCH, 0, 3);
}

static inline uint64_t xb_nonzero_bytes(uint64_t x)
{
    /* high bit of each byte set when that byte is non-zero */
    uint64_t y = ((x & 0x7f7f7f7f7f7f7f7fULL) + 0x7f7f7f7f7f7f7f7fULL) | x;
    y &= 0x8080808080808080ULL;
    /* gather the 8 high bits into one byte, byte k -> bit k */
    return ((y >> 7) * 0x0102040810204080ULL) >> 56;
}

static inline __attribute__((always_inline)) uint64_t xb_diffmap_generic(const uint8_t *a, const uint8_t *b,
                                   size_t n, uint64_t *map)
{
    uint64_t any = 0;
    for (size_t i = 0; i < n; i += 64) {
        uint64_t m = 0;
        xb_prefetch(a + i);
        xb_prefetch(b + i);
        for (int j = 0; j < 8; j++) {
            uint64_t x = xb_load64_le(a + i + 8 * j) ^ xb_load64_le(b + i + 8 * j);
            if (x)
                m |= xb_nonzero_bytes(x) << (8 * j);
        }
        map[i >> 6] = m;
        any |= m;
    }
    return any;
}

#ifdef XB_X86
__attribute__((target("avx2,popcnt,bmi,bmi2"), always_inline)) static inline uint64_t
xb_diffmap_avx2(const uint8_t *a, const uint8_t *b, size_t n, uint64_t *map)
{
    uint64_t any = 0;
    for (size_t i = 0; i < n; i += 64) {
        xb_prefetch(a + i);
        xb_prefetch(b + i);
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(a + i));
        __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + i));
        __m256i a1 = _mm256_loadu_si256((const __m256i *)(a + i + 32));
        __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + i + 32));
        uint32_t e0 = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a0, b0));
        uint32_t e1 = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a1, b1));
        uint64_t m = ~(((uint64_t)e1 << 32) | e0);
        map[i >> 6] = m;
        any |= m;
    }
    return any;
}

__attribute__((target("avx512f,avx512bw,avx2,popcnt,bmi,bmi2"), always_inline)) static inline uint64_t
xb_diffmap_avx512(const uint8_t *a, const uint8_t *b, size_t n, uint64_t *map)
{
    /* four independent 64-byte compares per step (page sizes are multiples
     * of 512): more loads in flight, as a good memcmp has */
    uint64_t any = 0;
    for (size_t i = 0; i < n; i += 256) {
        for (int k = 0; k < 256; k += 64) {
            xb_prefetch(a + i + k);
            xb_prefetch(b + i + k);
        }
        uint64_t m0 = (uint64_t)_mm512_cmpneq_epi8_mask(_mm512_loadu_si512((const void *)(a + i)),
                                                        _mm512_loadu_si512((const void *)(b + i)));
        uint64_t m1 = (uint64_t)_mm512_cmpneq_epi8_mask(_mm512_loadu_si512((const void *)(a + i + 64)),
                                                        _mm512_loadu_si512((const void *)(b + i + 64)));
        uint64_t m2 = (uint64_t)_mm512_cmpneq_epi8_mask(_mm512_loadu_si512((const void *)(a + i + 128)),
                                                        _mm512_loadu_si512((const void *)(b + i + 128)));
        uint64_t m3 = (uint64_t)_mm512_cmpneq_epi8_mask(_mm512_loadu_si512((const void *)(a + i + 192)),
                                                        _mm512_loadu_si512((const void *)(b + i + 192)));
        map[(i >> 6) + 0] = m0;
        map[(i >> 6) + 1] = m1;
        map[(i >> 6) + 2] = m2;
        map[(i >> 6) + 3] = m3;
        any |= m0 | m1 | m2 | m3;
    }
    return any;
}
#endif

/* ------------------------------------------------------------------ */
/* Encoder                                                             */
/* ------------------------------------------------------------------ */

static inline size_t xb_uleb_size(size_t v) { return v < 128 ? 1 : 2; }

static inline size_t xb_put_uleb(uint8_t *p, size_t v)
{
    if (v < 128) {
        p[0] = (uint8_t)v;
        return 1;
    }
    p[0] = (uint8_t)((v & 0x7f) | 0x80);
    p[1] = (uint8_t)(v >> 7);
    return 2;
}

/* first set bit at or after pos, or nbits */
static inline __attribute__((always_inline)) size_t xb_next_set(const uint64_t *map, size_t nw, size_t pos)
{
    size_t w = pos >> 6;
    if (w >= nw)
        return nw << 6;
    uint64_t m = map[w] & (~0ULL << (pos & 63));
    while (!m) {
        if (++w >= nw)
            return nw << 6;
        m = map[w];
    }
    return (w << 6) + (size_t)__builtin_ctzll(m);
}

/* first clear bit at or after pos, or nbits */
static inline __attribute__((always_inline)) size_t xb_next_clear(const uint64_t *map, size_t nw, size_t pos)
{
    size_t w = pos >> 6;
    if (w >= nw)
        return nw << 6;
    uint64_t m = ~map[w] & (~0ULL << (pos & 63));
    while (!m) {
        if (++w >= nw)
            return nw << 6;
        m = ~map[w];
    }
    return (w << 6) + (size_t)__builtin_ctzll(m);
}

/*
 * Encode the change from old to new (n bytes, a multiple of 64, at most
 * XB_MAX_PAGE) into out, writing at most limit bytes. Returns the encoded
 * length (0: unchanged) or -1 when the encoding would exceed limit.
 *
 * Runs separated by one unchanged byte are always joined (never longer than
 * the canonical form). Runs separated by two unchanged bytes are joined when
 * the joined run's length header stays as short as the parts' headers: the
 * current run already needs a 2-byte length, or the joined run still fits
 * in one. With these two rules the output is never longer than the
 * canonical encoding (see docs/format.md for the argument).
 */
/* Copy a run of len new bytes. A short run is copied as one fixed 32-byte
 * move when both sides have the room (out_room bytes writable, src_room
 * readable); the excess is overwritten later or lies past the returned
 * length. */
static inline __attribute__((always_inline)) void
xb_copy_run(uint8_t *dst, const uint8_t *src, size_t len, size_t out_room,
            size_t src_room)
{
    if (len <= 32 && out_room >= 32 && src_room >= 32)
        memcpy(dst, src, 32);
    else
        memcpy(dst, src, len);
}

static inline __attribute__((always_inline)) size_t xb_ctz(uint64_t t)
{
    return t ? (size_t)__builtin_ctzll(t) : 64;
}

/*
 * Fast emitter for pages with many runs. map has 1-byte gaps folded; here
 * 2-byte gaps are folded too (on the fly), run boundaries are extracted with
 * count-trailing-zeros, and pairs are emitted with few data-dependent
 * branches. Joining across 2-byte gaps is never longer than canonical while
 * every joined run stays under 128 bytes; when a run reaches 128 this
 * returns -2 and the caller takes the exact path. -1: overflow.
 */
static inline __attribute__((always_inline)) ptrdiff_t
xb_emit_fast(const uint64_t *map, size_t nw, const uint8_t *new_, size_t n,
             uint8_t *out, size_t limit)
{
    uint16_t bnd[XB_MAX_PAGE + 72];
    size_t k = 0;
    uint64_t p1 = 0, p2 = 0; /* previous 1-folded word, previous 2-folded */
    for (size_t w = 0; w < nw; w++) {
        uint64_t m = map[w];
        uint64_t nx = (w + 1 < nw) ? map[w + 1] : 0;
        /* bit i of l1/l2: byte i-1/i-2 changed; r1/r2: byte i+1/i+2 */
        uint64_t l1 = (m << 1) | (p1 >> 63), l2 = (m << 2) | (p1 >> 62);
        uint64_t r1 = (m >> 1) | (nx << 63), r2 = (m >> 2) | (nx << 62);
        uint64_t m2 = m | (l1 & r2) | (l2 & r1);
        uint64_t t = m2 ^ ((m2 << 1) | (p2 >> 63));
        p1 = m;
        p2 = m2;
        if (!t)
            continue;
        size_t cnt = (size_t)__builtin_popcountll(t);
        uint16_t base = (uint16_t)(w << 6);
        uint16_t *dst = bnd + k;
        for (int j = 0; j < 8; j++) {
            dst[j] = (uint16_t)(base + xb_ctz(t));
            t &= t - 1;
        }
        for (size_t j = 8; j < cnt; j++) {
            dst[j] = (uint16_t)(base + xb_ctz(t));
            t &= t - 1;
        }
        k += cnt;
    }
    if (p2 >> 63)
        bnd[k++] = (uint16_t)n; /* the last run reaches the end of the page */

    size_t d = 0, pos = 0;
    for (size_t r = 0; r < k; r += 2) {
        size_t s = bnd[r], e = bnd[r + 1];
        size_t z = s - pos, len = e - s;
        if (len >= 128)
            return -2; /* 2-byte gaps may have been joined past 128 */
        if (d + xb_uleb_size(z) + 1 + len > limit)
            return -1;
        d += xb_put_uleb(out + d, z);
        out[d++] = (uint8_t)len;
        xb_copy_run(out + d, new_ + s, len, limit - d, n - s);
        d += len;
        pos = e;
    }
    return (ptrdiff_t)d;
}

typedef uint64_t (*xb_diffmap_fn)(const uint8_t *, const uint8_t *, size_t,
                                  uint64_t *);

static inline __attribute__((always_inline)) ptrdiff_t
xb_encode_body(const uint8_t *old, const uint8_t *new_, size_t n, uint8_t *out,
               size_t limit, xb_diffmap_fn diffmap)
{
    uint64_t map[XB_MAX_PAGE / 64];
    size_t nw = n >> 6;

    if (!diffmap(old, new_, n, map))
        return 0;

    /* fold 1-byte gaps; count changed bytes and runs for a lower bound */
    size_t changed = 0, runs = 0;
    uint64_t prev_raw = 0, prev_folded = 0;
    for (size_t w = 0; w < nw; w++) {
        uint64_t m = map[w];
        if (!m) {
            /* an unchanged word stays unchanged: a gap needs changes on both sides */
            prev_raw = prev_folded = 0;
            continue;
        }
        uint64_t next = (w + 1 < nw) ? map[w + 1] : 0;
        uint64_t left = (m << 1) | (prev_raw >> 63);  /* bit i: byte i-1 */
        uint64_t right = (m >> 1) | (next << 63);     /* bit i: byte i+1 */
        prev_raw = m;
        m |= left & right;
        map[w] = m;
        changed += (size_t)__builtin_popcountll(m);
        runs += (size_t)__builtin_popcountll(
            m & ~((m << 1) | (prev_folded >> 63)));
        prev_folded = m;
    }
    /* every changed byte is sent, every pair costs at least 2 header bytes */
    if (changed + 2 * runs > limit)
        return -1;

    if (runs > 8) {
        ptrdiff_t r = xb_emit_fast(map, nw, new_, n, out, limit);
        if (r != -2)
            return r;
    }

    size_t d = 0, pos = 0;
    size_t start = xb_next_set(map, nw, 0);
    while (start < n) {
        size_t end = xb_next_clear(map, nw, start);
        /* join runs across 2-byte gaps when it does not cost a byte */
        while (end + 2 < n) {
            size_t ns = xb_next_set(map, nw, end);
            if (ns - end != 2)
                break;
            size_t ne = xb_next_clear(map, nw, ns);
            size_t cur = end - start, joined = ne - start;
            if (joined > XB_MAX_RUN || (cur < 128 && joined >= 128))
                break;
            end = ne;
        }
        size_t len = end - start, zrun = start - pos;
        if (len > XB_MAX_RUN)
            return -1; /* a fully changed 16 KiB page: send it raw */
        if (d + xb_uleb_size(zrun) + xb_uleb_size(len) + len > limit)
            return -1;
        d += xb_put_uleb(out + d, zrun);
        d += xb_put_uleb(out + d, len);
        xb_copy_run(out + d, new_ + start, len, limit - d, n - start);
        d += len;
        pos = end;
        start = xb_next_set(map, nw, end);
    }
    return (ptrdiff_t)d;
}

static ptrdiff_t xb_encode_generic(const uint8_t *old, const uint8_t *new_,
                                   size_t n, uint8_t *out, size_t limit)
{
    return xb_encode_body(old, new_, n, out, limit, xb_diffmap_generic);
}

#ifdef XB_X86
__attribute__((target("avx2,popcnt,bmi,bmi2"))) static ptrdiff_t
xb_encode_avx2(const uint8_t *old, const uint8_t *new_, size_t n, uint8_t *out,
               size_t limit)
{
    return xb_encode_body(old, new_, n, out, limit, xb_diffmap_avx2);
}

__attribute__((target("avx512f,avx512bw,avx2,popcnt,bmi,bmi2"))) static ptrdiff_t
xb_encode_avx512(const uint8_t *old, const uint8_t *new_, size_t n,
                 uint8_t *out, size_t limit)
{
    return xb_encode_body(old, new_, n, out, limit, xb_diffmap_avx512);
}
#endif

typedef ptrdiff_t (*xb_encode_fn)(const uint8_t *, const uint8_t *, size_t,
                                  uint8_t *, size_t);

/* Kernel selection: 0 generic, 1 avx2, 2 avx512bw. */
static xb_encode_fn xb_encode = xb_encode_generic;
static int xb_kernel_id = 0;

static int xb_kernel_supported(int id)
{
    if (id == 0)
        return 1;
#ifdef XB_X86
    __builtin_cpu_init();
    int base = __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") &&
               __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx2");
    if (id == 1)
        return base;
    if (id == 2)
        return base && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512f");
#endif
    return 0;
}

static int xb_set_kernel(int id)
{
    if (!xb_kernel_supported(id))
        return -1;
#ifdef XB_X86
    if (id == 1) {
        xb_encode = xb_encode_avx2;
        xb_kernel_id = 1;
        return 0;
    }
    if (id == 2) {
        xb_encode = xb_encode_avx512;
        xb_kernel_id = 2;
        return 0;
    }
#endif
    xb_encode = xb_encode_generic;
    xb_kernel_id = 0;
    return 0;
}

static int xb_best_kernel(void)
{
    for (int id = 2; id > 0; id--)
        if (xb_kernel_supported(id))
            return id;
    return 0;
}

/* ------------------------------------------------------------------ */
/* Decoder: validate first, then apply.                                 */
/* ------------------------------------------------------------------ */

static inline int xb_get_uleb(const uint8_t *src, size_t slen, size_t *i,
                              size_t *value)
{
    if (*i >= slen)
        return XB_ERR_LEN_TRUNCATED;
    uint8_t b0 = src[*i];
    if (!(b0 & 0x80)) {
        *value = b0;
        *i += 1;
        return 0;
    }
    if (*i + 1 >= slen)
        return XB_ERR_LEN_TRUNCATED;
    uint8_t b1 = src[*i + 1];
    if (b1 & 0x80)
        return XB_ERR_LEN_TOO_LONG;
    *value = (size_t)(b0 & 0x7f) | ((size_t)b1 << 7);
    *i += 2;
    return 0;
}

/* Returns 0 when src is a valid delta for a page of n bytes; otherwise a
 * negative XB_ERR_* code with *err_at set to the offending input offset. */
static int xb_decode_check(const uint8_t *src, size_t slen, size_t n,
                           size_t *err_at)
{
    size_t i = 0, d = 0, count;
    int first = 1, rc;
    while (i < slen) {
        size_t at = i;
        if ((rc = xb_get_uleb(src, slen, &i, &count)) < 0) {
            *err_at = at;
            return rc;
        }
        if (count == 0 && !first) {
            *err_at = at;
            return XB_ERR_ZERO_ZRUN;
        }
        first = 0;
        if (count > n - d) {
            *err_at = at;
            return XB_ERR_PAST_PAGE;
        }
        d += count;
        if (i >= slen) {
            *err_at = i;
            return XB_ERR_MISSING_NZRUN;
        }
        at = i;
        if ((rc = xb_get_uleb(src, slen, &i, &count)) < 0) {
            *err_at = at;
            return rc;
        }
        if (count == 0) {
            *err_at = at;
            return XB_ERR_ZERO_NZRUN;
        }
        if (count > n - d) {
            *err_at = at;
            return XB_ERR_PAST_PAGE;
        }
        if (count > slen - i) {
            *err_at = i;
            return XB_ERR_DATA_TRUNCATED;
        }
        i += count;
        d += count;
    }
    return 0;
}

/* Apply a delta already accepted by xb_decode_check. */
static void xb_decode_apply(const uint8_t *src, size_t slen, uint8_t *page)
{
    size_t i = 0, d = 0, count = 0;
    while (i < slen) {
        xb_get_uleb(src, slen, &i, &count);
        d += count;
        xb_get_uleb(src, slen, &i, &count);
        memcpy(page + d, src + i, count);
        i += count;
        d += count;
    }
}

/* ------------------------------------------------------------------ */
/* Page hash: four independent multiply-rotate lanes over little-endian */
/* 8-byte words, then an avalanche. Used for the dirty scan and the     */
/* image digest. n is a multiple of 32.                                 */
/* ------------------------------------------------------------------ */

#define XB_P1 0x9E3779B185EBCA87ULL
#define XB_P2 0xC2B2AE3D27D4EB4FULL
#define XB_P3 0x165667B19E3779F9ULL
#define XB_P4 0x85EBCA77C2B2AE63ULL

static inline uint64_t xb_rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t xb_lane(uint64_t acc, uint64_t w)
{
    acc += w * XB_P2;
    return xb_rotl(acc, 31) * XB_P1;
}

static uint64_t xb_page_hash(const uint8_t *p, size_t n)
{
    uint64_t a0 = XB_P1 + XB_P2, a1 = XB_P2, a2 = 0, a3 = 0 - XB_P1;
    for (size_t i = 0; i < n; i += 32) {
        if (!(i & 63))
            xb_prefetch(p + i);
        a0 = xb_lane(a0, xb_load64_le(p + i));
        a1 = xb_lane(a1, xb_load64_le(p + i + 8));
        a2 = xb_lane(a2, xb_load64_le(p + i + 16));
        a3 = xb_lane(a3, xb_load64_le(p + i + 24));
    }
    uint64_t h = xb_rotl(a0, 1) + xb_rotl(a1, 7) + xb_rotl(a2, 12) +
                 xb_rotl(a3, 18);
    h = (h ^ xb_lane(0, a0)) * XB_P1 + XB_P4;
    h = (h ^ xb_lane(0, a1)) * XB_P1 + XB_P4;
    h = (h ^ xb_lane(0, a2)) * XB_P1 + XB_P4;
    h = (h ^ xb_lane(0, a3)) * XB_P1 + XB_P4;
    h += (uint64_t)n;
    h ^= h >> 33;
    h *= XB_P2;
    h ^= h >> 29;
    h *= XB_P3;
    h ^= h >> 32;
    return h;
}

/* 1 when every byte of p[0..n) equals p[0] */
static inline int xb_is_uniform(const uint8_t *p, size_t n)
{
    return p[0] == p[n - 1] && memcmp(p, p + 1, n - 1) == 0;
}

/* 1 when every byte of p[0..n) is zero */
static inline int xb_is_zero(const uint8_t *p, size_t n)
{
    return p[0] == 0 && p[n - 1] == 0 && memcmp(p, p + 1, n - 1) == 0;
}

#endif
