"""hamta's lab: a real cluster on one Linux host, built from network namespaces.

``hamta lab up`` builds it (three ZooKeeper servers, two nodes with their agents, a mail client,
DNS and a recording mail sink, a shared disk), ``hamta lab down`` takes it away. Tests,
benchmarks and the chaos suite drive it through :class:`Lab`.

The names below are imported on first use: ``hamta serve`` imports the lab's command-line
module, and must not pay for pyroute2 and the ZooKeeper helpers at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.lab.lab import Lab, LabError
    from cluster.lab.results import SendResult
    from cluster.lab.topology import DEFAULT_DIRECTORY

__all__ = ["DEFAULT_DIRECTORY", "Lab", "LabError", "SendResult"]

_WHERE = {
    "DEFAULT_DIRECTORY": "cluster.lab.topology",
    "Lab": "cluster.lab.lab",
    "LabError": "cluster.lab.lab",
    "SendResult": "cluster.lab.results",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
