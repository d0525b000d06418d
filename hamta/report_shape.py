"""What a report to the complaints or bounces address may look like before it is parsed.

Those addresses take mail from anyone. Python's email parser recurses once per nested MIME part
(a report nested 1,000 levels deep raised RecursionError out of the SMTP handler), and reads every
recipient a report names (a DSN naming 20,000 cost 7.6 s of CPU; an ARF naming 5,000 suppressed
them all). So the raw bytes are measured first, with two regular expressions and no parsing: the
number of multipart or message parts it declares (which bounds its depth as well) and the number
of recipients it names. A report past either limit is not read but quarantined as suspicious; a
real feedback loop or MTA reports one message to a few recipients in a handful of parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# A header line declaring a nested part (folded whitespace allowed, as the parser allows it).
_NESTED_PART = re.compile(
    rb"^content-type:[ \t]*(?:\r?\n[ \t]+)*(?:multipart|message)/", re.IGNORECASE | re.MULTILINE
)
# The fields that name a recipient: DSNs (RFC 3464) and ARF reports (RFC 5965).
_RECIPIENT_FIELD = re.compile(
    rb"^(?:final-recipient|original-recipient|original-rcpt-to)[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)


class ReportShapeError(ValueError):
    """A report too deep, too many parts or too many recipients to be read."""


@dataclass(frozen=True, slots=True)
class ReportLimits:
    """How much one report may contain ([suppression] report_max_parts, report_max_recipients)."""

    max_parts: int = 50
    max_recipients: int = 10

    def problem(self, data: bytes) -> str | None:
        """Why ``data`` must not be parsed (None: it may)."""
        parts = len(_NESTED_PART.findall(data))
        if parts > self.max_parts:
            return f"suspicious: {parts} nested MIME parts, at most {self.max_parts} are read"
        # A DSN names a recipient up to twice (Final- and Original-Recipient).
        named = len(_RECIPIENT_FIELD.findall(data))
        if named > 2 * self.max_recipients:
            return f"suspicious: {named} recipient fields, at most {self.max_recipients} recipients"
        return None


DEFAULT_LIMITS = ReportLimits()


def parse_within(limits: ReportLimits, parse: Callable[[bytes], T], data: bytes) -> T:
    """``parse(data)``, or :class:`ReportShapeError` if ``data`` is past ``limits``.

    RecursionError is caught too, should a shape the measure missed still nest too deep.
    """
    problem = limits.problem(data)
    if problem is not None:
        raise ReportShapeError(problem)
    try:
        return parse(data)
    except RecursionError:
        raise ReportShapeError("suspicious: MIME nested too deep to parse") from None
