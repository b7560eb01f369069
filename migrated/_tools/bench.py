"""Benchmarks of the data-plane core, as ratios to ceilings measured in the
same run (memcmp and memcpy of 4 KiB pages over the same working set).

Figures are MB/s of page data (pages processed x page size / seconds), the
best of several repetitions. Each operation's ratio is taken against a
memcmp timed right before each of its repetitions, so that the drift of a
shared machine between one operation and the next does not count. Nothing here asserts a time: the targets are
printed next to the figures for a human (or CI log reader) to compare.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from migrated import _core, records
from migrated.cache import PageCache
from migrated.pages import page_hashes, page_numbers, scan
from migrated.records import encode_batch

PAGE = 4096
TEMPLATE = 1 << 20  # workloads are built on 1 MiB and tiled over the working set


@dataclass(frozen=True)
class Workload:
    name: str
    describe: str
    mutate: Callable[[bytearray, random.Random], None]


def _scatter(fraction: float) -> Callable[[bytearray, random.Random], None]:
    def mutate(buf: bytearray, rng: random.Random) -> None:
        for pos in rng.sample(range(len(buf)), int(len(buf) * fraction)):
            buf[pos] ^= rng.randrange(1, 256)

    return mutate


def _every(step: int, width: int) -> Callable[[bytearray, random.Random], None]:
    def mutate(buf: bytearray, rng: random.Random) -> None:
        for start in range(0, len(buf), step):
            for i in range(start, start + width):
                buf[i] ^= 0xFF

    return mutate


def _run64(buf: bytearray, rng: random.Random) -> None:
    for base in range(0, len(buf), PAGE):
        at = base + rng.randrange(0, PAGE - 64)
        buf[at : at + 64] = bytes(b ^ 0xA5 for b in buf[at : at + 64])


def _seed(buf: bytearray, rng: random.Random) -> None:
    buf[::1024] = bytes((b + 1) & 0xFF for b in buf[::1024])


WORKLOADS = [
    Workload("unchanged", "no byte changed", lambda buf, rng: None),
    Workload("seed", "1 byte every 1 KiB (4 per page)", _seed),
    Workload("1%", "1% of bytes at random", _scatter(0.01)),
    Workload("run64", "one 64-byte run per page", _run64),
    Workload("dense", "50% of bytes at random", _scatter(0.5)),
    Workload("alt-words", "every second 8-byte word", _every(16, 8)),
    Workload("alt-bytes", "every second byte", _every(2, 1)),
]

# Targets from issue 2, as ratios to memcmp.
ENCODE_TARGETS = {"unchanged": 0.8, "seed": 0.7, "1%": 0.35, "alt-words": 0.25, "dense": 0.2, "alt-bytes": 0.3}
OTHER_TARGETS = {"batch-encode seed": 0.35, "batch-apply seed": 0.5, "scan unchanged": 0.5}


def _best(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _paired(fn, repeat: int, ceiling, setup=None) -> tuple[float, float]:
    """Best seconds of ``fn`` and of the ``ceiling`` run right before each
    repetition: the ratio of the two is immune to the machine's drift
    between one operation and the next."""
    best = best_ceiling = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        ceiling()
        best_ceiling = min(best_ceiling, time.perf_counter() - t0)
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best, best_ceiling


def build(size: int, workload: Workload, seed: int = 1) -> tuple[bytearray, bytearray]:
    rng = random.Random(seed)
    old_t = bytearray(rng.randbytes(TEMPLATE))
    new_t = bytearray(old_t)
    workload.mutate(new_t, rng)
    reps = size // TEMPLATE
    return old_t * reps, new_t * reps


def run_core(size_mib: int = 64, repeat: int = 3, progress: Callable[[str], None] | None = None) -> dict:
    """Measure the core on a working set of ``size_mib`` MiB per buffer."""
    size = size_mib << 20
    note = progress or (lambda msg: None)
    rows: list[dict] = []

    def mbps(seconds: float) -> float:
        return size / seconds / 1e6

    base_old, base_new = build(size, WORKLOADS[0])
    dst = bytearray(size)

    def memcmp():
        _core.ceiling_memcmp(base_old, base_new, PAGE)

    memcmp_s = _best(memcmp, repeat)
    memcpy_s = _best(lambda: _core.ceiling_memcpy(dst, base_old, PAGE), repeat)
    ceiling = mbps(memcmp_s)
    rows.append({"op": "memcmp", "workload": "-", "mbps": ceiling})
    rows.append({"op": "memcpy", "workload": "-", "mbps": mbps(memcpy_s)})
    note(f"ceilings: memcmp {ceiling:.0f} MB/s, memcpy {mbps(memcpy_s):.0f} MB/s")

    out = bytearray(size)
    for wl in WORKLOADS:
        old, new = build(size, wl)
        enc_s, near = _paired(partial(_core.encode_pages, old, new, out, PAGE), repeat, memcmp)
        lengths = _core.encode_pages(old, new, out, PAGE)
        overflow = sum(1 for n in lengths if n < 0)
        encoded = sum(n for n in lengths if n > 0)
        rows.append(
            {
                "op": "encode",
                "workload": wl.name,
                "mbps": mbps(enc_s),
                "memcmp_mbps": mbps(near),
                "target": ENCODE_TARGETS.get(wl.name),
                "overflow_pages": overflow,
                "encoded_bytes_per_page": encoded / max(1, len(lengths) - overflow),
            }
        )
        if encoded:  # a workload with no deltas has nothing to decode
            target = bytearray(size)
            dec_s = _best(
                partial(_core.decode_pages, out, lengths, target, PAGE),
                repeat,
                setup=partial(_core.ceiling_memcpy, target, old, PAGE),
            )
            rows.append({"op": "decode", "workload": wl.name, "mbps": mbps(dec_s)})
            del target
        note(f"encode {wl.name}: {mbps(enc_s):.0f} MB/s")
        del old, new

    # batch encode and apply on the seed workload, with cache and framing
    old, new = build(size, WORKLOADS[1])
    npages = size // PAGE
    batch = 1024
    chunks = [page_numbers(range(i, min(npages, i + batch))) for i in range(0, npages, batch)]
    cache = PageCache(size + (1 << 20))
    seeded = bytearray(size)

    def seed_cache():
        for pages in chunks:
            encode_batch(cache, 0, b"ram", old, pages, first_pass=True)

    produced: list = []

    def batch_encode():
        produced.clear()
        for pages in chunks:
            produced.append(encode_batch(cache, 0, b"ram", new, pages)[0])

    be_s, near = _paired(batch_encode, repeat, memcmp, setup=seed_cache)
    wire = sum(len(d) for d in produced)
    rows.append(
        {
            "op": "batch-encode",
            "workload": "seed",
            "mbps": mbps(be_s),
            "memcmp_mbps": mbps(near),
            "target": OTHER_TARGETS["batch-encode seed"],
            "wire_bytes_per_page": wire / npages,
        }
    )
    note(f"batch-encode seed: {mbps(be_s):.0f} MB/s, {wire / npages:.1f} wire bytes/page")

    applier = records.Applier(PAGE)
    applier.set_blocks([(b"ram", seeded)])

    def batch_apply():
        for data in produced:
            applier.apply(data)

    ba_s, ba_near = _paired(batch_apply, repeat, memcmp, setup=lambda: _core.ceiling_memcpy(seeded, old, PAGE))
    applier.release()
    rows.append(
        {
            "op": "batch-apply",
            "workload": "seed",
            "mbps": mbps(ba_s),
            "memcmp_mbps": mbps(ba_near),
            "target": OTHER_TARGETS["batch-apply seed"],
        }
    )
    hashes = page_hashes(old, PAGE)
    sc_s, near = _paired(lambda: scan(old, hashes, PAGE), repeat, memcmp)
    rows.append(
        {
            "op": "scan",
            "workload": "unchanged",
            "mbps": mbps(sc_s),
            "memcmp_mbps": mbps(near),
            "target": OTHER_TARGETS["scan unchanged"],
        }
    )
    note(f"scan: {mbps(sc_s):.0f} MB/s")

    for row in rows:
        # against the memcmp measured next to it where there is one
        row["ratio"] = row["mbps"] / row.get("memcmp_mbps", ceiling)
        if row.get("target") is not None:
            row["meets_target"] = row["ratio"] >= row["target"]
    return {"size_mib": size_mib, "page_size": PAGE, "kernel": _core.kernel_name(), "rows": rows}


def format_core(result: dict) -> str:
    lines = [
        f"data-plane core: {result['size_mib']} MiB working set, {result['page_size']}-byte pages, "
        f"kernel {result['kernel']}",
        f"{'op':<13} {'workload':<10} {'MB/s':>8} {'x memcmp':>9} {'target':>7}  note",
    ]
    for r in result["rows"]:
        target = f"{r['target']:.2f}" if r.get("target") is not None else ""
        flag = "" if r.get("meets_target", True) else "  BELOW TARGET"
        extra = ""
        if "overflow_pages" in r:
            extra = f"overflow {r['overflow_pages']}, {r['encoded_bytes_per_page']:.0f} B/page"
        if "wire_bytes_per_page" in r:
            extra = f"{r['wire_bytes_per_page']:.1f} wire B/page"
        lines.append(
            f"{r['op']:<13} {r['workload']:<10} {r['mbps']:>8.0f} {r['ratio']:>9.2f} {target:>7}  {extra}{flag}"
        )
    return "\n".join(lines)


def run_all(size_mib: int = 64, repeat: int = 3, parts: str = "core", progress=None) -> dict:
    """Every benchmark part named in ``parts`` (comma-separated)."""
    wanted = {p.strip() for p in parts.split(",") if p.strip()}
    unknown = wanted - {"core", "e2e", "tls", "scaling", "experiment"}
    if unknown:
        raise ValueError(f"unknown bench parts: {sorted(unknown)}")
    result: dict = {}
    if "core" in wanted:
        result["core"] = run_core(size_mib, repeat, progress=progress)
    if "e2e" in wanted:
        from migrated._tools import bench_e2e

        # at least 5: on this kind of VM a migration's first touch of memory
        # its host took back is slow, and no ceiling touches new memory
        result["e2e"] = bench_e2e.run_e2e(repeat=max(repeat, bench_e2e.MIN_REPEAT), progress=progress)
    if "tls" in wanted:
        from migrated._tools import bench_e2e

        result["tls"] = bench_e2e.run_tls(progress=progress)
    if "scaling" in wanted:
        from migrated._tools import bench_e2e

        sizes = os.environ.get("MIGRATED_BENCH_SIZES")  # e.g. "256,1024,4096" (MiB)
        chosen = tuple(int(x) for x in sizes.split(",")) if sizes else bench_e2e.SCALING_SIZES_MIB
        result["scaling"] = bench_e2e.run_scaling(chosen, progress=progress)
    if "experiment" in wanted:
        from migrated._tools import bench_e2e

        result["experiment"] = bench_e2e.run_experiment(progress=progress)
    return result


def format_all(result: dict) -> str:
    out = []
    if "core" in result:
        out.append(format_core(result["core"]))
    if any(part in result for part in ("e2e", "tls", "scaling", "experiment")):
        from migrated._tools import bench_e2e

        if "e2e" in result:
            out.append(bench_e2e.format_e2e(result["e2e"]))
        if "tls" in result:
            out.append(bench_e2e.format_tls(result["tls"]))
        if "scaling" in result:
            out.append(bench_e2e.format_scaling(result["scaling"]))
        if "experiment" in result:
            out.append(bench_e2e.format_experiment(result["experiment"]))
    return "\n\n".join(out)
