"""``Member.says_the_same``: when the agent may skip writing its member record between steps.

Between two promotion steps the agent wrote its record each time, a ZooKeeper write on the
takeover's critical path; it now writes it only when the record tells its readers something
new. Its publication time alone is nothing new; any other field is.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.decision_data import Member, Role

RECORD = Member(node="node2", role=Role.PROMOTING, epoch=7, relay_running=True, holds=True)


def test_a_record_that_differs_only_in_its_time_says_the_same() -> None:
    assert replace(RECORD, heartbeat=1_700_000_001.5).says_the_same(RECORD)


def test_nothing_written_yet_is_never_the_same() -> None:
    assert not RECORD.says_the_same(None)


@pytest.mark.parametrize(
    "change",
    [
        {"role": Role.ACTIVE},
        {"epoch": 8},
        {"holds": False},
        {"relay_ready": True},
        {"queue_depth": 3},
        {"cooldown": True},
    ],
)
def test_any_other_field_is_news(change: dict[str, object]) -> None:
    assert not replace(RECORD, heartbeat=5.0, **change).says_the_same(RECORD)  # type: ignore[arg-type]
