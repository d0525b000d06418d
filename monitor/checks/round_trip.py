"""The round-trip check: a probe message through the service, followed to its delivery, timed.

The probe is sent as the smtp/submission checks open a session (``smtp.open_session``), with
a unique token in its Message-ID and in an ``X-Hamta-Probe`` header, then followed in the
relay's event log (its lines naming the queue id of the 250: Delivery, TransientFailure,
Bounce, Expiration) and/or in the probe mailbox (a Maildir or a directory of one file a
message). A failure names where the probe stopped: **refused** (the SMTP reply), **queued**
(accepted, no delivery attempt seen), **deferred** (the relay's reason), **bounced**, or
**never arrived** (delivered per the log but not in the mailbox, or nothing at all).

The last tenth of the timeout is kept to say that, rather than let the engine's timeout cut
the check off with "no answer". Probe files of this check found in the mailbox are removed,
the late ones of earlier runs too: the check never fills a mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiosmtplib

from monitor.checks.smtp import open_session
from monitor.config import RoundTripCheck
from monitor.observation import CheckContext, CheckFailedError, CheckWarningError, Findings

PROBE_HEADER = "X-Hamta-Probe"
_QUEUED_AS = re.compile(r"queued as (\S+)", re.IGNORECASE)
# A probe's header block is small; a mailbox file is read no further than this.
_HEAD_BYTES = 16 * 1024
_ATTEMPT_EVENTS = ("Delivery", "TransientFailure", "Bounce", "Expiration")
# How long the relay's log is read on for the delivery line of a probe already in the mailbox
# (the CI once saw the file before the line: an arrival without its delivery time), and how often.
_DELIVERY_LOG_GRACE = 1.0
_DELIVERY_LOG_POLL = 0.05


def message_id(check: RoundTripCheck, token: str) -> str:
    return f"<{token}.probe@{check.ehlo_name}>"


def probe_message(check: RoundTripCheck, token: str, now: float) -> bytes:
    message = EmailMessage()
    message["From"] = check.sender
    message["To"] = check.recipient
    message["Subject"] = f"hamta round-trip probe {check.name}"
    message["Date"] = formatdate(now)
    message["Message-ID"] = message_id(check, token)
    message[PROBE_HEADER] = f"{check.name} {token}"
    message.set_content("A probe of the mail path; the monitor removes it when it arrives.\n")
    return message.as_bytes(policy=SMTP_POLICY)


@dataclass(slots=True)
class LogTail:
    """The relay's event log from where it ended when the probe was sent, read as it grows."""

    path: Path
    offset: int = 0
    rest: bytes = b""

    @classmethod
    def at_end(cls, path: Path) -> LogTail:
        try:
            return cls(path, path.stat().st_size)
        except FileNotFoundError:  # not written yet: everything it will hold is new
            return cls(path, 0)

    def read(self) -> list[dict[str, Any]]:
        """The whole JSON lines added since the last read (a rotated log is read from 0)."""
        try:
            with open(self.path, "rb") as log:
                if log.seek(0, 2) < self.offset:
                    self.offset, self.rest = 0, b""
                log.seek(self.offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:  # not one of the relay's lines
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def _probe_of(path: Path) -> str | None:
    """The value of a file's X-Hamta-Probe header, None if it has none (not a probe)."""
    try:
        with open(path, "rb") as file:
            head = file.read(_HEAD_BYTES)
    except OSError:
        return None
    prefix = PROBE_HEADER.lower().encode() + b":"
    for line in re.split(rb"\r?\n", head.split(b"\r\n\r\n")[0].split(b"\n\n")[0]):
        if line.lower().startswith(prefix):
            return line[len(prefix) :].decode("ascii", "replace").strip()
    return None


def sweep_mailbox(mailbox: Path, check: str, token: str) -> tuple[float | None, list[str]]:
    """Remove this check's probes from ``mailbox``: (when the one of ``token`` was written,
    as a wall time, None if it is not there; problems)."""
    folders = [mailbox / "new", mailbox / "cur"] if (mailbox / "new").is_dir() else [mailbox]
    found: float | None = None
    problems: list[str] = []
    for folder in folders:
        try:
            files = [entry for entry in folder.iterdir() if entry.is_file()]
        except OSError as exc:
            problems.append(f"{folder}: {exc.strerror}")
            continue
        for file in files:
            probe = _probe_of(file)
            if probe is None or probe.split(" ")[0] != check:
                continue  # another's mail, or another check's probe: not ours to remove
            if probe == f"{check} {token}":
                with contextlib.suppress(OSError):
                    found = file.stat().st_mtime
                found = found if found is not None else 0.0
            try:
                file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                problems.append(f"cannot remove {file}: {exc.strerror}")
    return found, problems


@dataclass(slots=True)
class Trail:
    """What was seen of the probe, and when (seconds after it was sent)."""

    queue_id: str | None
    message_id: str
    recipient: str
    accepted: float
    attempts: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    arrived: float | None = None

    def note(self, events: list[dict[str, Any]], at: float, now: float) -> None:
        """Keep the probe's events, each at the time its line says (``now``: the run's start,
        wall time), within what is known for sure: after the 250, by the time it was read."""
        for event in events:
            kind = event.get("event")
            if kind not in _ATTEMPT_EVENTS or event.get("recipient") != self.recipient:
                continue
            # By the queue id of the 250, or, if the reply named none, by the Message-ID.
            ours = event.get("queue_id") == self.queue_id if self.queue_id else None
            if ours or (ours is None and event.get("message_id") == self.message_id):
                self.attempts[str(kind)] = (self.within(_wall(event) - now, at), event)

    def within(self, seconds: float, seen: float) -> float:
        """``seconds`` (from another clock: a log line's, a file's) clamped to what was seen."""
        return min(max(seconds, self.accepted), seen)

    def last(self, kind: str) -> tuple[float, dict[str, Any]] | None:
        return self.attempts.get(kind)


def _wall(event: dict[str, Any]) -> float:
    """The wall time of a relay's log line (its ``ts``); infinity when it has none."""
    try:
        stamp = datetime.datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return math.inf  # clamped to when it was read
    return stamp.timestamp()


def _reply(event: dict[str, Any]) -> str:
    text = " ".join(str(event.get("response") or "").split())
    code = event.get("code")
    return f"{code} {text}".strip() if code else text or "no reply"


def _refused(found: Findings, reply: str) -> CheckFailedError:
    found.facts["stage"] = "refused"
    return CheckFailedError(f"refused: {reply}")


async def _send(check: RoundTripCheck, message: bytes, found: Findings) -> str:
    """Send the probe; the 250's text, or CheckFailedError "refused: ..." with the reply."""
    client, _ = await open_session(
        check, found, starttls=check.starttls, auth=check.login is not None
    )
    try:
        try:
            _, reply = await client.sendmail(check.sender, [check.recipient], message)
        except aiosmtplib.SMTPSenderRefused as exc:
            raise _refused(found, f"MAIL FROM {exc.code} {exc.message}") from None
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise _refused(found, f"RCPT TO {first.code} {first.message}") from None
        except aiosmtplib.SMTPDataError as exc:
            raise _refused(found, f"DATA {exc.code} {exc.message}") from None
        # The message was accepted; a rude goodbye changes nothing of it.
        with contextlib.suppress(aiosmtplib.SMTPException):
            await client.quit()
    finally:
        client.close()
    return reply


async def run_round_trip(check: RoundTripCheck, context: CheckContext, found: Findings) -> str:
    loop = asyncio.get_running_loop()
    start = loop.time()
    token = secrets.token_hex(12)
    tail = LogTail.at_end(check.relay_log) if check.relay_log is not None else None
    reply = await _send(check, probe_message(check, token, context.now), found)
    match = _QUEUED_AS.search(reply)
    queue_id = match.group(1) if match else None
    trail = Trail(queue_id, message_id(check, token), check.recipient, loop.time() - start)
    found.facts.update(accepted_seconds=round(trail.accepted, 3), queue_id=trail.queue_id)
    follow_until = start + check.timeout * 0.9
    problems: list[str] = []
    arrived: float | None = None  # the probe's file time (the sweep removes the file)
    log_until = 0.0
    while True:
        at = loop.time() - start
        if tail is not None:
            trail.note(await asyncio.to_thread(tail.read), at, context.now)
        if check.mailbox is not None and arrived is None:
            arrived, problems = await asyncio.to_thread(
                sweep_mailbox, check.mailbox, check.name, token
            )
            if arrived is not None and tail is not None:
                # The relay logs its delivery once the MX's 250 is in, a moment after the file
                # is there: its log is read on a little before the trail is closed.
                log_until = loop.time() + _DELIVERY_LOG_GRACE
        if arrived is not None and (trail.last("Delivery") is not None or loop.time() >= log_until):
            delivered = trail.last("Delivery")
            trail.arrived = max(
                trail.within(arrived - context.now, at), delivered[0] if delivered else 0.0
            )
        outcome = _settled(check, trail, found)
        if outcome is not None:
            if problems:
                raise CheckWarningError(f"{outcome}; {'; '.join(problems)}")
            return outcome
        if loop.time() >= follow_until:
            break
        # Polling: the log and the mailbox are another process's files, with nothing to wait on.
        pause = check.poll if arrived is None else min(check.poll, _DELIVERY_LOG_POLL)
        await asyncio.sleep(min(pause, max(0.0, follow_until - loop.time())))
    stage, detail = _stopped(check, trail, loop.time() - start)
    found.facts["stage"] = stage
    raise CheckFailedError(detail)


def _settled(check: RoundTripCheck, trail: Trail, found: Findings) -> str | None:
    """The success detail once the probe is through, None while on its way; raises if bounced."""
    head = f"accepted {trail.accepted:.2f}s"
    if trail.queue_id:
        head += f" as {trail.queue_id}"
    for kind in ("Bounce", "Expiration"):
        seen = trail.last(kind)
        if seen is not None:
            found.facts["stage"] = "bounced"
            raise CheckFailedError(f"bounced: {_reply(seen[1])} ({head})")
    delivered = trail.last("Delivery")
    if delivered is not None:
        found.facts["delivered_seconds"] = round(delivered[0], 3)
    if trail.arrived is not None:
        found.facts.update(stage="arrived", arrived_seconds=round(trail.arrived, 3))
        middle = f", delivered {delivered[0]:.2f}s" if delivered is not None else ""
        return f"{head}{middle}, arrived {trail.arrived:.2f}s"
    if delivered is not None and check.mailbox is None:
        found.facts["stage"] = "delivered"
        return f"{head}, delivered {delivered[0]:.2f}s to {delivered[1].get('mx_host')}"
    return None


def _stopped(check: RoundTripCheck, trail: Trail, waited: float) -> tuple[str, str]:
    """Where the probe stopped: the ``stage`` fact and the failure's detail."""
    delivered = trail.last("Delivery")
    deferred = trail.last("TransientFailure")
    accepted = f"accepted as {trail.queue_id}" if trail.queue_id else "accepted"
    if delivered is not None:
        return "never_arrived", (
            f"never arrived: delivered {delivered[0]:.2f}s to {delivered[1].get('mx_host')}"
            f" ({_reply(delivered[1])}) but not in the mailbox after {waited:.1f}s"
        )
    if deferred is not None:
        attempt = deferred[1].get("attempt")
        return "deferred", f"deferred: {_reply(deferred[1])} (attempt {attempt}, {accepted})"
    if check.relay_log is not None:
        return "queued", f"queued: {accepted}, no delivery attempt seen in {waited:.1f}s"
    return "never_arrived", f"never arrived: {accepted}, not in the mailbox after {waited:.1f}s"
