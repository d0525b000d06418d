"""The agent's view of ZooKeeper and its writes there, through kazoo: one ``Coordinator`` per
agent (or operator command, or monitor) session, built from the parts it holds:

- ``cluster.coordination_layout``: the znodes' paths and records, credentials and ACLs;
- ``cluster.coordination_session``: the session, watches, time-limited calls (kazoo blocks);
- ``cluster.coordination_view``: the cluster's view; members and monitors published and read;
- ``cluster.coordination_leadership``: leadership and epoch (the safety of the cluster);
- ``cluster.coordination_records``: history, pause, switchovers, DRBD marks, known nodes;
- ``cluster.coordination_pulse``: this leader's pulse written, its peers' pulses watched.
"""

from __future__ import annotations

from cluster.coordination_leadership import Leadership
from cluster.coordination_pulse import Pulses
from cluster.coordination_records import OperatorRecords
from cluster.coordination_view import ClusterReads


class Coordinator(ClusterReads, Leadership, OperatorRecords, Pulses):
    """One agent's (or one operator command's) session with ZooKeeper for one cluster."""
