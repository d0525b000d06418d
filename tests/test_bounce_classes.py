"""Bounce classes: the shipped rules, user rules, broken rules files, and a relay that applies them.

The table tests run the classifier on the real rules file in the package; the relay tests run a
real relay delivering to a real MX sink whose replies are scripted per recipient.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from hamta.bounce_classes import (
    KNOWN_CLASSES,
    BounceClassifier,
    BounceRulesError,
    build_classifier,
    default_rules,
    parse_dsn,
    parse_rules,
)
from hamta.config import ConfigError, parse_config
from hamta.dsn import FailedRecipient, build_dsn
from tests.conftest import MX_HOST, RelayFactory
from tests.support import RecordingSink
from tests.support.relay import HAMTA, render_toml
from tests.support.sink import _Handler

# (code, enhanced given apart or None, reply text, class, kind, deciding rule number)
TABLE: list[tuple[int | None, str | None, str, str, str, int]] = [
    (421, None, "4.7.28 Our system has detected an unusual rate of unsolicited mail originating "
     "from your IP address. To protect our users from spam, mail sent from your IP address has "
     "been temporarily rate limited.", "RateLimited", "soft", 1),
    (450, None, "4.2.1 The user you are trying to contact is receiving mail too quickly. Please "
     "resend your message at a later time.", "RateLimited", "soft", 2),
    (452, None, "4.2.1 The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered.", "RateLimited", "soft", 2),
    (421, None, "4.7.0 Try again later, closing connection.", "RateLimited", "soft", 3),
    (421, None, "4.7.0 [TSS04] Messages from 198.51.100.7 temporarily deferred due to unexpected "
     "volume or user complaints - 4.16.55.1", "RateLimited", "soft", 4),
    (553, None, "5.7.2 [TSS09] All messages from 198.51.100.7 will be permanently deferred; "
     "Retrying will NOT succeed.", "SpamBlock", "hard", 5),
    (451, None, "4.7.650 The mail server [198.51.100.7] has been temporarily rate limited due to "
     "IP reputation.", "RateLimited", "soft", 6),
    (550, None, "5.7.1 Unfortunately, messages from [198.51.100.7] weren't sent. Please contact "
     "your Internet service provider since part of their network is on our block list (S3150).",
     "SpamBlock", "hard", 7),
    (421, None, "4.4.2 Too many connections from your host, slow down", "RateLimited", "soft", 8),
    (450, None, "4.2.0 <x@y.test>: Recipient address rejected: Greylisted, see "
     "https://postgrey.schweikert.ch/", "Greylisted", "soft", 9),
    (554, None, "5.7.1 Service unavailable; Client host [198.51.100.7] blocked using "
     "zen.spamhaus.org", "SpamBlock", "hard", 10),
    (550, None, "5.7.26 Unauthenticated email from example.test is not accepted due to domain's "
     "DMARC policy.", "PolicyRelated", "hard", 11),
    (452, None, "4.2.2 The email account that you tried to reach is over quota.",
     "QuotaIssues", "soft", 12),
    (552, None, "Message size exceeds fixed maximum message size", "MessageTooLarge", "hard", 13),
    (550, None, "Requested action not taken: mailbox unavailable (user unknown)",
     "InvalidRecipient", "hard", 14),
    (550, None, "5.1.2 Host or domain name not found. Name service error for name=x.test",
     "BadDomain", "hard", 15),
    (421, None, "4.3.2 Service shutting down", "ServiceUnavailable", "soft", 16),
    (550, None, "5.1.1 <nobody@y.test>: Recipient address unknown", "InvalidRecipient", "hard", 17),
    (550, None, "5.1.10 RESOLVER.ADR.RecipientNotFound; not found", "BadDomain", "hard", 18),
    (552, None, "5.2.2 <x@y.test>: Requested mail action aborted", "QuotaIssues", "hard", 19),
    (552, None, "5.3.4 Message refused", "MessageTooLarge", "hard", 20),
    (450, None, "4.2.0 Mailbox unavailable", "ServiceUnavailable", "soft", 21),
    (451, None, "4.3.0 Temporary local problem", "ServiceUnavailable", "soft", 22),
    (421, None, "4.7.1 Come back later", "RateLimited", "soft", 23),
    (421, None, "4.4.2 Connection dropped", "ConnectionFailure", "soft", 24),
    (0, "4.4.1", "lost connection with mx1.sink.test[127.0.0.5]: Connection refused",
     "ConnectionFailure", "soft", 24),
    (550, None, "5.7.350 Remote server returned message detected as suspicious",
     "SpamBlock", "hard", 25),
    (550, None, "5.7.1 Message rejected", "PolicyRelated", "hard", 26),
    (552, None, "Requested mail action aborted", "MessageTooLarge", "hard", 27),
    (None, None, "Connection reset by peer", "ConnectionFailure", "soft", 28),
    (421, None, "bye", "ServiceUnavailable", "soft", 29),
    (550, None, "Requested action not taken", "InvalidRecipient", "hard", 30),
    (554, None, "Transaction failed", "Unknown", "hard", 0),
    (451, None, "4.5.0 Something odd", "Unknown", "soft", 0),
]  # fmt: skip


@pytest.mark.parametrize(("code", "enhanced", "text", "cls", "kind", "rule"), TABLE)
def test_default_rules_table(
    code: int | None, enhanced: str | None, text: str, cls: str, kind: str, rule: int
) -> None:
    verdict = build_classifier().classify(code, enhanced, text)
    assert (verdict.bounce_class, verdict.kind) == (cls, kind)
    assert verdict.rule == (f"bounce_rules.toml#{rule}" if rule else "")


def test_every_default_rule_decides_a_table_entry() -> None:
    decided = {rule for *_, rule in TABLE}
    assert decided >= set(range(1, len(default_rules()) + 1))
    assert {r.bounce_class for r in default_rules()} <= KNOWN_CLASSES


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        ("421 4.4.2 connection dropped", "ConnectionFailure"),
        ("421 4.3.2 shutting down", "ServiceUnavailable"),
        ("450 4.2.0 mailbox unavailable", "ServiceUnavailable"),
        ("550 5.1.1 no such user", "InvalidRecipient"),
        ("550 5.7.1 policy", "PolicyRelated"),
        ("552 5.2.2 over quota", "QuotaIssues"),
        ("421 4.7.0 Try again later", "RateLimited"),
        ("451 4.7.1 throttled", "RateLimited"),
    ],
)
def test_the_cases_the_issue_names(reply: str, cls: str) -> None:
    code, _, text = reply.partition(" ")
    assert build_classifier().classify(int(code), None, text).bounce_class == cls


def test_an_address_in_the_text_is_no_enhanced_code() -> None:
    # "2.3.4" inside 198.51.2.3.4-like text must not read as a 2.x.x status.
    verdict = build_classifier().classify(550, None, "rejected, your host 1.2.3.4 is unknown")
    assert verdict.bounce_class == "InvalidRecipient" and verdict.kind == "hard"


def test_dsn_fields_are_classified() -> None:
    classifier = build_classifier()
    hard = classifier.classify_dsn("5.1.1", "smtp; 550 5.1.1 <x@y.test>: no such user")
    assert (hard.bounce_class, hard.kind) == ("InvalidRecipient", "hard")
    soft = classifier.classify_dsn("4.7.0", "smtp; 421 4.7.0 [TSS04] Messages deferred")
    assert (soft.bounce_class, soft.kind) == ("RateLimited", "soft")
    bare = classifier.classify_dsn("5.2.2", "")
    assert (bare.bounce_class, bare.kind) == ("QuotaIssues", "hard")


def test_a_received_dsn_is_parsed_and_classified() -> None:
    # hamta's own DSN writer makes the report a remote MTA would send back.
    report = build_dsn(
        reporting_mta="mx.remote.test",
        queue_id="Q1",
        original_sender="sender@hamta.test",
        arrival=time.time() - 60,
        failed=[
            FailedRecipient("gone@remote.test", "5.1.1", "550 5.1.1 No such user", "mx"),
            FailedRecipient("full@remote.test", "5.2.2", "552 5.2.2 Mailbox full", "mx"),
        ],
        headers=b"Subject: hello\r\n",
        now=time.time(),
    )
    found = parse_dsn(report, build_classifier())
    assert [(r.recipient, r.verdict.bounce_class, r.verdict.kind) for r in found] == [
        ("gone@remote.test", "InvalidRecipient", "hard"),
        ("full@remote.test", "QuotaIssues", "hard"),
    ]
    assert parse_dsn(b"Subject: not a report\r\n\r\nhello\r\n", build_classifier()) == []


# ------------------------------------------------------------------ user rules


USER_RULES = """\
classes = ["MailboxDisabled"]

