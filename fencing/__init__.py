"""STONITH for hamta: agents that fence the former active node before a takeover.

Standalone: nothing here imports ``cluster`` (the cluster agent imports this package).
"""

from fencing.agents import (
    CommandAgent,
    FenceAgent,
    IpmiAgent,
    LabAgent,
    LibvirtAgent,
    SshAgent,
)
from fencing.chain import FenceChain, FenceError, FenceReport
from fencing.config import FencingConfigError, agents_from_config
from fencing.outcome import FenceResult, Outcome

__all__ = [
    "CommandAgent",
    "FenceAgent",
    "FenceChain",
    "FenceError",
    "FenceReport",
    "FenceResult",
    "FencingConfigError",
    "IpmiAgent",
    "LabAgent",
    "LibvirtAgent",
    "Outcome",
    "SshAgent",
    "agents_from_config",
]
