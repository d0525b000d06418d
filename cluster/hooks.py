"""The operator's commands at role changes: ``[hooks] pre_promote``, ``on_role_change``,
``post_demote`` (Patroni's callbacks).

Each runs through ``fencing.process.run``, the one way this project runs a program with a time
limit: in a process group of its own, killed with everything it forked at ``hooks.timeout`` or
when the step that runs it is abandoned. One JSON line per run says how it ended, with the tail
of its output. ``pre_promote`` is a promotion step (the executor awaits it, and the decision
abandons the promotion when it fails); the other two go through a queue, one at a time and in
the order the changes happened, in a task of their own: the decision loop never waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fencing.process import Completed, ProgramMissingError, run

# How much of a hook's output goes into its log line: the end, where the verdict usually is.
_OUTPUT_TAIL = 2000


class HookRefusedError(Exception):
    """``pre_promote`` failed, timed out or could not start; the message says which."""


@dataclass(frozen=True, slots=True)
class RoleChange:
    """What a hook is told, in its environment."""

    node: str
    old_role: str
    new_role: str
    epoch: int
    vip: str
    reason: str

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (the agent's environment) with the HAMTA_* variables set."""
        return {
            **base,
            "HAMTA_NODE": self.node,
            "HAMTA_OLD_ROLE": self.old_role,
            "HAMTA_NEW_ROLE": self.new_role,
            "HAMTA_EPOCH": str(self.epoch),
            "HAMTA_VIP": self.vip,
            "HAMTA_REASON": self.reason,
        }


def _tail(text: str) -> str:
    return text[-_OUTPUT_TAIL:].strip()


class Hooks:
    """The configured hooks of one agent, and the queue of its background ones."""

    def __init__(
        self,
        *,
        pre_promote: Sequence[str],
        on_role_change: Sequence[str],
        post_demote: Sequence[str],
        timeout: float,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.commands = {
            "pre_promote": tuple(pre_promote),
            "on_role_change": tuple(on_role_change),
            "post_demote": tuple(post_demote),
        }
        self.timeout = timeout
        self.log = log
        self.clock = clock
        self._queue: asyncio.Queue[tuple[str, RoleChange]] = asyncio.Queue()

    async def run(self, hook: str, change: RoleChange) -> Completed | None:
        """Run ``hook`` (None when it is not configured or cannot start); one log line."""
        command = self.commands[hook]
        if not command:
            return None
        started = self.clock()
        env = change.environment(os.environ)
        try:
            completed = await run(command, timeout=self.timeout, env=env)
        except ProgramMissingError as exc:
            self.log.error("Hook", hook=hook, command=list(command), error=str(exc))
            return None
        fields: dict[str, Any] = {
            "hook": hook,
            "command": list(command),
            "exit": completed.returncode,
            "seconds": round(self.clock() - started, 3),
            "old_role": change.old_role,
            "new_role": change.new_role,
            "epoch": change.epoch,
            "stdout": _tail(completed.stdout),
            "stderr": _tail(completed.stderr),
        }
        if completed.timed_out:
            self.log.error("Hook", killed=f"no end within {self.timeout:g}s", **fields)
        elif completed.returncode != 0:
            self.log.warning("Hook", **fields)
        else:
            self.log.info("Hook", **fields)
        return completed

    async def pre_promote(self, change: RoleChange) -> str:
        """The go/no-go before the spool is taken: a detail for the step's record, or
        ``HookRefusedError``."""
        if not self.commands["pre_promote"]:
            return "no pre_promote hook"
        completed = await self.run("pre_promote", change)
        if completed is None:
            raise HookRefusedError(f"pre_promote {self.commands['pre_promote'][0]} cannot start")
        if completed.timed_out:
            raise HookRefusedError(f"pre_promote killed at its {self.timeout:g}s limit")
        if completed.returncode != 0:
            words = completed.last_words()
            raise HookRefusedError(f"pre_promote exited {completed.returncode}: {words}")
        return "pre_promote said go"

    def role_changed(self, change: RoleChange) -> None:
        """Queue ``on_role_change``, and ``post_demote`` after a demotion; never waits."""
        if self.commands["on_role_change"]:
            self._queue.put_nowait(("on_role_change", change))
        if change.old_role == "demoting" and self.commands["post_demote"]:
            self._queue.put_nowait(("post_demote", change))

    async def drain(self) -> None:
        """Let the queued hooks run (a stop's post_demote), each within its own limit."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), self.timeout * (self._queue.qsize() + 1))

    async def serve(self) -> None:
        """Run the queued hooks, one at a time, in order (the agent's background task)."""
        while True:
            hook, change = await self._queue.get()
            try:
                await self.run(hook, change)
            finally:
                self._queue.task_done()