[[rules]]
class = "MailboxDisabled"
code = "550"
text = 'account (is )?disabled'

[[rules]]
# This site's MX says "try again later" when it is merely busy, not when throttling us.
class = "ServiceUnavailable"
code = "421"
enhanced = "4.7.0"
text = 'try again later'

[[rules]]
class = "SpamBlock"
code = ["5xx", "4xx"]
enhanced = ["5.7.*", "4.7.*"]
text = 'content filter'
"""


def test_user_rules_come_before_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(USER_RULES)
    classifier = build_classifier(path)
    assert len(classifier.rules) == 3 + len(default_rules())
    assert "MailboxDisabled" in classifier.classes
    disabled = classifier.classify(550, None, "5.2.1 This account is disabled")
    assert disabled.bounce_class == "MailboxDisabled" and disabled.rule == f"{path}#1"
    busy = classifier.classify(421, None, "4.7.0 Try again later, closing connection.")
    assert busy.bounce_class == "ServiceUnavailable"  # a default says RateLimited
    assert classifier.classify(451, None, "4.7.1 content filter").bounce_class == "SpamBlock"
    # What the user's rules do not match still gets the defaults.
    assert classifier.classify(550, None, "5.1.1 no such user").bounce_class == "InvalidRecipient"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules = [", "not valid TOML"),
        ("[[rules]]\nclass = 'NoSuchClass'\ncode = '550'\n", "rule 1: unknown class 'NoSuchClass'"),
        ("[[rules]]\nclass = 'SpamBlock'\n", "rule 1: needs at least one of code, enhanced, text"),
        ("[[rules]]\nclass = 'SpamBlock'\ntext = '(unclosed'\n", "not a regular expression"),
        ("[[rules]]\nclass = 'SpamBlock'\ncode = '5'\n", "not a reply code pattern"),
        ("[[rules]]\nclass = 'SpamBlock'\nenhanced = '5.7'\n", "not an enhanced code pattern"),
        ("[[rules]]\nclass = 'SpamBlock'\ncode = '550'\ncolour = 'red'\n", "unknown key(s) colour"),
        ("[[rules]]\nclass = 'SpamBlock'\ncode = []\n", "non-empty list of strings"),
        ("classes = ['lowercase']\n", "CamelCase"),
        ("rule = []\n", "unknown top-level key(s) rule"),
        (
            "[[rules]]\nclass = 'RateLimited'\ncode = '421'\n[[rules]]\nclass = 'X'\ncode = '1'\n",
            "rule 2:",
        ),
    ],
)
def test_broken_rules_are_reported_with_file_rule_and_reason(text: str, message: str) -> None:
    with pytest.raises(BounceRulesError, match=re.escape(message)) as caught:
        parse_rules(text, "site.toml")
    assert str(caught.value).startswith("site.toml: ")


def test_a_broken_rules_file_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rules]]\nclass = 'Typo'\ncode = '550'\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(f"[delivery]\nbounce_rules = '{broken}'\n", "hamta.toml")
    assert f"delivery.bounce_rules: {broken}: rule 1: unknown class 'Typo'" in str(caught.value)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(f"[delivery]\nbounce_rules = '{tmp_path / 'missing.toml'}'\n", "hamta.toml")
    good = tmp_path / "good.toml"
    good.write_text(USER_RULES)
    config = parse_config(f"[delivery]\nbounce_rules = '{good}'\n", "hamta.toml")
    assert config.delivery.bounce_rules == good


def test_config_check_and_serve_refuse_a_broken_rules_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rules]]\nclass = 'SpamBlock'\ntext = '(['\n")
    config = tmp_path / "hamta.toml"
    config.write_text(render_toml({"delivery": {"bounce_rules": broken}}))
    for args in (["config", "check", str(config)], ["serve", "--config", str(config)]):
        done = subprocess.run(
            [*HAMTA, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False
        )
        assert done.returncode == 2, done
        assert "delivery.bounce_rules:" in done.stderr
        assert "rule 1: text is not a regular expression" in done.stderr


# ------------------------------------------------------------- a relay's view

THROTTLE_REPLY = "421 4.7.0 Try again later, closing connection."
YAHOO_REPLY = (
    "451 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume "
    "or user complaints"
)


class _ScriptedHandler(_Handler):
    """The recording sink's replies, plus throttling texts for ``throttle*`` and ``yahoo*``."""

    async def handle_RCPT(  # noqa: N802 - the hook name aiosmtpd looks up
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        local = address.rpartition("@")[0].lower()
        if local.startswith("throttle"):
            return THROTTLE_REPLY
        if local.startswith("yahoo"):
            return YAHOO_REPLY
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)


