"""XBZRLE codec: the format's vector, edge cases, overflow, malformed input,
random and property-based round trips, each against every compare kernel."""

from __future__ import annotations

import mmap
import random
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import canonical_encode, uleb
from reference import decode as ref_decode

from migrated import xbzrle
from migrated.errors import DecodeError

PAGE = 4096


@pytest.fixture(params=xbzrle.available_kernels())
def kernel(request):
    """Runs a test on every compare kernel the CPU has (only the encoder has kernels)."""
    xbzrle.set_kernel(request.param)
    yield request.param
    xbzrle.set_kernel("best")


def vector_pages():
    old = bytearray(PAGE)
    new = bytearray(PAGE)
    old[1001:1022] = bytes.fromhex("05060708090a0b0c0d0e0f101112136800006b006d")
    new[1001:1022] = bytes.fromhex("0102030405060708090a0b0c0d0e0f680000670069")
    return bytes(old), bytes(new)


VECTOR_24 = bytes.fromhex("e9070f0102030405060708090a0b0c0d0e0f030167010169")
VECTOR_23 = bytes.fromhex("e9070f0102030405060708090a0b0c0d0e0f0303670069")


def roundtrip(old, new, limit=None):
    enc = xbzrle.encode(old, new, limit)
    assert enc is not None
    assert xbzrle.decode(enc, old) == bytes(new)
    assert ref_decode(enc, old) == bytes(new), "reference decoder disagrees"
    assert len(enc) <= len(canonical_encode(old, new))
    return enc


# -- the format document's test vector ---------------------------------------


def test_vector_both_forms_decode():
    old, new = vector_pages()
    assert xbzrle.decode(VECTOR_24, old) == new
    assert xbzrle.decode(VECTOR_23, old) == new


def test_vector_canonical_is_the_documented_24_bytes():
    old, new = vector_pages()
    assert canonical_encode(old, new) == VECTOR_24


def test_vector_encoder_output_at_most_24_bytes(kernel):
    old, new = vector_pages()
    enc = roundtrip(old, new)
    assert len(enc) <= 24
    assert enc == VECTOR_23  # the 1-byte gap is folded


# -- edges ---------------------------------------------------------------------


def test_unchanged_page_encodes_to_nothing(kernel):
    page = bytes(random.Random(1).randbytes(PAGE))
    assert xbzrle.encode(page, page) == b""
    out = bytearray(0)
    assert xbzrle.encode_into(page, page, out) == 0


@pytest.mark.parametrize("zrun", [127, 128, 16383 - 1])
def test_uleb_boundaries_in_zrun(kernel, zrun):
    size = 16384
    old = bytes(size)
    new = bytearray(size)
    new[zrun] = 1
    enc = roundtrip(old, new)
    assert enc == uleb(zrun) + b"\x01\x01"


@pytest.mark.parametrize("nzrun", [127, 128, 16383])
def test_uleb_boundaries_in_nzrun(kernel, nzrun):
    size = 16384
    old = bytes(size)
    new = bytearray(size)
    new[1 : 1 + nzrun] = b"\xff" * nzrun
    enc = roundtrip(old, new, limit=size + 8)
    assert enc[:1] == b"\x01"
    assert enc[1:3] == uleb(nzrun) if nzrun >= 128 else enc[1:2] == uleb(nzrun)


def test_uleb_16383_decodes_and_16384_needs_three_bytes():
    assert uleb(16383) == b"\xff\x7f"
    old = bytes(16384)
    enc = b"\x00" + b"\xff\x7f" + b"\x07" * 16383
    assert xbzrle.decode(enc, old) == b"\x07" * 16383 + b"\x00"
    with pytest.raises(DecodeError, match="longer than 2 bytes"):
        xbzrle.decode(b"\x00\x80\x80\x01", old)


def test_only_last_byte_changed(kernel):
    old = bytes(PAGE)
    new = bytearray(PAGE)
    new[-1] = 0x42
    assert roundtrip(old, new) == uleb(PAGE - 1) + b"\x01\x42"


def test_only_first_byte_changed(kernel):
    old = bytes(PAGE)
    new = bytearray(PAGE)
    new[0] = 0x42
    assert roundtrip(old, new) == b"\x00\x01\x42"


