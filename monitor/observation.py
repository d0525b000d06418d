"""What one run of a check saw: plain data, shared by the checks, the engine and the store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from monitor.verdicts import Outcome

if TYPE_CHECKING:
    from hamta.dkim_signing import SigningKey

Fact = str | int | float | bool | None


class Clock(Protocol):
    """The engine's clock, injected: wall time for records, monotonic time for durations."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clock; the engine and the checks read time only through a Clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class Observation:
    """One run: its outcome, how long it took, one line of detail, facts and change events.

    ``facts`` are figures worth a metric or a column (``days_to_expiry``, ``tls_version``);
    ``answers`` are what a DNS check read, kept by the store to tell the next run's changes;
    ``changes`` are one line each (``MX example.org: 10 mx1. → 10 mx2.``).
    """

    check: str
    kind: str
    outcome: Outcome
    seconds: float
    detail: str
    at: float = 0.0
    facts: dict[str, Fact] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    changes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What a check is given besides its own definition."""

    now: float  # wall time of the run (certificate days)
    nameservers: tuple[str, ...] = ()  # host:port; empty: the system's resolver
    dkim_keys: tuple[SigningKey, ...] = ()  # the relay's, for auth_records
    known_answers: dict[str, list[str]] = field(default_factory=dict)  # the last DNS answers


@dataclass(slots=True)
class Findings:
    """What a check fills in as it goes, kept even when it fails half-way."""

    facts: dict[str, Fact] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)


class CheckFailedError(Exception):
    """A check found the service wrong; the message is the observation's detail."""


class CertificateExpiredError(Exception):
    """The certificate is past its end: outcome "expired", not "failure"."""


class CheckWarningError(Exception):
    """The service works but something needs attention soon: outcome "warning"."""


class CheckStandbyError(Exception):
    """The service is the cluster's passive side, which by design does not serve: "standby"."""
