"""The sender's migration policy, as plain objects: no sockets, no trio, no
clock of their own (callers pass the time). Each is fed what a pass
measured and answers one question:

- ``TokenBucket``: how long to wait before writing n more bytes?
- ``XbzrlePolicy``: delta-encode this pass, or does XBZRLE not pay just now?
- ``DowntimeEstimate``: how long would the final pass take, from freezing
  the source to the receiver's COMMITTED?
- ``ThrottlePolicy``: how much of the time to hold the source stopped
  (auto-converge; ``migrated.throttle`` does the stopping)?

Later policy (stall detection, a self-sizing cache) belongs here too, next
to what it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from migrated.records import BatchStats

__all__ = ["DowntimeEstimate", "PassReport", "ThrottlePolicy", "TokenBucket", "XbzrleChange", "XbzrlePolicy"]

MISS_RATE_OFF = 0.9  # XBZRLE goes off when more cache lookups than this miss...
OVERFLOW_RATE_OFF = 0.5  # ...or more hits than this overflow
MIN_JUDGED_LOOKUPS = 64  # a pass with fewer lookups says nothing
MAX_OFF_PASSES = 8  # off for 1, 2, 4, then at most 8 passes
MIN_MEASURE_BYTES = 1 << 20  # a pass smaller than this does not update the bandwidth
MIN_FLUSH_PAGES = 256  # a receiver flush of fewer pages does not update its cost per page


class TokenBucket:
    """Caps bytes per second; a burst of up to ``burst`` bytes passes at once."""

    def __init__(self, rate: float, now: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(64 << 10, rate / 20)
        self.tokens = self.burst
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        """Take ``n`` bytes' worth of tokens; returns the seconds to wait
        before writing them (0 when they are there)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


@dataclass(frozen=True, slots=True)
class PassReport:
    """What one pass sent: what the policies read and the summary lists."""

    number: int
    wire_bytes: int = 0
    seconds: float = 0.0  # from its first byte to its ACK (to its EOS, for the final pass)
    xbzrle: bool = True  # whether it delta-encoded
    stats: BatchStats = field(default_factory=BatchStats)
    throttle: float = 0.0  # the share of the time auto-converge held the source stopped meanwhile

    @property
    def pages(self) -> int:
        return self.stats.pages


@dataclass(frozen=True, slots=True)
class XbzrleChange:
    """A decision of ``XbzrlePolicy.judge``, for the sender to log."""

    enabled: bool
    passes: int = 0  # how long it stays off
    cache_miss_rate: float = 0.0
    overflow_rate: float = 0.0


class XbzrlePolicy:
    """Switches XBZRLE off for 1, 2, 4, then 8 passes when the last pass says
    it does not pay: most cache lookups missed (the cache is too small for
    what is dirtied) or most hits overflowed (pages changed too densely).
    A cold cache (a first pass that did not seed it, or the pass after
    XBZRLE came back on) is not judged."""

    def __init__(self, negotiated: bool):
        self.negotiated = negotiated
        self.off_until = -1  # the first pass number it is on again
        self.backoff = 1
        self.cache_cold = True

    def on(self, pass_number: int) -> bool:
        return self.negotiated and pass_number >= self.off_until

    def start(self, seeded: bool) -> None:
        """Pass 0 begins; ``seeded``: it fills the cache."""
        self.cache_cold = not seeded

    def judge(self, last: PassReport, next_pass: int) -> XbzrleChange | None:
        """After ``last``: a change to log, or None."""
        if not self.negotiated:
            return None
        if not last.xbzrle:
            if next_pass >= self.off_until:
                self.cache_cold = True
                return XbzrleChange(enabled=True)
            return None
        if last.number == 0:
            return None  # the first pass does not use the cache
        s = last.stats
        if self.cache_cold or s.cache_lookups < MIN_JUDGED_LOOKUPS:
            self.cache_cold = False
            return None
        miss_rate = s.cache_miss / s.cache_lookups
        hits = s.cache_lookups - s.cache_miss
        overflow_rate = s.overflow / hits if hits else 0.0
        if miss_rate > MISS_RATE_OFF or overflow_rate > OVERFLOW_RATE_OFF:
            change = XbzrleChange(False, self.backoff, round(miss_rate, 3), round(overflow_rate, 3))
            self.off_until = next_pass + self.backoff
            self.backoff = min(self.backoff * 2, MAX_OFF_PASSES)
            return change
        self.backoff = 1
        return None


class DowntimeEstimate:
    """Seconds from freezing the source to releasing it (at VERIFIED or
    COMMITTED): a rescan, sending what is dirty at the measured bandwidth,
    and the receiver's cost per page for those pages as it reported it
    (hashing only, or hashing and flushing, as the sender asks; its few
    fixed fsyncs are not known)."""

    def __init__(self, page_size: int, max_bandwidth: float | None):
        self.page_size = page_size
        self.max_bandwidth = max_bandwidth
        self.bandwidth: float | None = None  # bytes per second, measured
        self.scan_seconds = 0.0  # the last rescan
        self.commit_page_seconds = 0.0  # the receiver's cost to hash and flush a page

    def measured_pass(self, wire_bytes: int, seconds: float) -> None:
        if wire_bytes >= MIN_MEASURE_BYTES:
            self.bandwidth = wire_bytes / max(seconds, 1e-6)

    def receiver_flushed(self, pages: int, ms: float) -> None:
        if pages >= MIN_FLUSH_PAGES:
            self.commit_page_seconds = ms / 1000 / pages

    def seconds(self, dirty_pages: int, last: PassReport) -> float:
        pages = last.stats.pages
        if pages and last.number > 0:
            per_page = last.wire_bytes / pages
        else:
            per_page = self.page_size + 8  # nothing to go by but raw pages
        bandwidth = self.bandwidth or float(self.max_bandwidth or 1 << 30)
        return self.scan_seconds + dirty_pages * (per_page / bandwidth + self.commit_page_seconds)


THROTTLE_DIRTY_HIGH = 0.5  # throttle once a pass leaves more than this share of the pages it sent dirty again
THROTTLE_INITIAL = 0.2  # the first throttle, at least (QEMU's cpu-throttle-initial)
THROTTLE_STEP = 0.1  # and each raise, at least (QEMU's cpu-throttle-increment)


class ThrottlePolicy:
    """Auto-converge: how much of the time to hold the source stopped. After
    a pass that left more than half as many pages dirty as it sent, the
    throttle rises to where the source's dirtying would be half the sending
    rate (it dirtied ``dirty`` pages while running ``1 - level`` of the time,
    so at ``1 - level'`` it dirties ``dirty * (1 - level') / (1 - level)``),
    by at least THROTTLE_STEP and to at least THROTTLE_INITIAL, at most
    ``max_level``. It never falls during a migration, as QEMU's does not."""

    def __init__(self, enabled: bool, max_level: float = 0.99):
        self.enabled = enabled
        self.max_level = max_level
        self.level = 0.0

    def judge(self, sent_pages: int, dirty_pages: int) -> float | None:
        """After a pre-copy pass: the new level, or None to keep it."""
        if not self.enabled or sent_pages <= 0 or dirty_pages <= THROTTLE_DIRTY_HIGH * sent_pages:
            return None
        wanted = 1 - (1 - self.level) * THROTTLE_DIRTY_HIGH * sent_pages / dirty_pages
        level = min(self.max_level, max(wanted, self.level + THROTTLE_STEP, THROTTLE_INITIAL))
        if level <= self.level:
            return None
        self.level = level
        return level
