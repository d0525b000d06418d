"""The agent's fencers: what the executor's FENCE step calls to fence the former active node.

Two adapters over the ``fencing`` package. ``ChainFencer`` runs its STONITH agents
(``[fencing] agents``); ``CommandFencer`` runs plain commands (``[fencing] commands``). Both
start programs through ``fencing.process`` alone, so that every fence program gets its time
limit, its own process group killed whole at the limit or when the step is abandoned, and the
same reading of its output.
"""

from __future__ import annotations

from typing import Protocol

from fencing import FenceChain, FenceError
from fencing.process import ProgramMissingError, run


class FenceFailedError(Exception):
    """No fence method succeeded; the message says why, for the decision log."""


class Fencer(Protocol):
    """Fences the former active node (the fencing package supplies real agents)."""

    async def fence(self, peer: str, epoch: int, timeout: float) -> str:
        """Return how the peer was fenced; raise FenceFailedError when no method succeeded."""
        ...


class CommandFencer:
    """Runs the configured fence commands in order until one exits 0."""

    def __init__(self, commands: list[list[str]]) -> None:
        self.commands = commands

    async def fence(self, peer: str, epoch: int, timeout: float) -> str:
        """Run each command with ``{peer}`` and ``{epoch}`` filled in; the first success wins.

        Each command gets the whole ``timeout``: the step's own limit bounds them all.
        """
        if not self.commands:
            raise FenceFailedError("no fence agent or command configured")
        failures: list[str] = []
        for template in self.commands:
            argv = [arg.format(peer=peer, epoch=epoch) for arg in template]
            try:
                done = await run(argv, timeout=timeout)
            except ProgramMissingError as exc:
                failures.append(str(exc))
                continue
            except OSError as exc:  # not an executable format, too many processes, ...
                failures.append(f"{argv[0]}: {exc.strerror or exc}")
                continue
            if done.timed_out:
                failures.append(f"{argv[0]}: no answer within {timeout:g}s")
            elif done.returncode == 0:
                return f"fenced {peer} with {argv[0]}"
            else:
                failures.append(f"{argv[0]}: exit {done.returncode} {done.last_words()}")
        raise FenceFailedError("; ".join(failures))


class ChainFencer:
    """The ``fencing`` package's agents, tried in order for each node (its STONITH chain)."""

    def __init__(self, chain: FenceChain) -> None:
        self.chain = chain

    async def fence(self, peer: str, epoch: int, timeout: float) -> str:
        """How ``peer`` was fenced, with every attempt; FenceFailedError when no agent did."""
        try:
            report = await self.chain.fence(peer, epoch, timeout)
        except FenceError as exc:
            raise FenceFailedError(str(exc)) from None
        return report.summary()
