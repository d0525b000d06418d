"""What exists only while a relay is active, built in one place: :func:`build`.

Each part is constructed with everything it needs, in the order they need each other: the spool
(opened, with its fencing check), the delivery engine (which owns the queue, since the queue's
ready lines start the engine's sessions), the suppression list and the report intakes, the
reception handler that spools and queues, the queue's timer, and the factory of SMTP sessions.
Nothing is set on a part after it is built. A part that fails closes what was opened before it
(the spool's lock, the suppression list, the tasks), so a refused activation can be retried in
the same process. Listening and recovery are the relay's steps (``hamta.relay``): they come
after, in the relay's order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hamta.auth_backends import build_backends
from hamta.bounce_classes import BounceRulesError, build_classifier
from hamta.bounce_intake import BounceIntake
from hamta.complaints import ComplaintIntake
from hamta.config import Config
from hamta.delivery import DeliveryEngine
from hamta.domain_stats import DomainStats
from hamta.epoch_token import EpochGuard
from hamta.intake import Intake
from hamta.metrics import RelayMetrics
from hamta.outbound_tls import OutboundTls, TlsContexts
from hamta.queue import MailQueue, recipient_domain
from hamta.reception import ReceptionHandler
from hamta.report_quarantine import QUARANTINE_DIR, QuarantineQuota, sweep_periodically
from hamta.report_rate import ClientRate
from hamta.report_shape import ReportLimits
from hamta.report_trust import ReporterTrust
from hamta.return_paths import ReturnPaths
from hamta.routing import Router
from hamta.smtp import HamtaSMTP, tls_context
from hamta.spool import Spawn, Spool, SpoolError
from hamta.submission import Submission, listeners
from hamta.suppression import DomainFailurePolicy, SuppressionError, Suppressions
from hamta.suspensions import load_suspended

if TYPE_CHECKING:
    from hamta.dkim_signing import DkimSigner


class ActivationError(Exception):
    """A part cannot be built (certificate, bounce rules, spool, bounce secret): says which."""


@dataclass(frozen=True, slots=True)
class ActiveParts:
    """One activation's object graph, as :func:`build` made it."""

    spool: Spool
    queue: MailQueue
    engine: DeliveryEngine
    router: Router
    handler: ReceptionHandler
    suppressions: Suppressions | None
    guard: EpochGuard | None
    # One SMTP session per accepted connection, per listener (in smtp.listen's order), with
    # the TLS context its server wraps connections in (465) or None.
    protocols: tuple[tuple[Callable[[], HamtaSMTP], ssl.SSLContext | None], ...]
    timer: asyncio.Task[None]
    sweeper: asyncio.Task[None] | None  # of quarantine/, on worker 0


