"""The relay's life: standby, activation over a spool, serving, and a graceful stop.

A relay process may start *warm*: with its interpreter, libraries and admin endpoint up but no
spool and no SMTP listener (``standby``). Activation opens the spool, starts listening at once and
recovers the queue in a thread while the first sessions are already being served, which keeps
queue depth off the failover's critical path. Deactivation is the reverse and is graceful: new
sessions get 421 4.3.2, DATA already under way is finished and spooled, deliveries under way finish
(or stay safely queued when the time is up), then the spool is closed and the relay is warm again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from hamta import activations, active_parts
from hamta.active_parts import ActivationError, ActiveParts
from hamta.config import Config
from hamta.control_client import ControlError
from hamta.domain_stats import DomainStats, destination_metrics, merge_snapshots, relay_snapshot
from hamta.epoch_token import EpochGuard, TokenError
from hamta.eventlog import get_logger
from hamta.listeners import ListenerError, listener_index, unlisten
from hamta.metrics import RelayMetrics, merge_expositions
from hamta.outbound_tls import TlsContexts
from hamta.queue import MailQueue
from hamta.smtp import HamtaSMTP
from hamta.spool import Damage, Spool, SpoolState
from hamta.supervision import Supervisor
from hamta.suppression import Suppressions
from hamta.workers import (
    WorkerPool,
    merge_summaries,
    shard_index,
    shard_path,
    stray_refusal,
    stray_shards,
)

if TYPE_CHECKING:
    from hamta.dkim_signing import DkimSigner


class RelayState(enum.Enum):
    """Where the relay is in its life."""

    STANDBY = "standby"
    ACTIVATING = "activating"
    ACTIVE = "active"
    DEACTIVATING = "deactivating"


class RelayError(Exception):
    """The relay cannot do what was asked (wrong state, spool unusable, port taken)."""


@dataclass(frozen=True, slots=True)
class Activation:
    """What an activation did and how long each part took."""

    spool: str
    listening: list[str]
    recovered_messages: int
    recovery_seconds: float
    listen_seconds: float
    total_seconds: float


class Relay:
    """One relay: configuration, metrics, and its active parts while active."""

    def __init__(
        self,
        config: Config,
        *,
        listeners: Sequence[socket.socket],
        worker: int = 0,
        pool: WorkerPool | None = None,
        wall_clock: Callable[[], float] = time.time,
        on_fatal: Callable[[str], None] | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.config = config
        # Bound at start by hamta serve (hamta.listeners), listening only while active.
        self.listeners = list(listeners)
        self.worker = worker
        # Called once a supervised task has died: the process must stop (hamta.supervision).
        self._on_fatal = on_fatal
        self.pool = pool
        self.metrics = RelayMetrics()
        # Outlives activations, as the metrics do: /api/domain rates span a failover's restart.
        self.domain_stats = DomainStats(
            config.admin.domain_stats_window, config.admin.domain_stats_max
        )
        workers = config.node.workers
        self.log = (
            get_logger(node=config.node.hostname, worker=worker)
            if workers > 1
            else get_logger(node=config.node.hostname)
        )
        self._wall = wall_clock
        self.state = RelayState.STANDBY
        self._active: ActiveParts | None = None
        # The active relay's steps after its parts are built: listening, then recovering.
        self._servers: list[asyncio.Server] = []
        self._recovery: asyncio.Task[SpoolState] | None = None
        self._lock = asyncio.Lock()
        self.started_at = time.monotonic()
        self.last_activation: Activation | None = None
        self._records: set[asyncio.Task[None]] = set()  # activation records being written
        self.metrics.ready.set_function(lambda: 1.0 if self.ready else 0.0)
        # Read at each scrape, so it follows every change of self.state without a hook at each.
        self.metrics.active.set_function(lambda: 0.0 if self.state is RelayState.STANDBY else 1.0)
        self.signer = self._dkim_signer()
        # Loaded once, here (warm): not on each activation's critical path (TlsContexts).
        self.tls_contexts = TlsContexts.load(config.tls_policy)
        # hamta serve builds the supervisor first, so that the worker pool has it too; its
        # failures then come here through task_failed.
        self.supervisor = supervisor or Supervisor(self.log, self.task_failed)

    # ------------------------------------------------------------------ views

    @property
    def ready(self) -> bool:
        """Listening for mail with a writable spool."""
        active = self._active
        return (
            self.state is RelayState.ACTIVE
            and self.supervisor.failure is None
            and active is not None
            and (active.guard is None or active.guard.fenced is None)
            and active.spool.is_writable()
            and all(server.is_serving() for server in self._servers)
        )

    @property
    def spool(self) -> Spool | None:
        """The open spool, while active."""
        return self._active.spool if self._active else None

    @property
    def queue(self) -> MailQueue | None:
        """The queue, while active."""
        return self._active.queue if self._active else None

    @property
    def suppressions(self) -> Suppressions | None:
        """The suppression list, while active and readable."""
        return self._active.suppressions if self._active else None

    def queue_summary(self) -> dict[str, Any]:
        """Figures for ``GET /api/queue`` and ``hamta queue``."""
        active = self._active
        delivered = self.metrics.delivered_rate.total()
        bounced = self.metrics.bounced_rate.total()
        summary: dict[str, Any] = {
            "state": self.state.value,
            "ready": self.ready,
            "depth": 0,
            "recipients_ready": 0,
            "recipients_deferred": 0,
            "in_flight": 0,
            "connections": 0,
            "delivery_rate_per_s": round(self.metrics.delivered_rate.per_second(), 3),
            "delivered_last_minute": delivered,
            "bounced_last_minute": bounced,
            "bounce_rate": round(bounced / (delivered + bounced), 4) if bounced else 0.0,
            "received_total": self.metrics.sample("hamta_messages_received_total"),
            "delivered_total": self.metrics.sample("hamta_deliveries_total", outcome="delivered"),
            "bounced_total": self.metrics.sample("hamta_deliveries_total", outcome="bounced"),
            "expired_total": self.metrics.sample("hamta_deliveries_total", outcome="expired"),
            "domains": {},
        }
        if active is not None:
            summary.update(
                spool=str(active.spool.path),
                depth=len(active.spool.live),
                in_flight=active.queue.in_flight,
                connections=active.engine.connections,
                recovering=self._recovery is not None and not self._recovery.done(),
                spool_writable=active.spool.is_writable(),
                epoch=active.guard.epoch if active.guard is not None else None,
                fenced=active.guard.fenced if active.guard is not None else None,
                checkpoint_error=active.spool.checkpoint_error,
                domains=active.queue.by_domain(),
            )
            summary["recipients_ready"] = active.queue.ready_count
            summary["recipients_deferred"] = active.queue.deferred_count
        return summary

    @property
    def _others(self) -> WorkerPool | None:
        """The pool when it runs workers: a node of one worker by default has an empty one, in
        case an activation must adopt shards (``activate``)."""
        return self.pool if self.pool is not None and self.pool.workers else None

    async def node_summary(self) -> dict[str, Any]:
        """The queue summary of the whole node: this relay and its workers, added up."""
        if self._others is None:
            return self.queue_summary()
        return merge_summaries(self.queue_summary(), await self._others.statuses())

    def domain_snapshot(self) -> dict[str, Any]:
        """This relay's per-domain sums (``hamta.domain_stats``), with its queue's state."""
        active = self._active
        if active is None:
            return relay_snapshot(self.domain_stats, None, None)
        return relay_snapshot(self.domain_stats, active.queue, active.router.next_hop)

    async def node_domains(self) -> dict[str, Any]:
        """The per-domain sums of the whole node: this relay's and its workers', added up."""
        own = self.domain_snapshot()
        if self._others is None:
            return own
        return merge_snapshots([own, *await self._others.domains()])

    async def node_ready(self) -> bool:
        """Ready, and so is every worker."""
        if not self.ready:
            return False
        others = self._others
        return others is None or all(s.get("ready") for s in await others.statuses())

    async def node_metrics(self, destinations: bool = True) -> str:
        """The Prometheus exposition of the whole node (``destinations``: with the series per
        destination, from the counters the queue keeps; the dashboard's sampling goes without)."""
        own = generate_latest(self.metrics.registry).decode()
        others = self._others
        text = own if others is None else merge_expositions([own, *await others.metrics()])
        if not destinations:
            return text
        # Per destination from the node's merged sums, so that the top N is the node's.
        top = self.config.admin.top_destinations
        return text + destination_metrics(await self.node_domains(), top)

    # ------------------------------------------------------------- activation

    @property
    def fenced(self) -> str | None:
        """Why this relay stopped serving its spool (a newer term owns it), or None."""
        active = self._active
        return active.guard.fenced if active is not None and active.guard is not None else None

    async def activate(
        self, spool_path: Path | None = None, *, epoch: int | None = None, token: Path | None = None
    ) -> Activation:
        """Open the spool, listen, and recover the queue; return when recovery is done.

        With ``epoch`` and ``token`` (the cluster agent's term and the fencing token file on
        the shared storage), every write, acknowledgement and delivery first checks that the
        token still carries ``epoch``; a newer one stops this relay at once.
        """
        if (epoch is None) != (token is None):
            raise RelayError("activation needs both an epoch and a token file, or neither")
        async with self._lock:
            if self.state is not RelayState.STANDBY:
                raise RelayError(f"relay is {self.state.value}, not standby")
            self.state = RelayState.ACTIVATING
            path = spool_path or self.config.spool.path
            workers: asyncio.Task[list[dict[str, Any]]] | None = None
            try:
                # Also with one worker: mail left in shards would otherwise never be delivered.
                node = self.config.node
                stray = stray_shards(path, node.workers) if self.worker == 0 else []
                # The default follows this machine's CPUs, so a failover to a smaller node must
                # not strand the mail of the larger one: its shards are adopted (docs/cluster.md
                # "Workers on both nodes"). A count set on purpose is the operator's to raise.
                default = "workers" not in node.model_fields_set
                if stray and not (default and self.pool is not None):
                    raise RelayError(stray_refusal(path, node.workers, stray, default=default))
                if stray:
                    self.log.warning(
                        "StrayShardsAdopted",
                        shards=[p.name for p in stray],
                        workers=node.workers,
                        reason="node.workers is not set and follows the CPUs; a worker with no "
                        "SMTP socket delivers each shard's mail for this activation",
                    )
                if self.pool is not None:
                    adopt = [shard_index(p) for p in stray]
                    workers = asyncio.get_running_loop().create_task(
                        self.pool.activate(path, epoch, token, adopt)
                    )
                activation = await self._activate(
                    shard_path(path, self.worker), epoch, token, root=path
                )
                if workers is not None:
                    others = await workers
                    activation = dataclasses.replace(
                        activation,
                        spool=str(path),
                        recovered_messages=activation.recovered_messages
                        + sum(int(o.get("recovered_messages", 0)) for o in others),
                        total_seconds=max(
                            [activation.total_seconds]
                            + [float(o.get("total_seconds", 0.0)) for o in others]
                        ),
                    )
                    self.last_activation = activation
                return activation
            except BaseException as exc:
                if workers is not None:
                    await asyncio.gather(workers, return_exceptions=True)
                    await self.pool.deactivate(0)  # type: ignore[union-attr]
                await self._teardown(timeout=0)
                self.state = RelayState.STANDBY
                if isinstance(exc, ControlError):
                    raise RelayError(f"a worker failed to activate: {exc}") from None
                raise

    def _dkim_signer(self) -> DkimSigner | None:
        """The DKIM keys, loaded once at start; warnings for key files others may read."""
        dkim = self.config.dkim
        if not dkim.keys:
            return None
        # Imported here: relays without keys never load dkimpy and cryptography.
        from hamta.dkim_signing import load_signer  # noqa: PLC0415

        signer, warnings = load_signer(
            ((k.domain, k.selector, k.key, k.algorithm) for k in dkim.keys), dkim.headers
        )
        for warning in warnings:
            self.log.warning("DkimKeyPermissions", warning=warning)
        self.log.info(
            "DkimKeysLoaded",
            keys=[f"{k.selector}._domainkey.{k.domain} {k.algorithm}" for k in dkim.keys],
        )
        return signer

    def _guard(self, epoch: int | None, token: Path | None) -> EpochGuard | None:
        """The fencing check of this activation, verified against the token right now."""
        if epoch is None or token is None:
            return None
        loop = asyncio.get_running_loop()

        def fenced(reason: str) -> None:  # from the spool's I/O thread too
            loop.call_soon_threadsafe(self._superseded, reason)

        guard = EpochGuard(token, epoch, fenced)
        try:
            guard.verify()
        except TokenError as exc:
            raise RelayError(f"not activated: {exc}") from None
        return guard

    def _superseded(self, reason: str) -> None:
        """A newer term owns the spool: stop accepting and delivering, at once and for good."""
        active = self._active
        if active is None:
            return
        active.handler.drain()
        active.engine.halt()
        self.metrics.fenced.set(1)
        self.log.error(
            "RelayFenced",
            reason=reason,
            epoch=active.guard.epoch if active.guard else None,
            action="no longer accepting or delivering; waiting to be deactivated",
        )

    def task_failed(self, name: str, exc: BaseException) -> None:
        """A supervised task died: unready at once, no new mail, and the process stops."""
        active = self._active
        if active is not None:
            active.handler.drain()  # new sessions and MAIL get 421, not a silent hang
        if self._on_fatal is not None:
            self._on_fatal(f"{name}: {type(exc).__name__}: {exc}")

    async def _activate(
        self,
        path: Path,
        epoch: int | None = None,
        token: Path | None = None,
        *,
        root: Path | None = None,
    ) -> Activation:
        """This process's activation: its parts built (``hamta.active_parts``), then listening,
        then recovery while the first sessions are served."""
        started = time.perf_counter()
        config = self.config
        self.log.info("RelayActivating", spool=str(path), epoch=epoch)
        guard = self._guard(epoch, token)
        try:
            parts = await active_parts.build(
                config,
                path,
                root or path,
                guard,
                worker=self.worker,
                metrics=self.metrics,
                log=self.log,
                domain_stats=self.domain_stats,
                signer=self.signer,
                tls_contexts=self.tls_contexts,
                wall_clock=self._wall,
                spawn=self.supervisor.spawn,
                on_commit=self._observe_commit,
                on_checkpoint=self._observe_checkpoint,
            )
        except ActivationError as exc:
            raise RelayError(str(exc)) from None
        self._active = parts
        self.metrics.fenced.set(0)
        await self._listen(parts.protocols)
        listen_seconds = time.perf_counter() - started
        self.log.info("RelayListening", listen=config.smtp.listen, seconds=round(listen_seconds, 4))
        self._recovery = asyncio.get_running_loop().create_task(parts.spool.recover())
        state = await self._recovery
        parts.queue.add_all(*state.take_queue())
        self.metrics.recovery_seconds.set(state.stats.seconds)
        self._gauge_queue(parts)
        stats = state.stats
        self.log.info(
            "QueueRecovered",
            spool=str(path),
            messages=stats.messages,
            recipients=stats.recipients,
            journal_files=stats.journal_files,
            journal_bytes=stats.journal_bytes,
            torn_frames=stats.torn_frames,
            missing_segments=stats.missing_segments,
            seconds=round(stats.seconds, 4),
        )
        if state.damage:
            self._report_damage(path, state.damage)
        self.state = RelayState.ACTIVE
        total = time.perf_counter() - started
        self.last_activation = Activation(
            spool=str(path),
            listening=list(config.smtp.listen),
            recovered_messages=stats.messages,
            recovery_seconds=stats.seconds,
            listen_seconds=listen_seconds,
            total_seconds=total,
        )
        self.log.info("RelayActive", spool=str(path), seconds=round(total, 4))
        if self.worker == 0:  # off the takeover's critical path: a record for people
            task = asyncio.get_running_loop().create_task(
                self._record_activation(path, stats.messages, total)
            )
            self._records.add(task)
            task.add_done_callback(self._records.discard)
        return self.last_activation

    async def _listen(
        self, protocols: Sequence[tuple[Callable[[], HamtaSMTP], ssl.SSLContext | None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            try:
                # Each socket serves its listener's role (hamta.submission); 465 is wrapped in
                # TLS by its server, before the first byte.
                protocol, implicit_tls = protocols[
                    listener_index(listener, self.config.smtp.listen)
                ]
                # A duplicate for asyncio, which closes what it was given: the bound socket
                # itself stays with the relay for the next activation.
                server = await loop.create_server(protocol, sock=listener.dup(), ssl=implicit_tls)
            except OSError as exc:
                raise RelayError(
                    f"cannot listen on {listener.getsockname()}: {exc.strerror}"
                ) from None
            except ListenerError as exc:
                raise RelayError(str(exc)) from None
            self._servers.append(server)

    def _gauge_queue(self, parts: ActiveParts) -> None:
        """The queue's gauges, read from this activation's parts at each scrape."""
        spool, queue, engine = parts.spool, parts.queue, parts.engine
        self.metrics.queue_depth.set_function(lambda: len(spool.live))
        self.metrics.queue_ready.set_function(lambda: queue.ready_count)
        self.metrics.queue_deferred.set_function(lambda: queue.deferred_count)
        self.metrics.in_flight.set_function(lambda: queue.in_flight)
        self.metrics.connections.set_function(lambda: engine.connections)

    async def _record_activation(self, spool: Path, recovered: int, seconds: float) -> None:
        guard = self._active.guard if self._active is not None else None
        if guard is not None and await asyncio.to_thread(guard.check) is not None:
            return  # a newer term owns the spool: not one more write
        entry = {
            "at": round(self._wall(), 3),
            "node": self.config.node.hostname,
            "epoch": guard.epoch if guard is not None else None,
            "recovered_messages": recovered,
            "seconds": round(seconds, 4),
        }
        try:
            await asyncio.to_thread(activations.record, spool, entry)
        except OSError as exc:  # a record for people: the relay serves on without it
            self.log.warning("ActivationNotRecorded", spool=str(spool), error=str(exc))

    def _observe_commit(self, messages: int, seconds: float) -> None:
        self.metrics.commit_seconds.observe(seconds)
        self.metrics.commit_messages.observe(messages)

    def _observe_checkpoint(self, error: str | None) -> None:
        if error is not None:
            self.metrics.checkpoint_failures.inc()
            self.metrics.checkpoint_failing.set(1)
            self.log.error(
                "CheckpointFailed", error=error, action="journals kept; retried while mail flows"
            )
        elif self.metrics.sample("hamta_spool_checkpoint_failing"):
            self.metrics.checkpoint_failing.set(0)
            self.log.info("CheckpointRecovered")

    def _report_damage(self, path: Path, damage: Damage) -> None:
        """Name what damaged storage cost: one line per message, one for the files."""
        self.metrics.spool_damaged_files.inc(len(damage.files))
        self.metrics.spool_damaged_messages.labels("rebuilt").inc(len(damage.rebuilt))
        self.metrics.spool_damaged_messages.labels("lost").inc(len(damage.lost))
        self.log.error(
            "SpoolDamaged",
            spool=str(path),
            files=list(damage.files),
            kept=list(damage.kept),
            damaged_frames=damage.damaged_frames,
            damaged_entries=damage.damaged_entries,
            rebuilt=len(damage.rebuilt),
            lost=len(damage.lost),
            action="damaged files kept in damaged/; no segment deleted until recovery is clean",
        )
        for qid in damage.rebuilt:
            # Its journal record was damaged or missing: it is delivered (again, if its Done
            # record was lost too: at least once).
            self.log.error("SpoolMessageRebuilt", qid=qid, spool=str(path))
        for qid in damage.lost:
            self.log.error("SpoolMessageLost", qid=qid, spool=str(path))

    # ------------------------------------------------------------ deactivation

    async def deactivate(self, timeout: float = 10.0) -> None:
        """Stop gracefully and go back to standby; nothing accepted is lost."""
        async with self._lock:
            if self.state is not RelayState.ACTIVE:
                raise RelayError(f"relay is {self.state.value}, not active")
            self.state = RelayState.DEACTIVATING
            started = time.perf_counter()
            self.log.info("RelayDeactivating", timeout=timeout)
            if self.pool is not None:
                await asyncio.gather(self.pool.deactivate(timeout), self._teardown(timeout))
            else:
                await self._teardown(timeout)
            self.state = RelayState.STANDBY
            self.log.info("RelayStandby", seconds=round(time.perf_counter() - started, 4))

    async def _teardown(self, timeout: float) -> None:
        active, self._active = self._active, None
        servers, self._servers = self._servers, []
        recovery, self._recovery = self._recovery, None
        if active is None:
            return
        handler = active.handler
        handler.drain()  # new sessions and new MAIL get 421 4.3.2
        deadline = time.monotonic() + timeout
        # DATA already received is spooled and answered before anything closes.
        if handler.in_data:
            try:
                await asyncio.wait_for(handler.idle.wait(), timeout=max(0.1, timeout))
            except TimeoutError:
                self.log.warning("DrainTimeout", sessions_in_data=handler.in_data)
        await active.engine.stop(max(0.0, deadline - time.monotonic()))
        for server in servers:
            server.close()
        for session in list(handler.sessions):
            session.close_session()
        for server in servers:
            await server.wait_closed()
        for listener in self.listeners:  # a standby refuses connections, it does not queue them
            unlisten(listener)
        active.timer.cancel()
        if active.sweeper is not None:
            active.sweeper.cancel()
        if recovery is not None and not recovery.done():
            await asyncio.gather(recovery, return_exceptions=True)
        if active.suppressions is not None:
            await active.suppressions.close()  # after the engine: its bounce writes are done
        if self._records:  # an activation record still being written holds a file there
            await asyncio.gather(*self._records, return_exceptions=True)
        await active.spool.close()
        for gauge in (
            self.metrics.queue_depth,
            self.metrics.queue_ready,
            self.metrics.queue_deferred,
            self.metrics.in_flight,
            self.metrics.connections,
        ):
            gauge.set(0)
