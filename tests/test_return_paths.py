"""Signed return paths: made and checked by hamta.return_paths, the secret created once.

The relay-level behaviour (mail from the bounces address leaves with them; DSNs to anything else
change nothing) is in tests/test_report_abuse.py and tests/test_bounce_intake.py.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from hamta.durable_files import create_once
from hamta.return_paths import SECRET_FILE, ReturnPaths, Verified

DAY = 86400.0
NOW = 20_000 * DAY + 3600  # an hour into day 20000


def paths(now: float = NOW, secret: bytes = b"k" * 32, days: int = 7) -> ReturnPaths:
    return ReturnPaths("Bounces@Hamta.test", secret, days, lambda: now)


def test_round_trip_and_what_breaks_it() -> None:
    address = paths().sign("Odd+Tag=x@Example.ORG")
    assert address.startswith("bounces+20000.") and address.endswith("=example.org@hamta.test")
    assert paths().verify(address) == Verified("odd+tag=x@example.org", 20000)
    assert paths().verify(address.upper()) == Verified("odd+tag=x@example.org", 20000)
    assert paths(secret=b"o" * 32).verify(address) == "bad signature"
    other = address.replace("=example.org@", "=example.net@")
    assert paths().verify(other) == "bad signature"
    assert paths(NOW + 7 * DAY).verify(address) == Verified("odd+tag=x@example.org", 20000)
    assert paths(NOW + 8 * DAY).verify(address) == "signed 8 days ago, kept 7"
    assert paths(NOW - DAY).verify(address) == Verified("odd+tag=x@example.org", 20000)  # skew
    assert paths(NOW - 2 * DAY).verify(address) == "signed -2 days ago, kept 7"
    for unsigned in (
        "bounces@hamta.test",
        "bounces+msg-1@hamta.test",
        "x+1.a.b=c@hamta.test",
        address.replace("@hamta.test", "@other.test"),
        "bounces+1.2.3@hamta.test",
    ):
        assert paths().verify(unsigned) == "not signed", unsigned


def test_which_senders_are_signed() -> None:
    signer = paths()
    assert signer.is_bounces_sender("bounces@hamta.test")
    assert signer.is_bounces_sender("<Bounces+campaign-7@hamta.test>")
    assert not signer.is_bounces_sender("bouncesx@hamta.test")
    assert not signer.is_bounces_sender("bounces@other.test")


def _create(directory: str, queue: multiprocessing.Queue[bytes]) -> None:
    queue.put(create_once(Path(directory), SECRET_FILE, os.urandom(32)))


def test_the_secret_is_created_once_by_racing_workers(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[bytes] = context.Queue()
    workers = [context.Process(target=_create, args=(str(tmp_path), queue)) for _ in range(8)]
    for worker in workers:
        worker.start()
    secrets = {queue.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
    assert secrets == {(tmp_path / SECRET_FILE).read_bytes()}
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE]  # no temporary left
