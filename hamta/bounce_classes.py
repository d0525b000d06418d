"""Bounce classes: why a delivery attempt failed, from its reply code, enhanced code and text.

Every failed attempt (and every recipient of a DSN received for mail we sent) gets one class,
such as ``InvalidRecipient`` or ``RateLimited``, and a kind: ``hard`` for a permanent failure
(5xx, or a 5.x.x status), ``soft`` for a temporary one. The class is for people and for shaping
decisions; it never changes what delivery does with the reply (that is the code's business).

The rules are data: ``hamta/data/bounce_rules.toml`` ships the defaults, and the file named by
``[delivery] bounce_rules`` adds rules that are tried first. A rule is a table of ``[[rules]]``
with a ``class`` and any of these conditions, all of which must hold:

- ``code``: a reply code pattern or a list of them: ``"550"``, ``"5xx"``, ``"45x"``; ``"000"`` is
  no reply at all (refused, timed out, dropped);
- ``enhanced``: an enhanced status code pattern or a list: ``"5.1.1"``, ``"*.1.1"``, ``"4.7.*"``;
- ``text``: a regular expression searched in the reply text, ignoring case.

The first rule that matches wins; no match is ``Unknown``. A top-level ``classes = [...]`` in a
rules file declares class names beyond the built-in ones, so that a misspelt class is an error
rather than a new class.
"""

from __future__ import annotations

import email
import functools
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from importlib import resources
from pathlib import Path
from typing import Any, Literal

#: The classes the default rules use; ``Unknown`` is what no rule matched.
KNOWN_CLASSES = frozenset(
    {
        "InvalidRecipient",
        "BadDomain",
        "PolicyRelated",
        "SpamBlock",
        "QuotaIssues",
        "MessageTooLarge",
        "RateLimited",
        "Greylisted",
        "ServiceUnavailable",
        "ConnectionFailure",
        "Unknown",
    }
)

Kind = Literal["hard", "soft"]

_CODE_PATTERN = re.compile(r"^[0-9x]{3}$")
_ENHANCED_PATTERN = re.compile(r"^(\*|[245])\.(\*|\d{1,3})\.(\*|\d{1,3})$")
# At the start only, as RFC 3463 puts it: an address such as 1.2.3.4 later on is no status.
_ENHANCED_IN_TEXT = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_CLASS_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_RULE_KEYS = frozenset({"class", "code", "enhanced", "text", "note"})


class BounceRulesError(ValueError):
    """A rules file that cannot be used; the message names the file, the rule and the reason."""


@dataclass(frozen=True, slots=True)
class BounceVerdict:
    """The class of one failure, whether it is permanent, and the rule that decided it."""

    bounce_class: str
    kind: Kind
    rule: str  # "<file>#<n>", or "" when no rule matched


@dataclass(frozen=True, slots=True)
class BounceRule:
    """One rule: a class and the conditions (all of them) under which a failure has it."""

    bounce_class: str
    codes: tuple[re.Pattern[str], ...]
    enhanced: tuple[re.Pattern[str], ...]
    text: re.Pattern[str] | None
    source: str

    def matches(self, code: str, enhanced: str, text: str) -> bool:
        """Does a failure with this three-digit ``code``, ``enhanced`` code and text match?"""
        if self.codes and not any(p.fullmatch(code) for p in self.codes):
            return False
        if self.enhanced and not any(p.fullmatch(enhanced) for p in self.enhanced):
            return False
        return self.text is None or self.text.search(text) is not None


