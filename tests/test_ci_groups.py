"""The suite's parallel run: every file that builds namespaces, labs or benchmarks is serial.

``pytest`` runs the suite under pytest-xdist with ``--dist loadgroup`` (pyproject's addopts);
conftest's scheduler gives each group of SERIAL_GROUPS to one worker, so its files run one
after another. A new lab or namespace test left out of them would run beside them, and both
could fail by load or by seeing the other's namespaces: this test names it. The groups run
side by side: their labs must not share a prefix or a subnet, which this test checks too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import (
    CHAOS_GROUP,
    FIXED_ADDRESS_GROUP,
    SERIAL_FILES,
    SERIAL_GROUP,
    SERIAL_GROUPS,
    scheduling_unit,
)

TESTS = Path(__file__).resolve().parent
# What such a file does: network namespaces, a lab (built here, by tests.support.labs or by
# `hamta lab/chaos --prefix`), a bench script end to end, the Vagrant cluster's virtual machines.
BUILDS_NAMESPACES = re.compile(
    r'\bnetns\b|\bLab\(|\bmodule_lab\(|"--prefix"|/ "bench" /|mark\.vagrant\b'
)
# How a test file names its lab: a prefix (PREFIX = "hl", prefix="hl", "--prefix", "hl") and
# the /24 of its subnet (its first three numbers, in any address or subnet it writes).
PREFIX = re.compile(r'(?:PREFIX = |prefix=|"--prefix", )"([a-z0-9]+)"')
SUBNET = re.compile(r"\b(198\.1[89]\.\d{1,3})\.\d{1,3}\b")


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
        groups = [group for group, files in SERIAL_GROUPS.items() if name in files]
        if groups:
            assert groups == [scope], name  # one group, its own
        else:
            assert scope not in SERIAL_GROUPS, name
    assert scheduling_unit("tests/test_lab.py::test_x[a::b]") == SERIAL_GROUP
    assert scheduling_unit("tests/test_chaos.py::test_x") == CHAOS_GROUP
    assert scheduling_unit("tests/test_tls_policy.py::test_x") == FIXED_ADDRESS_GROUP
    own = "tests/test_spool.py::test_x[1]"
    assert scheduling_unit(own) == own  # a unit of its own
    assert scopes[Path(__file__).name] != SERIAL_GROUP


def _lab_names(files: frozenset[str]) -> tuple[set[str], set[str]]:
    texts = [(TESTS / name).read_text() for name in files if (TESTS / name).exists()]
    prefixes = {found for text in texts for found in PREFIX.findall(text)}
    subnets = {found for text in texts for found in SUBNET.findall(text)}
    return prefixes, subnets


def test_groups_that_run_side_by_side_share_no_lab_prefix_and_no_subnet() -> None:
    named = {group: _lab_names(files) for group, files in SERIAL_GROUPS.items()}
    assert named[CHAOS_GROUP][0] >= {"hct", "hmc"}  # the patterns do find what the files use
    assert "198.19.238" in named[CHAOS_GROUP][1]
    for group, (prefixes, subnets) in named.items():
        for other, (other_prefixes, other_subnets) in named.items():
            if other != group:
                assert not prefixes & other_prefixes, (group, other, prefixes & other_prefixes)
                assert not subnets & other_subnets, (group, other, subnets & other_subnets)
