"""A lab for one test module: built once, shared by the module's tests, removed at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.lab.lab import Lab


@contextmanager
def module_lab(
    base: Path,
    prefix: str,
    subnet: str,
    *,
    wait: float = 90.0,
    monitors: bool = False,
    haproxy: bool = False,
) -> Iterator[Lab]:
    """A lab with both agents in ``base/lab``, on the module's own prefix and subnet.

    Whatever a run killed half-way left of this prefix (namespaces, processes) is removed first,
    through a lab in ``base/leftovers``; the lab is taken down however the tests end.
    """
    Lab(base / "leftovers", prefix=prefix, subnet=subnet).down()
    built = Lab(base / "lab", prefix=prefix, subnet=subnet)
    try:
        built.up(wait=wait, monitors=monitors, haproxy=haproxy)
        yield built
    finally:
        built.down()
