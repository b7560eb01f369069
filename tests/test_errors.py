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


async def test_the_migration_error_wins_over_cancelled_siblings():
    with pytest.raises(Boom):
        with first_migration_error():
            async with trio.open_nursery() as n:
                n.start_soon(_fail_after, 0.01, Boom("x"))
                await trio.sleep(10)


async def test_a_lone_other_error_is_unwrapped():
    with pytest.raises(KeyError):
        with first_migration_error():
            async with trio.open_nursery() as n:
                n.start_soon(_fail_after, 0.01, KeyError("k"))
                await trio.sleep(10)


async def test_different_errors_stay_a_group():
    with pytest.raises(BaseExceptionGroup):
        with first_migration_error():
            async with trio.open_nursery() as n:
                n.start_soon(_raise, KeyError("k"))  # both fail before either is cancelled
                n.start_soon(_raise, ValueError("v"))
                await trio.sleep(10)
