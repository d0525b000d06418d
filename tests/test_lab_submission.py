"""The lab's submission: the pair takes mail on 587 and 465 with the probe account, and refuses.

A lab of its own (prefix ``hs``, subnet 198.19.170.0/24, beside any user's lab), with agents: the
active node's relay listens on 25, 587 and 465 with the lab's password file, and the client
namespace submits through the virtual IP as ``hamta lab send --submission`` does.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.lab.lab import Lab
from cluster.lab.submission import ACCOUNT_FILE, PROBE_USER
from hamta.config import load_config
from tests.support.labs import module_lab

PREFIX = "hs"
SUBNET = "198.19.170.0/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory.mktemp("lab-submission"), PREFIX, SUBNET) as built:
        yield built


def test_the_pair_listens_for_submission_with_a_probe_account(lab: Lab) -> None:
    account_path = lab.directory / ACCOUNT_FILE
    account = json.loads(account_path.read_text())
    assert account["user"] == PROBE_USER and len(account["password"]) >= 12
    config = load_config(lab.directory / "node1" / "relay.toml")
    assert [(item.listen, item.role) for item in config.smtp.listeners] == [
        ("0.0.0.0:25", "smtp"),
        ("0.0.0.0:587", "submission"),
        ("0.0.0.0:465", "submissions"),
    ]
    users = config.auth.backends["lab"].path
    assert users is not None and stat.S_IMODE(Path(users).stat().st_mode) == 0o600


@pytest.mark.parametrize("port", [587, 465])
def test_submission_through_the_vip(lab: Lab, port: int) -> None:
    result = lab.send(3, submission=port, timeout=60.0)
    assert (result.acked, result.refused, result.errors) == (3, {}, 0), result.error_samples


def test_a_wrong_password_is_refused(lab: Lab) -> None:
    result = lab.send(1, submission=587, password="not-the-password", timeout=60.0)
    assert (result.acked, result.refused) == (0, {535: 1})


def test_a_wrong_sender_is_refused(lab: Lab) -> None:
    result = lab.send(1, submission=465, sender="ceo@a.lab.test", timeout=60.0)
    assert (result.acked, result.refused) == (0, {553: 1})
