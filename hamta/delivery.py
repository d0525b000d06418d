"""Sending mail: SMTP sessions per destination, and what to do with each reply.

Each destination is served by up to its ``max_connections`` sessions, sending at most its
``messages_per_second`` (its :class:`hamta.shaping.Shaper`; slowed down by throttle replies, and
none at all while suspended). A session connects to the first target that answers (MX order),
upgrades with STARTTLS when offered (opportunistic: certificates are not verified, and a failed
handshake falls back to plain text), then takes jobs from its destination's ready line one after
another, reusing the connection, until the line stays empty for ``idle_connection_timeout`` or it
has sent its ``max_messages_per_connection`` messages.

The outcome of every recipient is one of: delivered (2xx), deferred (4xx, or no reply at all:
refused, dropped, timed out) or bounced (5xx, or a routing error that can only be permanent).
Deferred recipients past the queue lifetime expire. Bounced and expired recipients get a DSN.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosmtplib

from hamta import smtp_pipelining as pipelining
from hamta.bounce_classes import BounceClassifier, BounceVerdict, build_classifier
from hamta.config import DeliveryConfig, DnsConfig, RetryConfig, TlsPolicyConfig
from hamta.domain_stats import DomainStats
from hamta.dsn import FailedRecipient, build_dsn, original_headers
from hamta.dsn_batch import DsnBatcher, FailedBatch
from hamta.egress import Egress, Source, address_missing
from hamta.metrics import RelayMetrics
from hamta.outbound_tls import OutboundTls, TlsPolicyError
from hamta.queue import Destination, Job, MailQueue
from hamta.report_rate import ClientRate
from hamta.return_paths import ReturnPaths
from hamta.routing import Router, RoutingError, Target
from hamta.shaping import Shaper, is_throttle_reply, limits_for
from hamta.smtp_replies import message_id_of
from hamta.spool import Spawn, Spool, SpoolError, create_task
from hamta.suppression import DOMAIN_BOUNCE_CLASS, Suppressions
from hamta.tls_policy import Requirement

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Reply:
    """One recipient's result: a reply code (0 when there was none) and its text."""

    code: int
    text: str

    @property
    def enhanced(self) -> str:
        """The enhanced status code, from the text or derived from the basic code."""
        match = _ENHANCED.match(self.text)
        if match:
            return match.group(1)
        if self.code >= 500:
            return "5.0.0"
        if 200 <= self.code < 300:  # a plain "250 OK" (a peer without enhanced codes)
            return "2.0.0"
        return "4.4.1" if self.code == 0 else "4.0.0"

    @property
    def permanent(self) -> bool:
        """5xx: no point in trying again."""
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


class _Connection:
    """An open SMTP client session to one target."""

    def __init__(
        self,
        client: aiosmtplib.SMTP,
        target: Target,
        tls: bool,
        requirement: Requirement,
        failure: str = "",
        source: Source | None = None,
    ) -> None:
        self.client = client
        self.target = target
        # The egress source it was opened from: a message of another source needs another.
        self.source = source
        self.tls = tls
        self.requirement = requirement
        # A policy in testing mode was not met (its RFC 8460 result type), the session went on.
        self.failure = failure or requirement.reported_failure
        self.sent = 0

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.quit(), timeout=2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.client.close()


class SupersededError(Exception):
    """A newer term owns the spool: this relay must not deliver (see ``DeliveryEngine.guard``)."""