class BounceClassifier:
    """Rules tried in order; the first that matches gives the class."""

    def __init__(self, rules: Sequence[BounceRule], classes: Iterable[str] = KNOWN_CLASSES):
        self.rules = tuple(rules)
        self.classes = frozenset(classes) | {"Unknown"}

    def classify(self, code: int | None, enhanced: str | None, text: str) -> BounceVerdict:
        """Classify one failure: an SMTP reply (``code`` 0 or None when there was none).

        ``enhanced`` may be None: the enhanced code that begins ``text`` is used then, else
        one derived from the reply code (5.0.0, 4.0.0), as ``hamta.delivery.Reply`` does.
        """
        if not enhanced:
            found = _ENHANCED_IN_TEXT.match(text)
            if found:
                enhanced = ".".join(found.groups())
            elif code:
                enhanced = "5.0.0" if code >= 500 else "4.0.0"
            else:
                enhanced = ""
        code_text = f"{code:03d}" if code and 0 < code < 1000 else "000"
        permanent = code >= 500 if code else enhanced.startswith("5")
        kind: Kind = "hard" if permanent else "soft"
        for rule in self.rules:
            if rule.matches(code_text, enhanced, text):
                return BounceVerdict(rule.bounce_class, kind, rule.source)
        return BounceVerdict("Unknown", kind, "")

    def classify_dsn(self, status: str, diagnostic: str = "") -> BounceVerdict:
        """Classify a DSN recipient from its ``Status`` and ``Diagnostic-Code`` fields.

        ``diagnostic`` is e.g. ``smtp; 550 5.1.1 <x@y>: no such user``; the reply code in it
        is used when there is one, else the kind follows the status (5.x.x is hard).
        """
        kind, _, reply = diagnostic.partition(";")
        reply = reply.strip() if kind.strip().lower() == "smtp" else diagnostic.strip()
        code = 0
        if len(reply) >= 3 and reply[:3].isdigit():
            code, reply = int(reply[:3]), reply[3:].lstrip(" -")
        return self.classify(code, status.strip() or None, reply)


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient block of a received DSN, classified."""

    recipient: str
    action: str
    status: str
    diagnostic: str
    verdict: BounceVerdict


def parse_dsn(data: bytes, classifier: BounceClassifier) -> list[DsnRecipient]:
    """The failed or delayed recipients of an RFC 3464 report, each classified.

    Returns an empty list for anything that is not a multipart/report with a
    message/delivery-status part.
    """
    message = email.message_from_bytes(data)
    if message.get_content_type() != "multipart/report":
        return []
    found: list[DsnRecipient] = []
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            continue
        for block in blocks[1:]:  # the first block is about the message, not a recipient
            if not isinstance(block, Message):
                continue
            action = str(block.get("Action", "")).strip().lower()
            if action not in ("failed", "delayed"):
                continue
            recipient = str(block.get("Final-Recipient") or block.get("Original-Recipient") or "")
            status = str(block.get("Status", "")).strip()
            diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
            found.append(
                DsnRecipient(
                    recipient=recipient.partition(";")[2].strip() or recipient.strip(),
                    action=action,
                    status=status,
                    diagnostic=diagnostic,
                    verdict=classifier.classify_dsn(status, diagnostic),
                )
            )
    return found


# --------------------------------------------------------------------- loading


def _code_pattern(value: str) -> re.Pattern[str]:
    if not _CODE_PATTERN.match(value):
        raise ValueError(f"code {value!r} is not a reply code pattern (e.g. 550, 5xx, 000)")
    return re.compile(value.replace("x", r"\d"))


def _enhanced_pattern(value: str) -> re.Pattern[str]:
    match = _ENHANCED_PATTERN.match(value)
    if not match:
        raise ValueError(f"enhanced {value!r} is not an enhanced code pattern (e.g. 5.1.1, 4.7.*)")
    parts = [r"[245]" if match.group(1) == "*" else match.group(1)]
    parts += [r"\d{1,3}" if g == "*" else str(int(g)) for g in match.groups()[1:]]
    return re.compile(r"\.".join(parts))


def _patterns(rule: dict[str, Any], key: str) -> list[str]:
    value = rule.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{key} must be a string or a non-empty list of strings")


def _build_rule(rule: Any, source: str, classes: frozenset[str]) -> BounceRule:
    if not isinstance(rule, dict):
        raise ValueError("must be a table")
    unknown = set(rule) - _RULE_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    bounce_class = rule.get("class")
    if not isinstance(bounce_class, str):
        raise ValueError("class is missing or not a string")
    if bounce_class not in classes:
        raise ValueError(
            f"unknown class {bounce_class!r} (known: {', '.join(sorted(classes))}; "
            "declare new ones with classes = [...] at the top of the file)"
        )
    text = rule.get("text")
    if text is not None and not isinstance(text, str):
        raise ValueError("text must be a string (a regular expression)")
    if not any(key in rule for key in ("code", "enhanced", "text")):
        raise ValueError("needs at least one of code, enhanced, text")
    try:
        pattern = re.compile(text, re.IGNORECASE) if text is not None else None
    except re.error as exc:
        raise ValueError(f"text is not a regular expression: {exc}") from None
    return BounceRule(
        bounce_class=bounce_class,
        codes=tuple(_code_pattern(v) for v in _patterns(rule, "code")),
        enhanced=tuple(_enhanced_pattern(v) for v in _patterns(rule, "enhanced")),
        text=pattern,
        source=source,
    )


def parse_rules(text: str, name: str) -> tuple[list[BounceRule], frozenset[str]]:
    """The rules of a rules file's text and the class names it may use; BounceRulesError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BounceRulesError(f"{name}: not valid TOML: {exc}") from None
    unknown = set(data) - {"classes", "rules"}
    if unknown:
        raise BounceRulesError(f"{name}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    extra = data.get("classes", [])
    if not isinstance(extra, list) or not all(
        isinstance(c, str) and _CLASS_NAME.match(c) for c in extra
    ):
        raise BounceRulesError(f"{name}: classes must be a list of CamelCase names")
    classes = KNOWN_CLASSES | frozenset(extra)
    raw = data.get("rules", [])
    if not isinstance(raw, list):
        raise BounceRulesError(f"{name}: rules must be an array of tables ([[rules]])")
    rules = []
    for number, rule in enumerate(raw, start=1):
        try:
            rules.append(_build_rule(rule, f"{name}#{number}", classes))
        except ValueError as exc:
            raise BounceRulesError(f"{name}: rule {number}: {exc}") from None
    return rules, classes


def load_rules(path: Path) -> tuple[list[BounceRule], frozenset[str]]:
    """The rules of the file at ``path``; BounceRulesError if it is unreadable or wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BounceRulesError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise BounceRulesError(f"{path}: not UTF-8 text") from None
    return parse_rules(text, str(path))


@functools.cache
def default_rules() -> tuple[BounceRule, ...]:
    """The rules shipped in ``hamta/data/bounce_rules.toml`` (loaded once per process)."""
    text = resources.files("hamta").joinpath("data/bounce_rules.toml").read_text("utf-8")
    rules, _ = parse_rules(text, "bounce_rules.toml")
    return tuple(rules)


def build_classifier(user_rules: Path | None = None) -> BounceClassifier:
    """The user's rules (if any) in front of the defaults; BounceRulesError for a bad file."""
    if user_rules is None:
        return BounceClassifier(default_rules())
    rules, classes = load_rules(user_rules)
    return BounceClassifier([*rules, *default_rules()], classes)
