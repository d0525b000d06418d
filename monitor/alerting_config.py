"""The alerting sections of monitor.toml: ``[notifiers.NAME]``, ``[[escalation]]``,
``[[maintenance]]`` and ``[alerting]``.

Checks that need more than one section (an escalation step naming a notifier, a window naming a
check, an email smarthost that is a monitored relay) are in monitor.config, on the fields that
come last, so that every error still names its key.
"""

from __future__ import annotations

import datetime as dt
import socket
import stat
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hamta.config import Count, PositiveSeconds, Seconds, parse_hostport
from monitor.maintenance import WEEKDAYS, Window

PAGERDUTY_EVENTS = "https://events.pagerduty.com/v2/enqueue"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


class _HttpNotifier(_Model):
    url: str
    # One attempt's limit; a receiver that hangs costs this, then a retry.
    timeout: PositiveSeconds = 10.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _http_url(value)


class WebhookNotifier(_HttpNotifier):
    """A JSON POST of the incident (monitor.notifiers.webhook)."""

    kind: Literal["webhook"]
    headers: dict[str, str] = Field(default_factory=dict)


class SlackNotifier(_HttpNotifier):
    kind: Literal["slack"]


class TeamsNotifier(_HttpNotifier):
    kind: Literal["teams"]


class PagerDutyNotifier(_HttpNotifier):
    """Events API v2; the routing key is read from a file only its owner may read."""

    kind: Literal["pagerduty"]
    url: str = PAGERDUTY_EVENTS
    routing_key_file: Path
    # The "source" of the events: where the monitor runs.
    source: str = Field(default_factory=socket.gethostname)

    @field_validator("routing_key_file")
    @classmethod
    def _private(cls, value: Path) -> Path:
        try:
            info = value.stat()
        except OSError as exc:
            raise ValueError(f"{value}: {exc.strerror}") from None
        if stat.S_IMODE(info.st_mode) & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise ValueError(f"{value} is mode {mode:04o}; a routing key must be 0600")
        if not value.read_text().strip():
            raise ValueError(f"{value} is empty")
        return value

    def routing_key(self) -> str:
        return self.routing_key_file.read_text().strip()


class EmailNotifier(_Model):
    """Mail through a smarthost that is not the monitored relay (aiosmtplib)."""

    kind: Literal["email"]
    smarthost: str
    sender: str
    recipients: Annotated[list[str], Field(min_length=1)]
    starttls: bool = True
    username: str | None = None
    password_file: Path | None = None
    timeout: PositiveSeconds = 30.0

    @field_validator("smarthost")
    @classmethod
    def _hostport(cls, value: str) -> str:
        parse_hostport(value, 25)
        return value

    @model_validator(mode="after")
    def _login(self) -> EmailNotifier:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if self.password_file is not None and not self.password_file.is_file():
            raise ValueError(f"password_file: no such file: {self.password_file}")
        return self


Notifier = Annotated[
    WebhookNotifier | SlackNotifier | TeamsNotifier | PagerDutyNotifier | EmailNotifier,
    Field(discriminator="kind"),
]
NOTIFIER_KINDS = ("webhook", "slack", "teams", "pagerduty", "email")


class EscalationStep(_Model):
    """At this incident age, these notifiers (once per incident, unless acknowledged)."""

    after: Seconds = 0.0
    notifiers: Annotated[list[str], Field(min_length=1)]


class MaintenanceWindow(_Model):
    """One-off (``start``, ``end``) or recurring (``days``, ``time``, ``duration``, in
    ``timezone``)."""

    name: str
    checks: list[str] = Field(default_factory=list)  # empty: every check
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    days: list[str] = Field(default_factory=list)
    time: dt.time | None = None
    duration: PositiveSeconds | None = None
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r} (an IANA name: Europe/Stockholm)"
            ) from None
        return value

    @field_validator("days")
    @classmethod
    def _days(cls, value: list[str]) -> list[str]:
        for day in value:
            if day.lower()[:3] not in WEEKDAYS:
                raise ValueError(f"not a weekday: {day!r} (mon, tue, ... sun)")
        return [day.lower()[:3] for day in value]

    @model_validator(mode="after")
    def _one_kind(self) -> MaintenanceWindow:
        one_off = self.start is not None or self.end is not None
        recurring = bool(self.days) or self.time is not None or self.duration is not None
        if one_off and recurring:
            raise ValueError("give start and end, or days, time and duration, not both")
        if one_off:
            if self.start is None or self.end is None:
                raise ValueError("a one-off window needs both start and end")
            if self._aware(self.end) <= self._aware(self.start):
                raise ValueError(f"ends ({self.end}) before it starts ({self.start})")
        elif not (self.days and self.time is not None and self.duration is not None):
            raise ValueError("a recurring window needs days, time and duration")
        return self

    def _aware(self, value: dt.datetime) -> dt.datetime:
        # A date-time written without an offset is read in the window's time zone.
        return value if value.tzinfo else value.replace(tzinfo=ZoneInfo(self.timezone))

    def window(self) -> Window:
        if self.start is not None and self.end is not None:
            start = self._aware(self.start).timestamp()
            end = self._aware(self.end).timestamp()
            return Window(self.name, tuple(self.checks), start, end, zone=self.timezone)
        return Window(
            self.name,
            tuple(self.checks),
            days=tuple(sorted(WEEKDAYS.index(day) for day in self.days)),
            at=self.time,
            duration=self.duration or 0.0,
            zone=self.timezone,
        )


class AlertingConfig(_Model):
    """How notifications are sent: retried with backoff, in a bounded queue per notifier."""

    # Notifications waiting per notifier; past this, new ones are dropped (and counted).
    queue: Count = 100
    # Attempts per notification, waits doubling from retry_wait up to retry_max_wait.
    attempts: Count = 5
    retry_wait: PositiveSeconds = 1.0
    retry_max_wait: PositiveSeconds = 60.0
    # How often open incidents are looked at for the escalation steps that came due.
    tick: PositiveSeconds = 1.0