class ScriptedSink(RecordingSink):
    """A :class:`RecordingSink` that also answers with the big providers' throttling texts."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handler = _ScriptedHandler(self)


@pytest.fixture
def scripted_sink(mx_port: int) -> Iterator[ScriptedSink]:
    with ScriptedSink(host=MX_HOST, port=mx_port) as sink:
        yield sink


def send_each(port: int, recipients: list[str], sender: str = "") -> None:
    """One message per recipient, from the null sender (so that no DSN adds to the counts)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for rcpt in recipients:
            client.sendmail(sender, [rcpt], f"Subject: to {rcpt}\r\n\r\nhello\r\n".encode())


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric ``name`` in an exposition, keyed by their sorted labels."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")))
            found[labels] = float(match.group(2))
    return found


def test_relay_logs_and_counts_bounce_classes(
    make_relay: RelayFactory, scripted_sink: ScriptedSink
) -> None:
    # Retries far off: each deferred recipient fails once, and the counts stay put.
    relay = make_relay({"retry": {"first_delay": "60s", "max_delay": "60s", "jitter": 0.0}})
    send_each(
        relay.port,
        [
            "reject1@sink.test",
            "full1@sink.test",
            "ok1@sink.test",
            "throttle1@other.test",
            "yahoo1@other.test",
        ],
    )
    bounces = relay.wait_events("Bounce", 2)
    failures = relay.wait_events("TransientFailure", 2)
    assert scripted_sink.wait_for(1, timeout=10)
    by_rcpt = {e["recipient"]: e for e in bounces + failures}
    assert by_rcpt["reject1@sink.test"]["bounce_class"] == "InvalidRecipient"
    assert by_rcpt["reject1@sink.test"]["enhanced_code"] == "5.1.1"
    assert by_rcpt["full1@sink.test"]["bounce_class"] == "QuotaIssues"
    assert by_rcpt["throttle1@other.test"]["bounce_class"] == "RateLimited"
    assert by_rcpt["throttle1@other.test"]["code"] == 421
    assert by_rcpt["yahoo1@other.test"]["bounce_class"] == "RateLimited"
    assert "bounce_class" not in relay.wait_events("Delivery")[0]

    status, body = relay.get("/metrics")
    assert status == 200
    bounced = metric_samples(body.decode(), "hamta_bounces_total")
    assert bounced == {
        (("class", "InvalidRecipient"), ("kind", "hard")): 1.0,
        (("class", "QuotaIssues"), ("kind", "hard")): 1.0,
        (("class", "RateLimited"), ("kind", "soft")): 2.0,
    }
    # The throttling replies slowed the destination down (hamta.shaping), which the API shows.
    status, body = relay.get("/api/domain/other.test")
    assert status == 200
    other = json.loads(body)
    assert other["bounce_classes"] == {"RateLimited": 2}
    assert other["soft_bounces"] == 2 and other["queued"] == 2
    assert other["throttled"] is True


