import argparse

import pytest

from migrated.units import duration_arg, format_size, parse_duration, parse_fraction, parse_size, size_arg


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("4096", 4096),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("1.5K", 1536),
        ("2G", 2 << 30),
        ("8MiB", 8 << 20),
    ],
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(("text", "value"), [("300ms", 0.3), ("2s", 2.0), ("1.5", 1.5), ("0ms", 0.0)])
def test_durations(text, value):
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "M", "-1", "12X", "1e3"])
def test_bad_sizes_say_what_to_type(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="like 64M"):
        size_arg(bad)


def test_bad_duration():
    with pytest.raises(argparse.ArgumentTypeError, match="like 300ms"):
        duration_arg("5 minutes")


def test_format_size():
    assert format_size(512) == "512 B" and format_size(3 << 20) == "3.0 MiB"


def test_addresses():
    from migrated.units import parse_address

    assert parse_address("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("dest.example:7700") == ("dest.example", 7700)
    for bad in ("nohost", "h:", "h:99999", ":80", "h:x"):
        with pytest.raises(ValueError, match=r"HOST:PORT|port must be|no host"):
            parse_address(bad)


def test_fractions_as_numbers_or_percentages_within_their_range():
    assert parse_fraction("0.5") == 0.5
    assert parse_fraction("75%") == 0.75
    assert parse_fraction("0") == 0.0
    for bad in ("1", "100%", "-0.1", "nan", "half", ""):
        with pytest.raises(ValueError, match="fraction|out of range"):
            parse_fraction(bad)
