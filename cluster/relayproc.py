"""The relay process beside the agent: started warm, activated on the spool, drained, watched.

The agent starts the relay once as a warm standby (``hamta serve --standby``), so that a
promotion costs an activation over the control socket rather than an interpreter start-up. The
relay dies with the agent (the kernel's parent-death signal), so that a killed agent never
leaves a relay serving without anyone holding leadership for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from hamta import control_client

# util-linux's setpriv asks the kernel to SIGKILL the relay when the agent dies (even by
# kill -9), with no Python code between fork and exec in a process that runs threads.
_DIE_WITH_AGENT = ["setpriv", "--pdeathsig", "KILL", "--"]


class RelayControlError(Exception):
    """The relay could not be started, reached or made to do what was asked."""


def default_relay_command(relay_config: Path) -> list[str]:
    """``hamta serve --standby`` with this interpreter, on ``relay_config``."""
    return [sys.executable, "-m", "hamtactl", "serve", "--standby", "--config", str(relay_config)]


async def control_request(
    socket_path: Path, request: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """One request on the relay's control socket (``hamta.control_client``); RelayControlError."""
    try:
        return await control_client.request(socket_path, request, timeout)
    except control_client.ControlError as exc:
        raise RelayControlError(str(exc)) from None


class RelayProcess:
    """One relay child process of the agent, driven over its control socket."""

    def __init__(self, command: Sequence[str], control_socket: Path, output: Path | None) -> None:
        self.command = list(command)
        self.control_socket = control_socket
        self.output = output
        self.process: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()

    @property
    def running(self) -> bool:
        """The process exists and has not exited."""
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        """The relay's pid while it runs."""
        return self.process.pid if self.running and self.process else None

    async def start(self, timeout: float) -> None:
        """Start the warm relay and wait until its control socket answers."""
        if self.running:
            return
        self.exited.clear()
        output: IO[bytes] | None = None
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            # A few microseconds on a local disk, once per relay start.
            output = open(self.output, "ab")  # noqa: SIM115, ASYNC230 - handed to the child
        stdout = output if output is not None else asyncio.subprocess.DEVNULL
        try:
            # A session of its own: killing the relay kills its worker processes too.
            self.process = await asyncio.create_subprocess_exec(
                *_DIE_WITH_AGENT,
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise RelayControlError(f"cannot start {self.command[0]}: {exc.strerror}") from None
        finally:
            if output is not None:
                output.close()
        process = self.process
        watcher = asyncio.ensure_future(process.wait())
        watcher.add_done_callback(lambda _: self.exited.set())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if process.returncode is not None:
                raise RelayControlError(f"relay exited with status {process.returncode} at start")
            try:
                await control_request(self.control_socket, {"command": "status"}, 1.0)
                return
            except RelayControlError:
                if loop.time() >= deadline:
                    await self.kill()
                    raise RelayControlError(f"relay not answering within {timeout:g}s") from None
            # The socket appears when the relay has imported everything; wait for exit or a beat.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited.wait()), 0.05)

    async def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The relay's own summary (state, ready, depth, ...)."""
        return await control_request(self.control_socket, {"command": "status"}, timeout)

    async def activate(
        self, spool: Path, timeout: float, *, epoch: int | None = None, token: Path | None = None
    ) -> dict[str, Any]:
        """Open ``spool`` for term ``epoch`` (fencing ``token``), listen and recover.

        A relay already active for the same term is left as it is; one active for another term
        is refused (it must be drained or killed first).
        """
        status = await self.status()
        if status.get("state") == "active":
            if status.get("epoch") != epoch:
                raise RelayControlError(
                    f"relay already active for epoch {status.get('epoch')}, not {epoch}"
                )
            return status
        request: dict[str, Any] = {"command": "activate", "spool": str(spool)}
        if epoch is not None and token is not None:
            request.update(epoch=epoch, token=str(token))
        return await control_request(self.control_socket, request, timeout)

    async def deactivate(self, timeout: float) -> dict[str, Any]:
        """Stop accepting, finish what is under way (up to ``timeout``), close the spool."""
        status = await self.status()
        if status.get("state") in ("standby", None):
            return status
        request = {"command": "deactivate", "timeout": timeout}
        return await control_request(self.control_socket, request, timeout + 5.0)

    async def kill(self) -> None:
        """SIGKILL the relay and its workers (its whole process group) and reap it."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()

    async def stop(self, timeout: float) -> None:
        """SIGTERM (a graceful stop), then SIGKILL after ``timeout``."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            await self.kill()
