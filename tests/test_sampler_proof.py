"""The split-brain sampler counts an overlap only when its reads prove one (cluster.lab.sampler).

A look reads the nodes one after the other; on a loaded machine a handover can happen between
two reads of one look. These are the read sequences of two looks in a row.
"""

from __future__ import annotations

from cluster.lab.sampler import proven_overlap


def test_a_handover_between_two_reads_of_one_look_is_no_split_brain() -> None:
    # node1 seen holding, then it hands over and node2 takes it before node2 is read.
    assert (
        proven_overlap([("node1", True), ("node2", True), ("node1", False), ("node2", True)]) == []
    )
    # The other order of the same: node2 held, let go, node1 took it before its read.
    assert (
        proven_overlap([("node1", False), ("node2", True), ("node1", True), ("node2", False)]) == []
    )


def test_a_holder_seen_on_both_sides_of_another_holder_is_split_brain() -> None:
    both = [("node1", True), ("node2", True), ("node1", True), ("node2", True)]
    assert proven_overlap(both) == ["node1", "node2"]
    # node2 holding at both its reads, node1 seen holding in between.
    assert proven_overlap(
        [("node1", False), ("node2", True), ("node1", True), ("node2", True)]
    ) == ["node1", "node2"]


def test_one_look_alone_proves_nothing_and_no_holder_is_fine() -> None:
    assert proven_overlap([("node1", True), ("node2", True)]) == []
    assert proven_overlap([("node1", False), ("node2", False)] * 2) == []
    assert proven_overlap([("node1", True), ("node2", False)] * 2) == []
