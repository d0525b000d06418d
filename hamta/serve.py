"""``hamta serve``: the relay's process, from its start as root to its exit code.

Everything that needs root (the SMTP sockets, the control socket, the DKIM keys, the log file)
is done before the event loop and its threads exist; then root goes and the loop runs the relay
until SIGTERM, the control socket's stop or a fatal failure. The relay's operator commands are
:mod:`hamta.commands`; ``hamtactl`` dispatches to both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from hamta import capacity, eventlog, privileges
from hamta import listeners as smtp_sockets
from hamta.admin import start_admin
from hamta.admission import raise_descriptor_limit
from hamta.bounce_classes import BounceRulesError, build_classifier
from hamta.commands import load_or_exit
from hamta.config import Config
from hamta.control import bind_control, start_control
from hamta.control_client import ControlError
from hamta.relay import Relay, RelayError, RelayState
from hamta.smtp import tls_context
from hamta.supervision import StopDeadline, Supervisor
from hamta.workers import WorkerPool, control_path, die_with_parent

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional outside Linux
    uvloop = None  # type: ignore[assignment]


class Shutdown:
    """The stop of ``hamta serve``: asked by a signal, the control socket or a fatal failure.

    Built before the event loop (the relay is, to load root-only keys before root goes), used
    inside it; its deadline ends the process at ``node.stop_timeout`` from the request on.
    """

    def __init__(self, deadline: StopDeadline) -> None:
        self.deadline = deadline
        self.stop = asyncio.Event()
        self.fatal: list[str] = []

    def request(self) -> None:
        self.deadline.arm()
        self.stop.set()

    def fail(self, reason: str) -> None:
        self.fatal.append(reason)
        self.request()


def _check_descriptors(config: Config, log: Any) -> None:
    """Raise the open-files limit to what the configuration needs, or warn that it is short.

    Every session and connection is a file descriptor: run short of them and clients get broken
    pipes while the health endpoint is reset.
    """
    needed = capacity.descriptors_needed(
        config.smtp.max_connections, config.delivery.max_connections_per_destination
    )
    before, limit = raise_descriptor_limit(needed)
    if limit < needed:
        log.warning(
            "DescriptorLimitLow",
            limit=limit,
            needed=needed,
            action="raise LimitNOFILE (systemd) or ulimit -n, or lower smtp.max_connections",
        )
    elif limit > before:
        log.info("DescriptorLimitRaised", before=before, limit=limit, needed=needed)


async def _serve(
    config: Config,
    relay: Relay,
    standby: bool,
    control_socket: socket.socket,
    dropped: dict[str, object],
    shutdown: Shutdown,
) -> int:
    pool, worker = relay.pool, relay.worker
    log = relay.log
    log.info("PrivilegesDropped", **dropped)
    loop = asyncio.get_running_loop()
    stop, deadline, fatal = shutdown.stop, shutdown.deadline, shutdown.fatal
    tasks: set[asyncio.Task[Any]] = set()

    def activate_from_signal() -> None:
        if relay.state is RelayState.STANDBY:
            task = loop.create_task(relay.activate())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGTERM, shutdown.request)
    loop.add_signal_handler(signal.SIGINT, shutdown.request)
    if pool is not None:
        # Before the control socket, the admin endpoint and SIGUSR1: once the node answers, all
        # of it is warm, and whoever drives it may activate it at once.
        try:
            await pool.start()
        except ControlError as exc:
            log.error("WorkersFailed", error=str(exc))
            print(f"hamta: {exc}", file=sys.stderr)
            await pool.stop(0)
            return 1
    if worker == 0:
        loop.add_signal_handler(signal.SIGUSR1, activate_from_signal)
    admin_listen = config.admin.listen if worker == 0 else ""
    try:
        admin = await start_admin(relay, admin_listen) if admin_listen else None
    except OSError as exc:
        print(f"hamta: cannot serve admin on {admin_listen}: {exc.strerror}", file=sys.stderr)
        if pool is not None:
            await pool.stop(0)
        return 1
    socket_path = control_path(config.control.socket, worker)
    control = await start_control(relay, control_socket, stop)
    socket_inode = socket_path.stat().st_ino
    log.info(
        "RelayStarted",
        standby=standby,
        admin=admin_listen,
        control=str(socket_path),
        workers=config.node.workers,
    )
    if worker == 0 and config.delivery.egress.sources:
        # In the background: a slow resolver must not hold the start up.
        check = loop.create_task(_warn_about_ptrs(config, log))
        tasks.add(check)
        check.add_done_callback(tasks.discard)
    code = 0
    try:
        if not standby:
            try:
                await relay.activate()
            except RelayError as exc:
                log.error("ActivationFailed", error=str(exc))
                print(f"hamta: {exc}", file=sys.stderr)
                code = 1
                return code
        await stop.wait()
        deadline.arm()  # also when the control socket's stop command set the event
        log.info("RelayStopping", state=relay.state.value, failure=fatal[0] if fatal else None)
        if fatal:
            code = 1
        for task in list(tasks):
            await asyncio.gather(task, return_exceptions=True)
        if relay.state is RelayState.ACTIVE:
            await relay.deactivate(deadline.graceful())
    finally:
        control.close()
        # A relay started since this one was given up for dead (a worker still stopping when
        # its node was restarted) has taken the path: its socket is not ours to remove.
        # PermissionError: bound while root in a directory the relay's user may not write; the
        # next start removes it.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if socket_path.stat().st_ino == socket_inode:
                socket_path.unlink()
        if pool is not None:
            await pool.stop(deadline.graceful())
        if admin is not None:
            await admin.cleanup()
        deadline.cancel()
        log.info("RelayExited", code=code)
    return code


def _fds(text: str) -> list[int]:
    return [int(fd) for fd in text.split(",") if fd]


def _run(coro: Any) -> int:
    if uvloop is None:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def cmd_serve(args: argparse.Namespace) -> int:
    """``hamta serve``: run the relay (or a warm standby) until SIGTERM."""
    if args.worker:
        # A worker of a multi-process relay: it goes when the relay that started it goes (or
        # went already: a worker started by hand, with no pid given, trusts its parent now).
        die_with_parent(args.parent_pid or os.getppid())
    config = load_or_exit(args.config)
    standby = args.standby or bool(args.worker)
    # The built-in configuration is for trying hamta on this machine: loopback only, where no
    # outside client reaches the parser. A configuration file is what serves the world, and
    # there root is given up unless the file keeps it on purpose.
    builtin_as_root = args.config is None and config.node.user is None and os.geteuid() == 0
    identity: privileges.Identity | None = None
    refusal: Exception | None = None  # said once the log is open
    try:
        identity = privileges.resolve(
            "root" if builtin_as_root else config.node.user, config.node.group
        )
        if os.geteuid() != identity.uid:
            # Before the log is opened, which root without CAP_DAC_OVERRIDE (the units) could
            # not do in a file of the user's own.
            if config.log.file is not None:
                privileges.give_log_file(config.log.file, identity)
            privileges.give_control_directory(config.control.socket.parent, identity)
    except (privileges.PrivilegeError, OSError) as exc:
        refusal = exc
    try:
        eventlog.configure(config.log.level, config.log.file)
    except eventlog.LogFileError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    node_log = (
        eventlog.get_logger(node=config.node.hostname, worker=args.worker)
        if config.node.workers > 1
        else eventlog.get_logger(node=config.node.hostname)
    )
    # From the stop's request on, the process is gone within node.stop_timeout, come what may.
    shutdown = Shutdown(StopDeadline(config.node.stop_timeout, node_log))
    # While root: the hard limit may be raised only so.
    _check_descriptors(config, node_log)
    # Everything that needs root happens here, before the event loop and its threads exist:
    # the SMTP sockets are bound, the log and a standalone spool handed over, then root goes.
    # A port taken is thus found at start, by a standby too, not at its first activation.
    control: socket.socket | None = None
    try:
        if args.listen_fds is not None:  # a worker: worker 0 bound them
            own, others = smtp_sockets.adopt(args.listen_fds), []
        else:
            workers = config.node.workers
            # Workers share the port; a lone relay must not, or a second one started by
            # mistake would silently take half the connections.
            own = smtp_sockets.bind(config.smtp.listen, reuse_port=workers > 1)
            others = [
                smtp_sockets.bind(config.smtp.listen, reuse_port=True) for _ in range(1, workers)
            ]
        if refusal is not None:
            raise refusal
        assert identity is not None
        if builtin_as_root:
            node_log.warning(
                "RunningAsRoot",
                reason="the built-in configuration (loopback "
                "only); a configuration file sets [node] user",
            )
        # Bound while root, so that it is root's (hamta.control.bind_control).
        control = bind_control(control_path(config.control.socket, args.worker))
        started_as = os.geteuid()
        # A standby is activated on a spool the cluster agent hands over.
        if started_as != identity.uid and not standby:
            privileges.give_tree(config.spool.path, identity)

        def task_failed(name: str, exc: BaseException) -> None:
            relay.task_failed(name, exc)  # the relay is built before any task starts

        # One supervisor for every long-lived task of the process: the relay's and the pool's.
        supervisor = Supervisor(node_log, task_failed)
        pool = None
        # With node.workers unset, also a pool of no workers: an activation may have to adopt
        # shards a node with more CPUs left (Relay.activate).
        default = "workers" not in config.node.model_fields_set
        if args.worker == 0 and (config.node.workers > 1 or default):
            pool = WorkerPool(
                args.config, config.control.socket, node_log, others, spawn=supervisor.spawn
            )
        # Built while root: the DKIM keys it loads may stay readable by root alone.
        relay = Relay(
            config,
            listeners=own,
            worker=args.worker,
            pool=pool,
            on_fatal=shutdown.fail,
            supervisor=supervisor,
        )
        dropped = privileges.drop_privileges(identity)
        if started_as != identity.uid:
            privileges.check_control_directory(
                config.control.socket.parent, identity, writable=pool is not None
            )
        # What each activation reads again, read once now as the relay's user: a file it may
        # not read stops the start (of a standby too), not a takeover.
        try:
            tls_context(config.smtp)
        except (OSError, ssl.SSLError) as exc:
            raise privileges.PrivilegeError(
                f"as user {identity.user}: cannot load smtp.tls_cert {config.smtp.tls_cert} "
                f"with smtp.tls_key {config.smtp.tls_key}: {exc}"
            ) from None
        try:
            build_classifier(config.delivery.bounce_rules)
        except BounceRulesError as exc:
            raise privileges.PrivilegeError(f"as user {identity.user}: {exc}") from None
        except ImportError as exc:
            # A lazy import (importlib's resource readers here) after the drop: the Python
            # installation is not readable by the relay's user (a venv under /root, umask 077).
            where = " and ".join(sorted({sys.base_prefix, sys.prefix}))
            raise privileges.PrivilegeError(
                f"as user {identity.user}: {exc}: is the Python installation ({where}) "
                "readable by that user? It must be"
            ) from None
    except (smtp_sockets.ListenerError, privileges.PrivilegeError, OSError) as exc:
        log = eventlog.get_logger(node=config.node.hostname)
        log.error("StartFailed", error=str(exc))
        log.info("RelayExited", code=1)
        print(f"hamta: {exc}", file=sys.stderr)
        if control is not None:
            with contextlib.suppress(OSError):
                control_path(config.control.socket, args.worker).unlink()
        return 1
    try:
        return _run(_serve(config, relay, standby, control, dropped, shutdown))
    finally:
        smtp_sockets.close_all([own_socket for group in [own, *others] for own_socket in group])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` on the ``hamta`` command's subparsers."""
    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, help="TOML file (default: built-in)")
    serve.add_argument(
        "--standby",
        action="store_true",
        help="start warm: no spool, no listener, until activated over the control socket",
    )
    serve.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    # The pid of worker 0, which started this worker: it must still be its parent.
    serve.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    # A worker's SMTP sockets, bound by worker 0 (hamta.listeners), as file descriptors.
    serve.add_argument("--listen-fds", type=_fds, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)


async def _warn_about_ptrs(config: Config, log: Any) -> None:
    """One EgressPtrMismatch warning per source whose reverse DNS does not confirm its EHLO
    name (hamta.egress_ptr); mail still goes."""
    from hamta.egress_ptr import ptr_warnings  # noqa: PLC0415 - only with egress sources

    for warning in await ptr_warnings(config.delivery.egress, config.dns):
        log.warning("EgressPtrMismatch", warning=warning)