async def build(
    config: Config,
    path: Path,
    root: Path,
    guard: EpochGuard | None,
    *,
    worker: int,
    metrics: RelayMetrics,
    log: Any,
    domain_stats: DomainStats,
    signer: DkimSigner | None,
    tls_contexts: TlsContexts,
    wall_clock: Callable[[], float],
    spawn: Spawn,
    on_commit: Callable[[int, float], None],
    on_checkpoint: Callable[[str | None], None],
) -> ActiveParts:
    """The parts of an activation over the spool (or worker's shard) at ``path``.

    ``root`` is the spool's root, where the files of the whole volume live (suppression list,
    bounce secret, quarantine); ``guard`` the term's fencing check, verified already.
    """
    try:
        inbound_tls = tls_context(config.smtp)
    except (OSError, ssl.SSLError) as exc:
        raise ActivationError(f"cannot load the TLS certificate: {exc}") from None
    try:
        classifier = build_classifier(config.delivery.bounce_rules)
    except BounceRulesError as exc:  # changed since the configuration was checked
        raise ActivationError(str(exc)) from None
    check = guard.check if guard is not None else None
    # What is opened is closed again, in reverse order, if a later part fails: a refused
    # activation leaves nothing held (the spool's lock above all) for the next one.
    async with contextlib.AsyncExitStack() as opened:
        spool = Spool(
            path,
            segment_size=config.spool.segment_size,
            journal_size=config.spool.journal_size,
            min_free=config.spool.min_free,
            wall_clock=wall_clock,
            on_checkpoint=on_checkpoint,
            spawn=spawn,
            on_commit=on_commit,
            guard=check,
            recipient_key=recipient_domain,
        )
        try:
            spool.open()
        except SpoolError as exc:
            raise ActivationError(str(exc)) from None
        opened.push_async_callback(spool.close)
        router = Router(config.delivery, config.dns)
        reports = config.suppression
        return_paths = None
        if reports.bounces_address is not None:
            try:
                return_paths = ReturnPaths.on_spool(
                    root, reports.bounces_address, reports.bounce_address_days, wall_clock
                )
            except OSError as exc:
                raise ActivationError(f"cannot read or create the bounce secret: {exc}") from None
        # At the spool's root (not a worker's shard): one list per volume, moving with it.
        suppressions = await _open_suppressions(config, root, check, log)
        if suppressions is not None:
            opened.push_async_callback(suppressions.close)
        engine = DeliveryEngine(
            config.delivery,
            config.node.hostname,
            spool,
            router,
            metrics,
            log,
            wall_clock=wall_clock,
            share=config.node.workers,
            retry=config.retry,
            spawn=spawn,
            return_paths=return_paths,
            guard=check,
            classifier=classifier,
            domain_stats=domain_stats,
            suppressions=suppressions,
            suspended=load_suspended(path, log),
            # MTA-STS policies cached at the spool's root: they move with it on failover.
            tls=OutboundTls(
                config.delivery,
                config.dns,
                config.tls_policy,
                root,
                wall_clock,
                log,
                hostname=config.node.hostname,
                shard=f"w{worker}",
                contexts=tls_contexts,
            ),
        )
        engine.start_tls_reports()
        queue = engine.queue
        limits = ReportLimits(reports.report_max_parts, reports.report_max_recipients)
        quota = QuarantineQuota(
            reports.quarantine_max_size, reports.quarantine_max_files, reports.quarantine_retention
        )
        intakes: list[Intake] = []
        if reports.complaints_address is not None:
            if not reports.complaint_networks and not reports.complaint_dkim_domains:
                log.warning(
                    "ComplaintsIgnored",
                    address=reports.complaints_address,
                    reason="no complaint_networks and no complaint_dkim_domains: every "
                    "complaint is logged and suppresses nobody",
                )
            trust = ReporterTrust.of(
                reports.complaint_networks, reports.complaint_dkim_domains, config.dns
            )
            intakes.append(
                ComplaintIntake(
                    reports.complaints_address,
                    suppressions,
                    root,
                    metrics,
                    log,
                    check,
                    domain_stats.record_complaint,
                    config.spool.min_free,
                    limits,
                    quota,
                    trust,
                )
            )
        if reports.bounces_address is not None and return_paths is not None:
            intakes.append(
                BounceIntake(
                    reports.bounces_address,
                    classifier,
                    suppressions,
                    root,
                    metrics,
                    log,
                    check,
                    config.spool.min_free,
                    limits,
                    quota,
                    return_paths,
                )
            )
        backends = build_backends(config.auth.backends)
        submission = Submission(config.auth, metrics, log, time.monotonic) if backends else None
        handler = ReceptionHandler(
            config.smtp,
            config.node.hostname,
            spool,
            queue.add,
            metrics,
            log,
            signer=signer,
            suppressions=suppressions,
            intakes=intakes,
            # Each worker (SO_REUSEPORT spreads a client's connections) keeps its share.
            report_rate=ClientRate(
                reports.report_rate_per_client / config.node.workers, reports.complaint_networks
            ),
            submission=submission,
        )
        timer = spawn("queue timer", queue.run_timer())
        opened.callback(timer.cancel)
        sweeper = None
        if intakes and worker == 0:  # one sweeper per volume
            sweeper = spawn(
                "quarantine sweeper",
                sweep_periodically(root / QUARANTINE_DIR, quota, wall_clock, log, check),
            )
            opened.callback(sweeper.cancel)
        protocols = tuple(
            (
                functools.partial(
                    HamtaSMTP,
                    handler,
                    listener=listener,
                    line_length_limit=config.smtp.max_line_length + 2,
                    data_size_limit=config.smtp.max_message_size,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    hostname=config.node.hostname,
                    ident="ESMTP hamta",
                    # 465 is TLS from the first byte (its server's context): no STARTTLS in it.
                    tls_context=None if listener.implicit_tls else inbound_tls,
                    timeout=config.smtp.session_timeout,
                    loop=asyncio.get_running_loop(),
                ),
                inbound_tls if listener.implicit_tls else None,
            )
            for listener in listeners(config.smtp.listeners, backends)
        )
        opened.pop_all()  # built whole: the relay's deactivation closes it from now on
        return ActiveParts(
            spool, queue, engine, router, handler, suppressions, guard, protocols, timer, sweeper
        )


async def _open_suppressions(
    config: Config, root: Path, guard: Callable[[], str | None] | None, log: Any
) -> Suppressions | None:
    """The suppression list on the spool volume, or None (logged) when it cannot be opened.

    A damaged list must not keep a node from taking over: mail then flows unsuppressed and
    complaints get 451 (their senders keep them) until an operator repairs it.
    """
    reports = config.suppression
    policy = DomainFailurePolicy(reports.domain_failure_period, reports.domain_failure_expiry)
    suppressions = Suppressions(root, log, guard, policy)
    try:
        await suppressions.open()
    except SuppressionError as exc:
        log.error("SuppressionUnavailable", error=str(exc))
        await suppressions.close()
        return None
    return suppressions