class DeliveryEngine:
    """Runs the delivery sessions and applies every outcome to spool, queue and log."""

    def __init__(
        self,
        config: DeliveryConfig,
        hostname: str,
        spool: Spool,
        router: Router,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], float] = time.time,
        share: int = 1,
        retry: RetryConfig | None = None,
        spawn: Spawn = create_task,
        return_paths: ReturnPaths | None = None,
        *,
        guard: Callable[[], str | None] | None = None,
        classifier: BounceClassifier | None = None,
        domain_stats: DomainStats | None = None,
        suppressions: Suppressions | None = None,
        suspended: Iterable[str] = (),
        tls: OutboundTls | None = None,
    ) -> None:
        self.config = config
        # Without one: the configured modes only, no MTA-STS, no DANE (no [dns] dnssec).
        self.tls = tls or OutboundTls(
            config, DnsConfig(), TlsPolicyConfig(mta_sts=False), None, wall_clock, log
        )
        self._spawn = spawn  # the relay's supervisor: a session dying of a bug stops the relay
        self.retry = retry or RetryConfig()
        self.share = share
        # Pending steps back up of throttled destinations, by destination key.
        self._recoveries: dict[str, asyncio.TimerHandle] = {}
        self.hostname = hostname
        self.helo = config.helo_name or hostname
        self.egress = Egress(config.egress)
        self.spool = spool
        self.router = router
        self.metrics = metrics
        self.log = log
        self._wall = wall_clock
        # Owned here: its ready lines start this engine's sessions, shaped by this engine.
        self.queue = MailQueue(
            self.retry,
            router.next_hop,
            wall_clock,
            self.on_ready,
            shaper_for=self.shaper_for,
            suspended=suspended,
        )
        self._sessions: set[asyncio.Task[None]] = set()
        # Failed recipients of a message, collected for one DSN (hamta.dsn_batch).
        self._dsns = DsnBatcher(config.dsn_window, self._send_dsn, spawn)
        # Keyed by sender domain; each of a node's workers keeps its share of the node's rate.
        self._dsn_rate = ClientRate(config.dsn_rate_per_domain / share)
        self._no_tls_until: dict[str, float] = {}
        self._tls_reports: asyncio.Task[None] | None = None
        self.stopping = False
        self._halted = asyncio.Event()  # set by stop()
        # The fencing check (``hamta.epoch_token.EpochGuard.check``), run before each delivery
        # and again before DATA: a relay whose term is over must not deliver one more message.
        self.guard = guard
        self.connections = 0
        # Names each failed attempt's cause; the relay puts the user's rules in front.
        self.classifier = classifier if classifier is not None else build_classifier()
        self.domain_stats = domain_stats
        self.suppressions = suppressions
        # Signs the return path of mail sent from the bounces address (None: none configured).
        self.return_paths = return_paths

    # ---------------------------------------------------------------- sessions

    def shaper_for(self, key: str) -> Shaper:
        """This process's shaping of destination ``key`` (its limits, its share of them)."""
        return Shaper(limits_for(self.config, self.retry, key), self.share)

    def on_ready(self, destination: Destination) -> None:
        """A job joined a ready line: wake an idle session or start one."""
        if self.stopping or destination.suspended:
            return
        if destination.idle:
            destination.wakeup.set()
        if (
            destination.sessions < destination.concurrency
            and len(destination.ready) > destination.idle
        ):
            destination.sessions += 1
            task = self._spawn(f"delivery session {destination.key}", self._session(destination))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _session(self, destination: Destination) -> None:
        connection: _Connection | None = None
        counted = True  # in destination.sessions
        shaper = destination.shaper
        loop = asyncio.get_running_loop()
        try:
            while not self.stopping and not self._superseded():
                if destination.suspended or destination.sessions > shaper.concurrency:
                    # Held, or throttled below the sessions running: this one goes now, and
                    # stops counting at once so that its siblings do not all go too.
                    destination.sessions -= 1
                    counted = False
                    return
                if not destination.ready:
                    if connection is None or not await self._wait_for_work(destination):
                        return
                    continue
                delay = shaper.reserve(loop.time())
                if delay > 0:
                    # Waiting for a send slot ends early when the engine stops.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._halted.wait(), timeout=delay)
                    if self.stopping or destination.suspended or not destination.ready:
                        continue
                job = self.queue.take(destination)
                source, pool, body = await self._source_of(job)
                if connection is not None and connection.source != source:
                    # Connection reuse never mixes sources: this one leaves from another.
                    await self._close(connection)
                    connection = None
                if source is not None and connection is None:
                    missing = address_missing(source.address)
                    if missing is not None:
                        # Not on this host (yet: the agent adds it with the virtual IP).
                        text = f"4.4.3 {missing} (source {source.name}, {pool})"
                        replies = dict.fromkeys(job.rcpts, Reply(0, text))
                        self._apply(job, replies, None, time.perf_counter(), source)
                        continue
                if connection is None:
                    try:
                        connection = await self._connect(job.domain, destination.key, source)
                    except RoutingError as exc:
                        self._routing_failed(destination, job, exc)
                        return
                    except Exception as exc:
                        # A domain dnspython cannot even encode (an empty or over-long label,
                        # bad IDNA), or a fault of ours: the line is retried, then bounced when
                        # its lifetime ends; never left in the spool with no event.
                        self.log.exception(
                            "DeliveryError",
                            queue_id=job.message.rec.qid,
                            domain=job.domain,
                            error=_describe(exc),
                        )
                        failure = RoutingError(
                            f"cannot route: {_describe(exc)}", permanent=False, enhanced="4.4.3"
                        )
                        self._routing_failed(destination, job, failure)
                        return
                destination.in_flight += 1
                try:
                    alive = await self._deliver(connection, job, body, pool)
                except SupersededError:
                    # Drop the link before DATA: the next hop discards the transaction. The job
                    # stays unfinished in the spool, for the term that owns it now.
                    self.queue.settle(job)
                    connection.client.close()
                    connection = None
                    self.connections -= 1
                    return
                except Exception as exc:
                    # A fault of ours must not leave the job in no line at all: retry it later.
                    self.log.exception(
                        "DeliveryError", queue_id=job.message.rec.qid, error=_describe(exc)
                    )
                    reply = Reply(0, f"internal error: {_describe(exc)}")
                    self._apply(
                        job,
                        dict.fromkeys(job.rcpts, reply),
                        connection.target,
                        time.perf_counter(),
                        connection.source,
                    )
                    alive = False
                finally:
                    destination.in_flight -= 1
                connection.sent += 1
                if not alive or connection.sent >= shaper.limits.max_messages_per_connection:
                    await self._close(connection)
                    connection = None
        finally:
            if counted:
                destination.sessions -= 1
            if connection is not None:
                await self._close(connection)
            # Work may have arrived while this session was closing.
            if destination.ready and not self.stopping:
                self.on_ready(destination)

    async def _source_of(self, job: Job) -> tuple[Source | None, str, bytes | None]:
        """The job's egress source, why its pool, and the message when it was read for its
        pool header (hamta.egress); no source when no egress is configured."""
        if not self.egress.enabled:
            return None, "", None
        rec = job.message.rec
        body: bytes | None = None
        header: str | None = None
        if self.egress.config.header:
            try:
                body = await self.spool.read_body(rec)
            except (SpoolError, OSError):
                body = None  # _deliver reads it again, and reports the failure
            else:
                header = self.egress.header_pool(body)
        source, pool = self.egress.choose(rec.qid, rec.sender, header)
        return source, pool, body

    def _superseded(self) -> bool:
        return self.guard is not None and self.guard() is not None

    async def _wait_for_work(self, destination: Destination) -> bool:
        destination.idle += 1
        destination.wakeup.clear()
        try:
            await asyncio.wait_for(
                destination.wakeup.wait(), timeout=self.config.idle_connection_timeout
            )
            return True
        except TimeoutError:
            return bool(destination.ready)
        finally:
            destination.idle -= 1

    async def _close(self, connection: _Connection) -> None:
        self.connections -= 1
        await connection.close()

    async def _connect(
        self, domain: str, destination: str, source: Source | None = None
    ) -> _Connection:
        """Connect to the first target of ``domain`` that greets us with the TLS its policy
        requires (hamta.outbound_tls); raise RoutingError."""
        targets = await self.router.targets(domain)
        mode = self.tls.mode(domain, destination)
        sts = await self.tls.sts(domain, destination, mode)
        errors: list[str] = []
        permanent = False
        tls_failed = False
        for target in targets:
            requirement = await self.tls.requirement(mode, target, sts)
            try:
                if requirement.refuse:
                    raise TlsPolicyError(
                        requirement.refuse, requirement.reported_failure or "validation-failure"
                    )
                connection = await self._open(target, requirement, source)
            except TlsPolicyError as exc:
                tls_failed = True
                self.tls.record(domain, requirement, sts, target, exc.result_type)
                self.metrics.tls_sessions.labels(requirement.policy_type, exc.result_type).inc()
                errors.append(f"{target.mx_host}[{target.ip}]: {exc}")
                self.log.warning(
                    "TlsPolicyFailure",
                    domain=domain,
                    mx_host=target.mx_host,
                    mx_ip=target.ip,
                    policy=requirement.reason,
                    policy_type=requirement.policy_type,
                    result_type=exc.result_type,
                    error=str(exc),
                )
                continue
            except aiosmtplib.SMTPResponseException as exc:
                errors.append(f"{target.mx_host}[{target.ip}]: {exc.code} {exc.message}")
                self._observe_throttle(domain, [Reply(exc.code, exc.message)])
                permanent = permanent or exc.code >= 500
                continue
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                errors.append(f"{target.mx_host}[{target.ip}]:{target.port}: {_describe(exc)}")
                continue
            self.connections += 1
            self.tls.record(domain, connection.requirement, sts, target, connection.failure)
            if connection.requirement.level != "may":
                self.metrics.tls_sessions.labels(
                    connection.requirement.policy_type, connection.failure or "met"
                ).inc()
            return connection
        raise RoutingError(
            "; ".join(errors) or f"no target for {domain}",
            permanent=False,
            # 4.7.5: a cryptographic failure (RFC 3463) kept the message from going.
            enhanced="4.4.2" if permanent else "4.7.5" if tls_failed else "4.4.1",
        )

    async def _open(
        self, target: Target, requirement: Requirement, source: Source | None = None
    ) -> _Connection:
        client = aiosmtplib.SMTP(
            hostname=target.ip,
            port=target.port,
            # The chosen egress source: its address bound, its name in EHLO.
            source_address=(source.address, 0) if source is not None else None,
            local_hostname=source.ehlo_name if source is not None else self.helo,
            timeout=self.config.command_timeout,
            start_tls=False,
            validate_certs=False,
        )
        await client.connect(timeout=self.config.connect_timeout)
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()
        level = requirement.level
        if level == "off":
            return _Connection(client, target, False, requirement, source=source)
        key = f"{target.ip}:{target.port}"
        if not client.supports_extension("starttls"):
            if level == "may" or not requirement.enforce:
                missing = "" if level == "may" else "starttls-not-supported"  # testing: reported
                return _Connection(client, target, False, requirement, missing, source)
            client.close()
            raise TlsPolicyError(
                f"STARTTLS not offered, and {requirement.reason} requires TLS",
                "starttls-not-supported",
            )
        if level == "may" and self._no_tls_until.get(key, 0.0) >= time.monotonic():
            return _Connection(client, target, False, requirement, source=source)
        try:
            await client.starttls(
                tls_context=self.tls.context(requirement), server_hostname=target.mx_host
            )
            self.tls.check(requirement, target, client.get_transport_info("ssl_object"))
            await client.ehlo()  # RFC 3207: the session starts afresh after STARTTLS
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError, TlsPolicyError) as exc:
            client.close()
            failure = exc if isinstance(exc, TlsPolicyError) else _tls_failure(exc, requirement)
            if level != "may" and requirement.enforce:
                raise failure from None
            # Opportunistic TLS (or a policy in testing mode): the failure is remembered for an
            # hour (opportunistic) and the message goes in plain text.
            self.log.warning(
                "StartTlsFailed",
                mx_host=target.mx_host,
                mx_ip=target.ip,
                policy=requirement.reason,
                error=_describe(exc),
            )
            if level == "may":
                self._no_tls_until[key] = time.monotonic() + 3600
                return await self._open(target, _OPPORTUNISTIC, source)
            fallback = await self._open(target, _OPPORTUNISTIC, source)
            return _Connection(
                fallback.client, target, fallback.tls, requirement, failure.result_type, source
            )
        if level != "may":  # a policy applied and was met: say which
            self.log.info(
                "TlsPolicyMet",
                mx_host=target.mx_host,
                mx_ip=target.ip,
                policy=requirement.reason,
                policy_type=requirement.policy_type,
            )
        return _Connection(client, target, True, requirement, source=source)

    # -------------------------------------------------------------- one message

    async def _deliver(
        self, connection: _Connection, job: Job, body: bytes | None = None, pool: str = ""
    ) -> bool:
        """One SMTP transaction for a job (``body``: the message if already read); apply its
        outcome; return False if the link died."""
        rec = job.message.rec
        started = time.perf_counter()
        try:
            if body is None:
                body = await self.spool.read_body(rec)
        except (SpoolError, OSError) as exc:
            self.log.error("SpoolReadError", queue_id=rec.qid, error=str(exc))
            self._apply(
                job,
                {i: Reply(0, f"cannot read queued message: {exc}") for i in job.rcpts},
                connection.target,
                started,
                connection.source,
                pool,
            )
            return True
        if connection.source is not None:
            body = self.egress.strip(body)  # the pool header is ours, not the recipient's
        replies: dict[int, Reply] = {}
        alive = True
        client = connection.client
        rcpts = job.rcpts
        # A reused connection the next hop dropped has forgotten its extensions: it fails below
        # as a lost connection (temporary), and is no reason to bounce.
        if not client.supports_extension("smtputf8") and client.is_connected:
            # RFC 6531 3.4: mail that needs SMTPUTF8 to a next hop without it is a permanent
            # failure; the ASCII recipients of the same job still go.
            unsendable = _needing_smtputf8(rec.sender, rec.recipients, rcpts, connection.target)
            replies.update(unsendable)
            rcpts = tuple(i for i in rcpts if i not in unsendable)
        for sender, indices in self._transactions(rec.sender, job, rcpts):
            if not alive:
                # The link died in an earlier transaction: these were not tried on it.
                for index in indices:
                    replies[index] = Reply(
                        0,
                        f"lost connection with {connection.target.mx_host}[{connection.target.ip}]",
                    )
                continue
            alive = await self._transaction(connection, body, sender, job, indices, replies)
        self.metrics.delivery_seconds.observe(time.perf_counter() - started)
        self._observe_throttle(job.domain, replies.values())
        self._apply(job, replies, connection.target, started, connection.source, pool)
        return alive

    def _transactions(
        self, sender: str, job: Job, rcpts: tuple[int, ...]
    ) -> list[tuple[str, tuple[int, ...]]]:
        """The envelope sender of each transaction a job takes, and its recipients.

        One transaction for all, unless the sender is the bounces address: then each recipient
        gets a return path signed for it (hamta.return_paths), hence a transaction of its own.
        """
        paths = self.return_paths
        if not rcpts:
            return []
        if paths is None or not sender or not paths.is_bounces_sender(sender):
            return [(sender, rcpts)]
        recipients = job.message.rec.recipients
        return [(paths.sign(recipients[i]), (i,)) for i in rcpts]

    async def _transaction(
        self,
        connection: _Connection,
        body: bytes,
        sender: str,
        job: Job,
        indices: tuple[int, ...],
        replies: dict[int, Reply],
    ) -> bool:
        """MAIL, RCPT and DATA for ``indices``; their replies; False if the link died."""
        client = connection.client
        rec = job.message.rec
        alive = True
        try:
            options = [f"SIZE={len(body)}"] if client.supports_extension("size") else []
            if client.supports_extension("8bitmime") and not body.isascii():
                options.append("BODY=8BITMIME")
            addresses = [sender, *(rec.recipients[i] for i in indices)]
            if client.supports_extension("smtputf8") and not all(a.isascii() for a in addresses):
                options.append("SMTPUTF8")
            encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
            if client.supports_extension("pipelining"):
                return await self._pipelined(
                    connection, body, sender, job, indices, replies, options, encoding
                )
            # The addresses were checked at reception; aiosmtplib's mail()/rcpt() would parse
            # them again with the email package, a large part of a delivery's CPU time.
            response = await client.execute_command(
                b"MAIL",
                b"FROM:<" + sender.encode(encoding) + b">",
                *(option.encode() for option in options),
            )
            if response.code != 250:
                raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
            accepted: list[int] = []
            for index in indices:
                address = rec.recipients[index]
                response = await client.execute_command(
                    b"RCPT", b"TO:<" + address.encode(encoding) + b">"
                )
                if response.code in (250, 251):
                    accepted.append(index)
                else:
                    replies[index] = Reply(response.code, response.message)
                    if response.code == 421:
                        raise aiosmtplib.SMTPResponseException(response.code, response.message)
            if accepted:
                if self._superseded():
                    raise SupersededError
                try:
                    response = await client.data(body)
                    reply = Reply(response.code, response.message)
                except aiosmtplib.SMTPDataError as exc:
                    reply = Reply(exc.code, exc.message)
                replies.update(dict.fromkeys(accepted, reply))
            else:
                await client.rset()
        except aiosmtplib.SMTPResponseException as exc:
            # MAIL refused, or a reply that ended the session (421).
            reply = Reply(exc.code, exc.message)
            for index in indices:
                replies.setdefault(index, reply)
            alive = exc.code != 421 and client.is_connected
        except (aiosmtplib.SMTPException, OSError, TimeoutError, UnicodeError) as exc:
            reply = Reply(
                0,
                f"lost connection with {connection.target.mx_host}"
                f"[{connection.target.ip}]: {_describe(exc)}",
            )
            for index in indices:
                replies.setdefault(index, reply)
            alive = False
        return alive

    async def _pipelined(
        self,
        connection: _Connection,
        body: bytes,
        sender: str,
        job: Job,
        indices: tuple[int, ...],
        replies: dict[int, Reply],
        options: list[str],
        encoding: str,
    ) -> bool:
        """_transaction's exchange with a next hop that offers PIPELINING (hamta.smtp_pipelining):
        MAIL, the RCPTs and DATA in one write, the body after the 354. Its exceptions are
        _transaction's to handle; the replies mean what they mean there."""
        client = connection.client
        rec = job.message.rec
        if self._superseded():
            raise SupersededError
        mail = b" ".join(
            [b"MAIL FROM:<" + sender.encode(encoding) + b">"]
            + [option.encode() for option in options]
        )
        rcpts = [b"RCPT TO:<" + rec.recipients[i].encode(encoding) + b">" for i in indices]
        got = await pipelining.send_pipelined(client, [mail, *rcpts, b"DATA"], client.timeout)
        if got[0].code != 250:
            # MAIL refused (or 421): every recipient gets its reply, as without pipelining.
            if len(got) == len(rcpts) + 2 and got[-1].code == 354:
                client.close()  # a DATA begun for no transaction: nothing sane can follow
            raise aiosmtplib.SMTPSenderRefused(got[0].code, got[0].message, sender)
        accepted: list[int] = []
        for index, response in zip(indices, got[1 : len(rcpts) + 1], strict=False):
            if response.code in (250, 251):
                accepted.append(index)
            else:
                replies[index] = Reply(response.code, response.message)
        if got[-1].code == 421:
            raise aiosmtplib.SMTPResponseException(got[-1].code, got[-1].message)
        data = got[-1]
        if data.code != 354:
            replies.update(dict.fromkeys(accepted, Reply(data.code, data.message)))
            if not accepted:
                await client.rset()
            return True
        if not accepted or self._superseded():
            # Nothing to send after a 354 (no recipient, or no longer ours): drop the link,
            # the next hop discards the transaction.
            client.close()
            if accepted:
                raise SupersededError
            return False
        reply = await pipelining.send_body(client, body, client.timeout)
        replies.update(dict.fromkeys(accepted, Reply(reply.code, reply.message)))
        return reply.code != 421

    # ---------------------------------------------------------------- throttling

    def _observe_throttle(self, domain: str, replies: Iterable[Reply]) -> None:
        """Slow a destination down when one of its replies says so (AIMD, hamta.shaping)."""
        reply = next(
            (r for r in replies if is_throttle_reply(r.code, r.text, self.classifier)), None
        )
        if reply is None:
            return
        destination = self.queue.destination_for(domain)
        if destination.shaper.throttle(asyncio.get_running_loop().time()):
            self.log.warning(
                "DestinationThrottled",
                destination=destination.key,
                code=reply.code,
                response=reply.text,
                **_shaping_fields(destination),
            )
        self._schedule_recovery(destination)

    def _schedule_recovery(self, destination: Destination) -> None:
        if destination.key in self._recoveries or self.stopping:
            return
        delay = destination.shaper.seconds_to_recovery(asyncio.get_running_loop().time())
        self._recoveries[destination.key] = asyncio.get_running_loop().call_later(
            delay, self._recover, destination
        )

    def _recover(self, destination: Destination) -> None:
        del self._recoveries[destination.key]
        if destination.shaper.recover(asyncio.get_running_loop().time()):
            self.log.info(
                "DestinationRecovered",
                destination=destination.key,
                **_shaping_fields(destination),
            )
            if destination.ready:
                self.on_ready(destination)  # room for one more session now
        if destination.throttled:
            self._schedule_recovery(destination)

    def _routing_failed(self, destination: Destination, job: Job, exc: RoutingError) -> None:
        """No session could be had: the job and its whole line share the outcome."""
        jobs = [job, *self.queue.take_all(destination)]
        code = 550 if exc.permanent else 0
        text = f"{exc.enhanced} {exc}"
        for each in jobs:
            replies = {i: Reply(code, text) for i in each.rcpts}
            self._apply(each, replies, None, time.perf_counter())

    # ----------------------------------------------------------------- outcomes

    def _apply(
        self,
        job: Job,
        replies: dict[int, Reply],
        target: Target | None,
        started: float,
        source: Source | None = None,
        pool: str = "",
    ) -> None:
        self.queue.settle(job)  # before a deferral puts it in the deferred heap: counted once
        rec = job.message.rec
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        delivered = [i for i, r in replies.items() if 200 <= r.code < 300]
        bounced = [i for i, r in replies.items() if r.permanent]
        deferred = [i for i in job.rcpts if i not in delivered and i not in bounced]
        attempt = job.attempts + 1
        expired: list[int] = []
        if deferred and self.queue.is_expired(job):
            expired, deferred = deferred, []
        verdicts = self._classify(job.domain, replies, delivered, expired, latency_ms)
        for index in job.rcpts:
            reply = replies[index]
            verdict = verdicts.get(index)
            if verdict is not None and index in bounced and self.suppressions is not None:
                if target is None or verdict.bounce_class == DOMAIN_BOUNCE_CLASS:
                    # No MX answered for this mailbox (NXDOMAIN, null MX, no route): a DNS
                    # outage must not suppress a domain's users; counted, suppressed only
                    # after it goes on (hamta.suppression.DomainFailurePolicy).
                    self.suppressions.record_domain_failure(rec.recipients[index], str(reply))
                else:  # the recipient's MX said so: suppressed if the mailbox does not exist
                    self.suppressions.record_hard_bounce(
                        rec.recipients[index], verdict.bounce_class, str(reply)
                    )
            kind = (
                "Delivery"
                if index in delivered
                else "Bounce"
                if index in bounced
                else "Expiration"
                if index in expired
                else "TransientFailure"
            )
            self.log.info(
                kind,
                queue_id=rec.qid,
                message_id=rec.message_id,
                sender=rec.sender,
                recipient=rec.recipients[index],
                domain=job.domain,
                mx_host=target.mx_host if target else None,
                mx_ip=target.ip if target else None,
                code=reply.code or None,
                enhanced_code=reply.enhanced,
                response=reply.text,
                attempt=attempt,
                size=rec.length,
                latency_ms=latency_ms,
                **({"bounce_class": verdict.bounce_class} if verdict else {}),
                **(_source_fields(source, pool) if source else {}),
            )
            if source is not None:
                outcome = kind.lower() if kind != "TransientFailure" else "deferred"
                self.metrics.egress_deliveries.labels(source.name, outcome).inc()
        if delivered:
            self.metrics.deliveries.labels("delivered").inc(len(delivered))
            self.metrics.delivered_rate.add(len(delivered))
        if bounced or expired:
            self.metrics.deliveries.labels("bounced").inc(len(bounced))
            self.metrics.deliveries.labels("expired").inc(len(expired))
            self.metrics.bounced_rate.add(len(bounced) + len(expired))
        failed = bounced + expired
        if failed:
            mx = target.mx_host if target else ""
            expiry = f"delivery time expired after {attempt} attempts; last error:"
            reports = [
                FailedRecipient(
                    rec.recipients[i],
                    "4.4.7" if i in expired else replies[i].enhanced,
                    f"{expiry} {replies[i]}" if i in expired else str(replies[i]),
                    mx,
                )
                for i in failed
            ]
            self._dsns.add(
                job.message, job.domain, failed, reports, expired=bool(expired), attempts=attempt
            )
        if delivered:
            self.spool.mark_done(job.message, delivered)
        if deferred:
            self.metrics.deliveries.labels("deferred").inc(len(deferred))
            job.rcpts = tuple(deferred)
            due = self.queue.defer(job)
            self.spool.mark_deferred(job.message, deferred, job.attempts, due)

    def _classify(
        self,
        domain: str,
        replies: dict[int, Reply],
        delivered: list[int],
        expired: list[int],
        latency_ms: float,
    ) -> dict[int, BounceVerdict]:
        """Class every failed recipient; count outcomes per class and per domain."""
        stats = self.domain_stats
        if delivered and stats is not None:
            stats.record(domain, "delivered", len(delivered), latency_ms=latency_ms)
        verdicts: dict[int, BounceVerdict] = {}
        for index, reply in replies.items():
            if index in delivered:
                continue
            verdict = self.classifier.classify(reply.code, reply.enhanced, reply.text)
            verdicts[index] = verdict
            self.metrics.bounces.labels(verdict.bounce_class, verdict.kind).inc()
            self.metrics.bounce_replies.labels(str(reply.code) if reply.code else "none").inc()
            if stats is not None:
                outcome = (
                    "bounced" if reply.permanent else "expired" if index in expired else "deferred"
                )
                stats.record(domain, outcome, bounce_class=verdict.bounce_class)
        return verdicts

    async def _send_dsn(self, batch: FailedBatch) -> None:
        """Queue one DSN to the sender for a message's failed recipients, then finish them.

        Never to the null sender, nor for a DSN; not beyond the sender domain's DSN rate.
        """
        message = batch.message
        rec = message.rec
        rcpts = [index for _, group, _ in batch.groups for index in group]
        domain = rec.sender.rpartition("@")[2].lower()
        if not rec.sender or rec.is_dsn:
            self.metrics.dsns.labels("suppressed").inc()
            self.log.info(
                "DsnSuppressed",
                queue_id=rec.qid,
                reason="null sender" if not rec.sender else "bounce of a bounce",
            )
        elif not self._dsn_rate.allow(domain, asyncio.get_running_loop().time()):
            self.metrics.dsns.labels("rate_limited").inc()
            self.log.warning(
                "DsnRateLimited",
                queue_id=rec.qid,
                sender_domain=domain,
                recipients=len(batch.reports),
                per_minute=self.config.dsn_rate_per_domain,
            )
        else:
            try:
                headers = original_headers(await self.spool.read_body(rec))
            except (SpoolError, OSError):
                headers = b""
            try:
                dsn = build_dsn(
                    reporting_mta=self.hostname,
                    queue_id=rec.qid,
                    original_sender=rec.sender,
                    arrival=rec.arrival,
                    failed=batch.reports,
                    headers=headers,
                    expired=batch.expired,
                    now=self._wall(),
                )
            except Exception as exc:
                # This message's fault, and for good: its recipients are finished without a DSN
                # (logged) rather than retried for ever or, escaping this supervised task,
                # stopping the relay for one message.
                self.log.error(
                    "DsnNotBuilt",
                    queue_id=rec.qid,
                    error=f"{type(exc).__name__}: {exc}",
                    recipients=[r.address for r in batch.reports],
                )
                self.spool.mark_done(message, rcpts)
                return
            try:
                notice = await self.spool.append(
                    dsn, "", [rec.sender], message_id=message_id_of(dsn), is_dsn=True
                )
            except SpoolError as exc:
                # Keep the recipients queued: the bounce is tried again at their next attempt.
                self.log.error("DsnNotQueued", queue_id=rec.qid, error=str(exc))
                for destination, group, attempts in batch.groups:
                    retry = Job(message, destination, tuple(group), attempts)
                    due = self.queue.defer(retry)
                    self.spool.mark_deferred(message, group, retry.attempts, due)
                return
            self.metrics.dsns.labels("queued").inc()
            self.log.info(
                "DsnQueued",
                queue_id=notice.rec.qid,
                original_queue_id=rec.qid,
                recipient=rec.sender,
                failed_recipients=len(batch.reports),
            )
            self.queue.add(notice)
        self.spool.mark_done(message, rcpts)

    # ----------------------------------------------------------------- TLS reports

    def start_tls_reports(self, interval: float = 3600.0) -> None:
        """Send the TLS reports of days gone by, now and every ``interval`` (RFC 8460)."""
        if self.tls.reports is not None:
            self._tls_reports = self._spawn("tls reports", self._tls_report_loop(interval))

    async def _tls_report_loop(self, interval: float) -> None:
        reports = self.tls.reports
        assert reports is not None
        while not self.stopping:
            if not self._superseded():
                try:
                    await reports.send_due(self._enqueue_report)
                except OSError as exc:  # the spool volume: tried again at the next round
                    self.log.error("TlsReportsNotSent", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._halted.wait(), timeout=interval)

    async def _enqueue_report(self, body: bytes, sender: str, recipients: list[str]) -> None:
        """A report queued as a message of this relay's (its 250: after the spool's fsync)."""
        notice = await self.spool.append(body, sender, recipients, message_id=message_id_of(body))
        self.log.info("TlsReportQueued", queue_id=notice.rec.qid, recipients=recipients)
        self.queue.add(notice)

    # ------------------------------------------------------------------ stopping

    def halt(self) -> None:
        """Start nothing more: each session ends after the transaction it is in."""
        self.stopping = True
        for destination in self.queue.destinations.values():
            destination.wakeup.set()

    async def stop(self, timeout: float) -> None:
        """Let running transactions finish (up to ``timeout``), then close every session."""
        self.halt()
        self._halted.set()
        if self._tls_reports is not None:
            self._tls_reports.cancel()
        if self.tls.reports is not None:
            self.tls.reports.flush()  # the day's counts so far, for the node after this one
        for handle in self._recoveries.values():
            handle.cancel()
        self._recoveries.clear()
        started = time.monotonic()
        pending = set(self._sessions)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=2)
        # The DSNs of batches still open are queued now, not after their window.
        flushing = asyncio.get_running_loop().create_task(self._dsns.flush_all())
        await asyncio.wait({flushing}, timeout=max(1.0, timeout - (time.monotonic() - started)))