def test_every_second_byte_overflows_at_page_limit(kernel):
    old = bytes(PAGE)
    new = bytes(b"\x01\x00" * (PAGE // 2))
    assert xbzrle.encode(old, new) is None
    assert xbzrle.encode_into(old, new, bytearray(PAGE)) == -1


def test_every_second_word_fits(kernel):
    old = bytes(PAGE)
    new = (b"\x11" * 8 + b"\x00" * 8) * (PAGE // 16)
    enc = roundtrip(old, new)
    assert 2400 <= len(enc) <= 2600


@pytest.mark.parametrize("limit", [2, 64, 512, 2048])
def test_overflow_at_small_limits(kernel, limit):
    rng = random.Random(limit)
    old = bytes(PAGE)
    new = bytearray(PAGE)
    for i in rng.sample(range(PAGE), 300):
        new[i] = rng.randrange(1, 256)
    full = len(canonical_encode(old, new))
    out = bytearray(limit)
    n = xbzrle.encode_into(old, new, out)
    if full <= limit:
        assert n > 0
    else:
        assert n == -1
    # exactly at the encoded length it fits, one byte short it does not
    enc = xbzrle.encode(old, new, limit=PAGE)
    assert xbzrle.encode_into(old, new, bytearray(len(enc))) == len(enc)
    assert xbzrle.encode_into(old, new, bytearray(len(enc) - 1)) == -1


def test_sixteen_k_pages_fully_changed_and_long_runs(kernel):
    size = 16384
    old = bytes(size)
    assert xbzrle.encode(old, b"\x01" * size) is None  # overflows, no abort
    assert xbzrle.encode(old, b"\x01" * size, limit=3 * size) is None
    new = bytearray(size)
    new[1:] = b"\x02" * (size - 1)  # a run of 16383 bytes
    enc = roundtrip(old, new, limit=size + 4)
    assert enc[:3] == b"\x01\xff\x7f"


@pytest.mark.parametrize("page_size", [512, 1024, 2048, 4096, 8192, 16384])
def test_page_sizes(kernel, page_size):
    rng = random.Random(page_size)
    old = rng.randbytes(page_size)
    new = bytearray(old)
    for i in rng.sample(range(page_size), page_size // 50):
        new[i] ^= 0x5A
    roundtrip(old, new)


def test_rejects_bad_page_sizes():
    with pytest.raises(ValueError, match="power of two"):
        xbzrle.encode(bytes(1000), bytes(1000))
    with pytest.raises(ValueError, match="differ in size"):
        xbzrle.encode(bytes(4096), bytes(8192))


def test_any_buffer_type(kernel):
    old, new = vector_pages()
    with mmap.mmap(-1, PAGE) as m_old:
        m_old[:] = old
        out = bytearray(PAGE)
        n = xbzrle.encode_into(m_old, memoryview(new), out)
        assert bytes(out[:n]) == VECTOR_23
        page = mmap.mmap(-1, PAGE)
        page[:] = old
        xbzrle.decode_into(memoryview(out)[:n], page)
        assert page[:] == new
        page.close()


# -- malformed input: every rule, page untouched -------------------------------


@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (b"\x80", "past the end of the input"),
        (b"\x05\x81", "past the end of the input"),
        (b"\x80\x80\x01\x01\x01", "longer than 2 bytes"),
        (b"\x05\x80\x80\x01\x01", "longer than 2 bytes"),
        (b"\x00\x01\x01\x00\x01\x02", "zero run of length 0 after the first pair"),
        (b"\x05\x00", "non-zero run of length 0"),
        (b"\x80\x20\x01\x01", "past the end of the page"),  # zrun 4096, then more
        (b"\xff\x1f\x02\x01\x01", "past the end of the page"),  # zrun 4095 + nzrun 2
        (b"\x00\x81\x20" + b"\x01" * 4097, "past the end of the page"),  # nzrun 4097
        (b"\x10\x05\x01\x02", "past the end of the input"),  # nzrun bytes missing
        (b"\x05", "between a zero run and its non-zero run"),
        (b"\x05\x01\x07\x06", "between a zero run and its non-zero run"),
    ],
)
def test_malformed_rejected_and_page_untouched(encoded, message):
    page = bytearray(random.Random(7).randbytes(PAGE))
    before = bytes(page)
    with pytest.raises(DecodeError, match=message) as info:
        xbzrle.decode_into(encoded, page)
    assert bytes(page) == before
    assert isinstance(info.value, ValueError)
    assert "offset" in str(info.value)
    with pytest.raises(DecodeError):
        ref_decode(encoded, before)


def test_malformed_after_valid_pairs_leaves_page_untouched():
    page = bytearray(PAGE)
    # a valid first pair, then a truncated second: nothing may be applied
    with pytest.raises(DecodeError) as info:
        xbzrle.decode_into(b"\x00\x02\xaa\xbb\x03\x05\x01", page)
    assert page == bytearray(PAGE)
    assert info.value.offset == 6  # where the missing nzrun bytes should start


def test_empty_delta_is_a_no_op():
    page = bytearray(b"\x01" * PAGE)
    xbzrle.decode_into(b"", page)
    assert page == bytearray(b"\x01" * PAGE)


# -- random round trips ----------------------------------------------------------


@pytest.mark.slow
def test_ten_thousand_random_round_trips(kernel):
    # 10,000 on the kernel in production use, 1,000 on the others
    count = 10_000 if kernel == xbzrle.available_kernels()[-1] else 1_000
    rng = random.Random(2024)
    for i in range(count):
        size = 512 << rng.randrange(0, 6)
        old = rng.randbytes(size) if i % 3 else bytes(size)
        new = bytearray(old)
        mode = i % 4
        if mode == 0:
            for j in rng.sample(range(size), rng.randrange(1, 40)):
                new[j] = rng.randrange(256)
        elif mode == 1:
            start = rng.randrange(size)
            ln = rng.randrange(1, size - start + 1)
            new[start : start + ln] = rng.randbytes(ln)
        elif mode == 2:
            for j in range(rng.randrange(0, 3), size, rng.randrange(2, 9)):
                new[j] ^= 1
        else:
            for j in rng.sample(range(size), size // 2):
                new[j] = rng.randrange(256)
        limit = rng.choice([size, size // 2, 64, size * 2])
        enc = xbzrle.encode(old, new, limit)
        canon = canonical_encode(old, new)
        if enc is None:
            assert len(canon) > limit
        else:
            assert len(enc) <= len(canon)
            assert xbzrle.decode(enc, old) == bytes(new)


# -- properties ----------------------------------------------------------------------

sizes = st.sampled_from([512, 1024, 4096])


@st.composite
def page_pairs(draw):
    size = draw(sizes)
    old = draw(st.binary(min_size=size, max_size=size))
    if draw(st.booleans()):
        new = draw(st.binary(min_size=size, max_size=size))
    else:
        new = bytearray(old)
        edits = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=64))
        for pos, val in edits:
            new[pos] = val
    return bytes(old), bytes(new)


# the kernel fixture selects a kernel once per test, which holds for every example
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_pairs())
def test_property_round_trip_and_never_longer_than_canonical(kernel, pair):
    old, new = pair
    canon = canonical_encode(old, new)
    enc = xbzrle.encode(old, new, limit=2 * len(new))
    assert enc is not None
    assert len(enc) <= len(canon)
    assert xbzrle.decode(enc, old) == new
    assert ref_decode(enc, old) == new


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_pairs(), st.integers(1, 5000))
def test_property_overflow_only_when_it_must(kernel, pair, limit):
    old, new = pair
    canon = canonical_encode(old, new)
    out = bytearray(limit)
    n = xbzrle.encode_into(old, new, out)
    if len(canon) <= limit:
        assert n >= 0
    if n >= 0:
        assert n <= limit
        assert xbzrle.decode(bytes(out[:n]), old) == new


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_decoder_never_writes_on_error(data):
    page = bytearray(range(256)) * 16
    before = bytes(page)
    try:
        expected = ref_decode(data, before)
    except DecodeError:
        with pytest.raises(DecodeError):
            xbzrle.decode_into(data, page)
        assert bytes(page) == before
    else:
        xbzrle.decode_into(data, page)
        assert bytes(page) == expected


# -- batch API ------------------------------------------------------------------------


def test_encode_pages_and_decode_pages(kernel):
    rng = random.Random(5)
    n = 64
    old = bytearray(rng.randbytes(n * PAGE))
    new = bytearray(old)
    for p in range(n):
        kind = p % 4
        base = p * PAGE
        if kind == 1:
            new[base + 100] ^= 0xFF
        elif kind == 2:
            for j in range(0, PAGE, 2):
                new[base + j] ^= 0xFF
        elif kind == 3:
            new[base : base + 64] = rng.randbytes(64)
    out = bytearray(n * PAGE)
    lengths = xbzrle.encode_pages(old, new, out, PAGE)
    assert isinstance(lengths, array) and len(lengths) == n
    for p in range(n):
        single = xbzrle.encode(old[p * PAGE : (p + 1) * PAGE], new[p * PAGE : (p + 1) * PAGE])
        assert lengths[p] == (-1 if single is None else len(single))
    assert [lengths[p] for p in range(0, n, 4)] == [0] * (n // 4)
    assert all(lengths[p] == -1 for p in range(2, n, 4))
    target = bytearray(old)
    xbzrle.decode_pages(out, lengths, target, PAGE)
    for p in range(n):
        if lengths[p] != -1:
            assert target[p * PAGE : (p + 1) * PAGE] == new[p * PAGE : (p + 1) * PAGE]
