"""What the API's local endpoints (/active, /passive, /health) report of this agent: plain data
the agent builds from its state, apart from ``cluster.api`` so that an agent without an API
never imports aiohttp (a second of every agent start on a slow machine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.decision_data import Role, Step


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """This agent as the local endpoints see it."""

    node: str
    role: Role
    epoch: int
    step: Step | None
    relay_ready: bool
    loop_age: float  # seconds since the decision loop last turned

    @property
    def serving(self) -> bool:
        """Active with nothing in flight and a ready relay: where clients should go."""
        return self.role is Role.ACTIVE and self.step is None and self.relay_ready

    def as_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "role": self.role.value,
            "epoch": self.epoch,
            "step": self.step.value if self.step else None,
            "relay_ready": self.relay_ready,
            "serving": self.serving,
        }
