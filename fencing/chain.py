"""The fence agents for a node, tried in order until one fences it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fencing.agents import FenceAgent
from fencing.outcome import FenceResult, Outcome

_GRACE = 1.0


class FenceError(Exception):
    """No agent fenced the node; ``attempts`` holds every agent's result, in order."""

    def __init__(self, node: str, attempts: Sequence[FenceResult]) -> None:
        self.node = node
        self.attempts = tuple(attempts)
        if attempts:
            message = f"{node} not fenced: " + "; ".join(str(a) for a in attempts)
        else:
            message = f"{node} not fenced: no fence agent configured"
        super().__init__(message)


@dataclass(frozen=True)
class FenceReport:
    """A fenced node: every attempt in order, the last one the agent that fenced it."""

    node: str
    epoch: int
    attempts: tuple[FenceResult, ...]

    @property
    def fenced_by(self) -> FenceResult:
        """The attempt that fenced the node."""
        return self.attempts[-1]

    def summary(self) -> str:
        """One line for the decision log: who fenced the node, after which failures."""
        text = f"fenced {self.node} with {self.fenced_by.agent} in {self.fenced_by.seconds:.3f}s"
        failed = [str(a) for a in self.attempts[:-1]]
        return text + (f" after {'; '.join(failed)}" if failed else "")


class FenceChain:
    """Tries its agents in order; the first that fences the node wins.

    The overall ``timeout`` is shared: each agent gets at most the time left divided by the
    number of agents not yet tried, so a hanging first agent cannot starve the ones after it,
    and time an agent leaves unused passes on to the next.
    """

    def __init__(
        self, agents: Sequence[FenceAgent], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.agents = list(agents)
        self.clock = clock

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceReport:
        """Fence ``node`` within ``timeout``; raise ``FenceError`` when no agent did."""
        deadline = self.clock() + timeout
        attempts: list[FenceResult] = []
        for index, agent in enumerate(self.agents):
            left = deadline - self.clock()
            if left <= 0:
                attempts.append(FenceResult(agent.name, Outcome.TIMEOUT, 0.0, "no time left"))
                continue
            share = left / (len(self.agents) - index)
            result = await self._attempt(agent, node, epoch, share)
            attempts.append(result)
            if result.outcome is Outcome.FENCED:
                return FenceReport(node, epoch, tuple(attempts))
        raise FenceError(node, attempts)

    async def _attempt(self, agent: FenceAgent, node: str, epoch: int, share: float) -> FenceResult:
        """One agent's attempt, held to its share even when the agent ignores its timeout."""
        start = self.clock()
        try:
            # The grace lets a well-behaved agent kill its program and report TIMEOUT itself.
            return await asyncio.wait_for(agent.fence(node, epoch, share), share + _GRACE)
        except TimeoutError:
            detail = f"no result within {share:.3g}s"
            return FenceResult(agent.name, Outcome.TIMEOUT, self.clock() - start, detail)
        except Exception as exc:  # a third-party agent's bug must not skip the agents after it
            detail = f"raised {type(exc).__name__}: {exc}"
            return FenceResult(agent.name, Outcome.FAILED, self.clock() - start, detail)
