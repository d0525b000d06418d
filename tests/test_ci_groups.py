"""The suite's parallel run: every file that builds namespaces, labs or benchmarks is serial.

``pytest -n 2`` runs the suite under pytest-xdist with ``--dist loadgroup``; conftest's
scheduler gives the files of SERIAL_FILES one group, so they run one after another on one
worker. A new lab or namespace test left out of it would run beside them, and both could fail
by load or by seeing the other's namespaces: this test names it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import SERIAL_FILES, SERIAL_GROUP, scheduling_unit

TESTS = Path(__file__).resolve().parent
# What such a file does: network namespaces, a lab (built here or by `hamta lab/chaos
# --prefix`), a bench script end to end, the Vagrant cluster's virtual machines.
BUILDS_NAMESPACES = re.compile(r'\bnetns\b|\bLab\(|"--prefix"|/ "bench" /|mark\.vagrant\b')


def test_every_file_that_builds_namespaces_or_labs_is_in_the_serial_group() -> None:
    found = {
        path.name
        for path in TESTS.glob("test_*.py")
        if path.name != Path(__file__).name and BUILDS_NAMESPACES.search(path.read_text())
    }
    assert found - SERIAL_FILES == set(), "add these to SERIAL_FILES in tests/conftest.py"
    assert SERIAL_FILES - found == set(), "these no longer build namespaces: take them out"


def test_the_scheduler_gives_the_serial_files_one_group_and_spreads_the_rest(
    request: pytest.FixtureRequest,
) -> None:
    scopes = {item.path.name: scheduling_unit(item.nodeid) for item in request.session.items}
    for name, scope in scopes.items():
        if name in SERIAL_FILES:
            assert scope == SERIAL_GROUP, name
        else:
            assert scope != SERIAL_GROUP, name
    assert scheduling_unit("tests/test_lab.py::test_x[a::b]") == SERIAL_GROUP
    own = "tests/test_spool.py::test_x[1]"
    assert scheduling_unit(own) == own  # a unit of its own
    assert scopes[Path(__file__).name] != SERIAL_GROUP