def test_expiration_keeps_the_class_of_the_last_reply(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay(
        {"retry": {"first_delay": "200ms", "jitter": 0.0, "max_queue_lifetime": "1s"}}
    )
    send_each(relay.port, ["defer-forever@sink.test"])
    expiration = relay.wait_events("Expiration")[0]
    assert expiration["bounce_class"] == "ServiceUnavailable"  # 451 4.3.0 Try again later
    assert all(e["bounce_class"] == "ServiceUnavailable" for e in relay.events("TransientFailure"))
    relay.wait_queue_empty()
    status, body = relay.get("/api/domain/sink.test")
    assert status == 200
    view = json.loads(body)
    assert view["expired"] == 1 and view["hard_bounces"] == 0
    assert view["soft_bounces"] == view["deferred"] + 1


def test_relay_applies_the_users_rules(
    make_relay: RelayFactory, sink: RecordingSink, tmp_path: Path
) -> None:
    rules = tmp_path / "site-rules.toml"
    rules.write_text(
        "classes = ['NoSuchMailbox']\n[[rules]]\nclass = 'NoSuchMailbox'\nenhanced = '5.1.1'\n"
    )
    relay = make_relay({"delivery": {"bounce_rules": rules}})
    send_each(relay.port, ["reject2@sink.test"])
    assert relay.wait_events("Bounce")[0]["bounce_class"] == "NoSuchMailbox"
    _, body = relay.get("/metrics")
    assert 'hamta_bounces_total{class="NoSuchMailbox",kind="hard"} 1.0' in body.decode()


def test_the_default_classifier_is_the_shipped_file() -> None:
    classifier = build_classifier()
    assert isinstance(classifier, BounceClassifier)
    assert classifier.rules == default_rules()
