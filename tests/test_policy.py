"""The sender's policy objects, without sockets or clocks: fed what passes
measured, they answer how long to wait, whether to delta-encode, and how
long the final pass would take."""

from __future__ import annotations

import pytest

from migrated.policy import (
    MAX_OFF_PASSES,
    MIN_FLUSH_PAGES,
    MIN_MEASURE_BYTES,
    DowntimeEstimate,
    PassReport,
    ThrottlePolicy,
    TokenBucket,
    XbzrlePolicy,
)
from migrated.records import BatchStats


def test_token_bucket_lets_a_burst_through_then_paces_to_the_rate():
    bucket = TokenBucket(rate=1000.0, now=0.0, burst=500.0)
    assert bucket.take(500, now=0.0) == 0.0  # the burst
    assert bucket.take(250, now=0.0) == pytest.approx(0.25)  # a quarter of a second's worth owed
    assert bucket.take(250, now=1.0) == 0.0  # a second later: the debt paid, refilled up to the burst
    assert bucket.tokens == pytest.approx(250.0)
    assert bucket.take(0, now=100.0) == 0.0 and bucket.tokens == 500.0  # refills to the burst, no more


def test_token_bucket_default_burst_is_a_twentieth_of_a_second_but_at_least_64k():
    assert TokenBucket(1 << 30, now=0.0).burst == (1 << 30) / 20
    assert TokenBucket(4096, now=0.0).burst == 64 << 10


def dirty_pass(number, lookups, misses, overflow=0, xbzrle=True):
    return PassReport(
        number, xbzrle=xbzrle, stats=BatchStats(cache_lookups=lookups, cache_miss=misses, overflow=overflow)
    )


def test_xbzrle_off_for_1_2_4_8_passes_while_it_does_not_pay():
    policy = XbzrlePolicy(negotiated=True)
    policy.start(seeded=True)
    assert policy.on(0)
    assert policy.judge(PassReport(0), 1) is None  # pass 0 does not use the cache
    pass_no, offs = 1, []
    while len(offs) < 5:
        report = dirty_pass(pass_no, 1000, 950)  # 95% misses
        assert policy.on(pass_no)
        change = policy.judge(report, pass_no + 1)
        if change is not None:
            assert not change.enabled and change.cache_miss_rate == 0.95
            offs.append(change.passes)
            off = pass_no + 1
            for p in range(off, off + change.passes):
                assert not policy.on(p)
                back = policy.judge(dirty_pass(p, 0, 0, xbzrle=False), p + 1)
                assert (back is not None and back.enabled) == (p + 1 == off + change.passes)
            pass_no = off + change.passes
            assert policy.on(pass_no)
            # back on with a cold cache: the first pass after is not judged
            assert policy.judge(dirty_pass(pass_no, 1000, 990), pass_no + 1) is None
            pass_no += 1
        else:
            pass_no += 1
    assert offs == [1, 2, 4, 8, MAX_OFF_PASSES]


def test_xbzrle_goes_off_on_overflows_and_a_good_pass_resets_the_backoff():
    policy = XbzrlePolicy(negotiated=True)
    policy.start(seeded=True)
    assert policy.judge(dirty_pass(1, 1000, 0, overflow=600), 2).overflow_rate == 0.6
    assert policy.backoff == 2
    policy.judge(dirty_pass(2, 0, 0, xbzrle=False), 3)  # back on, cold
    policy.judge(dirty_pass(3, 1000, 0), 4)  # cold: not judged
    assert policy.judge(dirty_pass(4, 1000, 100, overflow=10), 5) is None
    assert policy.backoff == 1


def test_unseeded_first_pass_and_small_passes_are_not_judged():
    policy = XbzrlePolicy(negotiated=True)
    policy.start(seeded=False)
    assert policy.judge(dirty_pass(1, 1000, 1000), 2) is None  # the cache was cold
    assert policy.judge(dirty_pass(2, 10, 10), 3) is None  # too few lookups to say
    assert policy.judge(dirty_pass(3, 1000, 1000), 4) is not None


def test_xbzrle_never_on_unless_negotiated():
    policy = XbzrlePolicy(negotiated=False)
    assert not policy.on(0) and not policy.on(5)
    assert policy.judge(dirty_pass(1, 1000, 1000), 2) is None


def test_downtime_estimate_adds_rescan_send_and_the_receivers_flush():
    est = DowntimeEstimate(page_size=4096, max_bandwidth=None)
    # nothing measured: raw pages at 1 GiB/s
    assert est.seconds(1000, PassReport(0)) == pytest.approx(1000 * 4104 / (1 << 30))
    est.measured_pass(MIN_MEASURE_BYTES - 1, 0.001)
    assert est.bandwidth is None  # too small a pass to measure by
    est.measured_pass(100 << 20, 1.0)
    est.receiver_flushed(MIN_FLUSH_PAGES - 1, 50.0)
    assert est.commit_page_seconds == 0.0
    est.receiver_flushed(1000, 10.0)  # 10 us a page
    est.scan_seconds = 0.05
    last = PassReport(3, wire_bytes=26_000, stats=BatchStats(xbzrle_pages=1000))  # 26 bytes a page
    assert est.seconds(2000, last) == pytest.approx(0.05 + 2000 * (26 / (100 << 20) + 10e-6))


def test_downtime_estimate_falls_back_to_the_bandwidth_cap():
    est = DowntimeEstimate(page_size=4096, max_bandwidth=8 << 20)
    assert est.seconds(2048, PassReport(0)) == pytest.approx(2048 * 4104 / (8 << 20))


def test_throttle_rises_to_where_dirtying_would_be_half_the_sending_rate():
    p = ThrottlePolicy(enabled=True)
    assert p.judge(sent_pages=1000, dirty_pages=500) is None  # half: keeps up
    assert p.judge(sent_pages=1000, dirty_pages=800) == pytest.approx(1 - 0.5 * 1000 / 800)  # 0.375
    # at 0.375 it still dirtied as many as it sent: the running share must halve
    assert p.judge(sent_pages=1000, dirty_pages=1000) == pytest.approx(1 - 0.625 * 0.5)


def test_throttle_starts_at_the_initial_step_rises_by_at_least_a_step_and_never_falls():
    p = ThrottlePolicy(enabled=True, max_level=0.5)
    assert p.judge(1000, 510) == pytest.approx(0.2)  # barely over: the initial throttle
    assert p.judge(1000, 510) == pytest.approx(0.3)  # not enough: one more step at least
    assert p.judge(1000, 10) is None and p.level == pytest.approx(0.3)  # converging: kept, not lowered
    assert p.judge(1000, 100_000) == pytest.approx(0.5)  # capped
    assert p.judge(1000, 100_000) is None


def test_throttle_off_or_with_nothing_sent_says_nothing():
    assert ThrottlePolicy(enabled=False).judge(1000, 100_000) is None
    assert ThrottlePolicy(enabled=True).judge(0, 100) is None
    assert ThrottlePolicy(enabled=True, max_level=0.0).judge(1000, 100_000) is None
