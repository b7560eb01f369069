"""Fixtures and lanes shared by the suite.

Lanes: ``make test-fast`` runs the unit lane (no daemon, no child process,
no socket: ``-m "not integration and not slow"``); ``make test`` runs
everything. Modules that start real daemons are marked ``integration``
here, so a new test in them cannot end up in the unit lane by mistake.
"""

from __future__ import annotations

import pytest

INTEGRATION_MODULES = {
    "test_cli",
    "test_cli_daemons",
    "test_migration",
    "test_process_source",
    "test_systemd",
    "test_uffd",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def receiver(tmp_path):
    """`migrated receive` as a child process on 127.0.0.1, images under ``tmp_path/images``."""
    # imported here, not at the top: conftest loads before pytest enables
    # faulthandler, whose SIGBUS handler would then displace the extension's
    # fault guard (ext/fault_guard.h) if the extension were imported first
    from daemons import receiver_process

    rx = receiver_process(tmp_path)
    yield rx
    rx.kill()


@pytest.fixture(scope="session")
def churn_exe(tmp_path_factory):
    """tests/churn.c (a process that writes, drops and remaps memory all the
    time), compiled with the system C compiler."""
    import subprocess
    from pathlib import Path

    from migrated._tools import loadgen

    cc = loadgen.compiler()
    assert cc, "these tests need a C compiler (cc, gcc or clang) on PATH"
    exe = tmp_path_factory.mktemp("churn") / "churn"
    subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).with_name("churn.c"))], check=True)
    return exe
