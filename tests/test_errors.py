"""Nursery failures surface as the failure, not as a group."""

import pytest
import trio

from migrated.errors import MigrationError, first_migration_error


class Boom(MigrationError):
    code = "boom"


async def _fail_after(delay, exc):
    await trio.sleep(delay)
    raise exc


async def _raise(exc):
    raise exc


@pytest.mark.parametrize("error", [Boom("x"), KeyError("k")], ids=["migration-error", "other-error"])
async def test_a_lone_failure_is_unwrapped_from_its_cancelled_siblings(error):
    with pytest.raises(type(error)):
        with first_migration_error():
            async with trio.open_nursery() as n:
                n.start_soon(_fail_after, 0.01, error)
                await trio.sleep(10)


async def test_different_errors_stay_a_group():
    with pytest.raises(BaseExceptionGroup):
        with first_migration_error():
            async with trio.open_nursery() as n:
                n.start_soon(_raise, KeyError("k"))  # both fail before either is cancelled
                n.start_soon(_raise, ValueError("v"))
                await trio.sleep(10)


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_error_class_carries_a_code_of_the_table():
    from migrated import errors

    classes = [c for c in _all_subclasses(errors.MigrationError) if c.__module__ == "migrated.errors"]
    assert len(classes) >= 20
    for cls in classes:
        assert cls.code in errors.CODES, cls


def test_docs_mirror_the_table_of_codes():
    from pathlib import Path

    from migrated import errors

    text = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    section = text.split("## Error codes", 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            code, meaning = (cell.strip() for cell in line.strip("|").split("|"))
            rows[code.strip("`")] = meaning
    assert rows == errors.CODES


def test_logged_fields_are_clipped_so_a_peer_cannot_flood_the_log():
    import io
    import json

    import structlog

    from migrated import log as logsetup

    out = io.StringIO()
    saved = structlog.get_config()
    logsetup.configure("json", "info", stream=out)
    try:
        structlog.get_logger("t").info("accept_migration", source="x" * 100_000, capabilities=["c" * 300] * 1000)
    finally:
        structlog.configure(**saved)
    line = out.getvalue()
    assert len(line) < 40_000
    fields = json.loads(line)
    assert fields["source"].startswith("x" * 1024) and fields["source"].endswith("(+98976 characters)")
    assert len(fields["capabilities"]) == 33 and fields["capabilities"][-1] == "… (+968 items)"
