"""LRU page cache: order, eviction, zero pages, resize, capacity 0."""

from __future__ import annotations

import random

import pytest

from migrated.cache import PageCache, page_key

PS = 4096


def page(n: int) -> bytes:
    return bytes([n % 251 + 1]) * 10 + random.Random(n).randbytes(PS - 10)


def test_insert_get_and_stats():
    c = PageCache(4 * PS)
    c.insert(1, page(1))
    assert c.get(1) == page(1)
    assert c.get(2) is None
    s = c.stats()
    assert (s["lookups"], s["hits"], s["misses"], s["inserts"]) == (2, 1, 1, 1)
    assert s["capacity"] == 4 * PS and s["pages"] == 1


def test_lru_order_and_eviction():
    c = PageCache(3 * PS)
    for k in (1, 2, 3):
        c.insert(k, page(k))
    assert c.keys() == [3, 2, 1]
    assert c.get(1) == page(1)  # touch: 1 becomes most recent
    assert c.keys() == [1, 3, 2]
    c.insert(4, page(4))  # evicts 2, the least recently used
    assert c.keys() == [4, 1, 3]
    assert 2 not in c and c.get(2) is None
    assert c.stats()["evictions"] == 1
    assert c.pages == 3
    assert [c.get(k) for k in (1, 3, 4)] == [page(1), page(3), page(4)]


def test_reinsert_updates_in_place():
    c = PageCache(2 * PS)
    c.insert(1, page(1))
    c.insert(2, page(2))
    c.insert(1, page(9))
    assert c.keys() == [1, 2]
    assert c.get(1) == page(9)
    assert c.stats()["inserts"] == 2 and c.pages == 2


def test_zero_pages_take_no_slot():
    c = PageCache(2 * PS)
    c.insert(1, page(1))
    c.insert(2, page(2))
    c.insert_zero(3)
    c.insert_zero(4, fill=0xAB)
    assert c.pages == 2 and c.zero_entries == 2 and len(c) == 4
    assert c.get(3) == bytes(PS)
    assert c.get(4) == b"\xab" * PS
    assert c.is_zero(4) and not c.is_zero(1)
    assert c.get(1) == page(1) and c.get(2) == page(2)


def test_zero_entry_becomes_data_and_back():
    c = PageCache(1 * PS)
    c.insert_zero(5)
    c.insert(5, page(5))
    assert c.get(5) == page(5) and c.pages == 1
    c.insert_zero(5)
    assert c.pages == 0 and c.get(5) == bytes(PS)


def test_entries_bounded_by_twice_the_slots():
    c = PageCache(2 * PS)
    for k in range(10):
        c.insert_zero(k)
    assert len(c) == 4
    assert c.keys() == [9, 8, 7, 6]


def test_data_insert_evicts_past_zero_entries():
    c = PageCache(1 * PS)
    c.insert(1, page(1))
    c.insert_zero(2)
    c.insert(3, page(3))  # needs the only slot: 1 is evicted
    assert 1 not in c and 2 in c and c.get(3) == page(3)


def test_resize_down_keeps_most_recent():
    c = PageCache(8 * PS)
    for k in range(8):
        c.insert(k, page(k))
    c.get(0)
    c.resize(3 * PS)
    assert c.keys() == [0, 7, 6]
    assert [c.get(k) for k in (0, 7, 6)] == [page(0), page(7), page(6)]
    assert c.capacity == 3 * PS
    assert c.stats()["evictions"] == 5


def test_resize_up_keeps_everything():
    c = PageCache(2 * PS)
    c.insert(1, page(1))
    c.insert_zero(2)
    c.resize(16 * PS)
    assert c.keys() == [2, 1]
    assert c.get(1) == page(1) and c.is_zero(2)
    for k in range(10, 24):
        c.insert(k, page(k))
    assert c.pages == 15  # 1 + 14 data pages fit in 16 slots
    assert c.get(1) == page(1)


def test_capacity_zero_disables_cleanly():
    c = PageCache(0)
    c.insert(1, page(1))
    c.insert_zero(2)
    assert len(c) == 0 and c.get(1) is None and c.pages == 0
    c.resize(2 * PS)
    c.insert(1, page(1))
    assert c.get(1) == page(1)
    c.resize(0)
    assert len(c) == 0 and c.get(1) is None


def test_capacity_rounds_down_to_pages_and_rejects_negative():
    assert PageCache(PS * 3 + 100).capacity == 3 * PS
    with pytest.raises(ValueError, match="must be >= 0"):
        PageCache(-1)
    with pytest.raises(ValueError, match="power of two"):
        PageCache(PS, page_size=3000)
    with pytest.raises(ValueError, match="page must be"):
        PageCache(PS).insert(1, b"short")


def test_against_a_model_under_random_operations():
    """Random operations against an OrderedDict model of an LRU."""
    from collections import OrderedDict

    rng = random.Random(3)
    slots = 16
    c = PageCache(slots * PS)
    model: OrderedDict[int, bytes | int] = OrderedDict()  # key -> page or fill

    def evict_for(data: bool):
        while len(model) >= 2 * slots or (data and sum(1 for v in model.values() if isinstance(v, bytes)) >= slots):
            model.popitem(last=False)

    for step in range(5000):
        k = page_key(rng.randrange(3), rng.randrange(40))
        op = rng.random()
        if op < 0.4:
            got = c.get(k)
            want = model.get(k)
            if want is None:
                assert got is None
            else:
                model.move_to_end(k)
                assert got == (want if isinstance(want, bytes) else bytes([want]) * PS)
        elif op < 0.8:
            p = page(step)
            if k in model:
                model.move_to_end(k)
                if not isinstance(model[k], bytes):
                    del model[k]
                    evict_for(True)
                    model[k] = p
                model[k] = p
            else:
                evict_for(True)
                model[k] = p
            c.insert(k, p)
        elif op < 0.95:
            f = rng.randrange(2)
            if k in model:
                model.move_to_end(k)
            else:
                evict_for(False)
            model[k] = f
            c.insert_zero(k, f)
        else:
            model.pop(k, None)
            c.remove_key(k)
        assert c.keys() == list(reversed(model))


def test_page_key_packing():
    assert page_key(0, 5) == 5
    assert page_key(2, 5) == (2 << 40) | 5
    with pytest.raises(ValueError, match="out of range"):
        page_key(-1, 0)