def _source_fields(source: Source, pool: str) -> dict[str, Any]:
    """An event's egress fields: the source that was (or would have been) used."""
    fields = {"egress_source": source.name, "egress_address": source.address}
    fields["ehlo_name"] = source.ehlo_name
    if pool:
        fields["egress_pool"] = pool
    return fields


def _shaping_fields(destination: Destination) -> dict[str, Any]:
    """A destination's shaping now, for its log lines (this process's share of the node's)."""
    rate = destination.shaper.rate
    return {
        "throttled": destination.throttled,
        "messages_per_second": round(rate, 3) if rate is not None else None,
        "concurrency": destination.concurrency,
    }


def _needing_smtputf8(
    sender: str, recipients: Sequence[str], rcpts: tuple[int, ...], target: Target
) -> dict[int, Reply]:
    """The recipients that cannot go to ``target`` (no SMTPUTF8): all if the sender is UTF-8."""
    failing = rcpts if not sender.isascii() else [i for i in rcpts if not recipients[i].isascii()]
    text = (
        f"5.6.7 {target.mx_host}[{target.ip}] does not support SMTPUTF8, which this "
        f"{'sender' if not sender.isascii() else 'recipient'} address needs (RFC 6531 3.4)"
    )
    return {index: Reply(553, text) for index in failing}


_OPPORTUNISTIC = Requirement("may", "opportunistic")


def _tls_failure(exc: BaseException, requirement: Requirement) -> TlsPolicyError:
    """A failed handshake as the policy's failure, with its RFC 8460 result type."""
    text = _describe(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        kind = (
            "certificate-host-mismatch"
            if "hostname" in text.lower() or "match" in text.lower()
            else "certificate-expired"
            if "expired" in text.lower()
            else "certificate-not-trusted"
        )
    else:
        kind = "validation-failure"
    return TlsPolicyError(f"TLS with {requirement.reason} failed: {text}", kind)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
