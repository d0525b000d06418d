"""Running a fence program with a hard time limit.

Every agent but the protocol-free ones shells out to a vendor tool (``fence_ipmilan``,
``ipmitool``, ``ssh``, ``virsh``). Such tools hang on a dead BMC or an unreachable host, and they
may fork helpers that hold the output pipes open, so a time limit must kill the whole process
group, not just the program, and must also hold when the caller itself is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Completed:
    """How a program ended: its exit status (``None`` when killed at the limit) and output."""

    returncode: int | None
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        """True when the program was killed at its time limit."""
        return self.returncode is None

    def last_words(self, secrets: Sequence[str] = ()) -> str:
        """The program's last line of complaint, shortened, with ``secrets`` cut out."""
        for stream in (self.stderr, self.stdout):
            lines = [line.strip() for line in stream.splitlines() if line.strip()]
            if lines:
                return _redact(lines[-1], secrets)[:_DETAIL_LIMIT]
        return "no output"


_DETAIL_LIMIT = 300


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class ProgramMissingError(Exception):
    """The program could not be started (not installed, or not executable)."""


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``argv`` with ``stdin`` fed and closed; kill its process group after ``timeout``.

    Raises ``ProgramMissingError`` when the program cannot be started.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
            # Its own group, so that the kill at the limit also reaches what it forked.
            start_new_session=True,
        )
    except FileNotFoundError:
        raise ProgramMissingError(f"{argv[0]} not installed") from None
    except PermissionError:
        raise ProgramMissingError(f"{argv[0]} not executable") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), max(timeout, 0.0))
    except TimeoutError:
        await _kill(process)
        return Completed(None, "", "")
    except BaseException:
        # Cancelled with the fence step: the program must not outlive the step.
        await _kill(process)
        raise
    return Completed(
        process.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
