"""DKIM: keys made by ``hamta dkim keygen``, mail signed by a real relay, verified by dkimpy.

The public keys are published as TXT records by a real dnsmasq on loopback, and dkimpy's verifier
looks them up there with dnspython, as a receiving MTA would. Mail goes through a ``hamta serve``
subprocess to the recording MX sink; what the sink received is what is verified.
"""

from __future__ import annotations

import base64
import os
import random
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dkim
import dkim.crypto
import dns.resolver
import pytest

from tests.conftest import RelayFactory
from tests.support import DnsServer, RecordingSink
from tests.support.relay import HAMTA, RelayProcess

CLIENT_HELO = "client.origin.test"
RECORD = re.compile(r'^(\S+) IN TXT ((?:"[^"]*" ?)+)$')


class TxtDnsServer(DnsServer):
    """The support DnsServer with TXT records too (dnsmasq's txt-record, one string each)."""

    def __init__(self, txt: Mapping[str, Sequence[str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, strings in txt.items():
            quoted = ",".join(f'"{s}"' for s in strings)
            self._records.append(f"txt-record={name},{quoted}")


def keygen(
    directory: Path, domain: str, selector: str, algorithm: str
) -> tuple[Path, str, list[str]]:
    """Run ``hamta dkim keygen``; return the key file, the record's name and its strings."""
    result = subprocess.run(
        [
            *HAMTA,
            "dkim",
            "keygen",
            domain,
            selector,
            "--algorithm",
            algorithm,
            "--directory",
            str(directory),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = RECORD.match(result.stdout.strip())
    assert match is not None, result.stdout
    strings = re.findall(r'"([^"]*)"', match.group(2))
    return directory / f"{domain}.{selector}.key", match.group(1), strings


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys for sign.test (RSA), ed.test (Ed25519) and rotate.test (two selectors)."""
    directory = tmp_path_factory.mktemp("dkim-keys")
    made = {
        "sign": keygen(directory, "sign.test", "s2026", "rsa-sha256"),
        "ed": keygen(directory, "ed.test", "e2026", "ed25519-sha256"),
        "old": keygen(directory, "rotate.test", "s2025", "rsa-sha256"),
        "new": keygen(directory, "rotate.test", "s2026", "ed25519-sha256"),
    }
    return {"directory": directory, **made}


@pytest.fixture(scope="module")
def txt_dns(keys: dict[str, Any]) -> Iterator[TxtDnsServer]:
    """dnsmasq publishing the keys' TXT records."""
    records = {keys[k][1]: keys[k][2] for k in ("sign", "ed", "old", "new")}
    with TxtDnsServer(records) as server:
        yield server


@pytest.fixture(scope="module")
def dkim_relay(
    tmp_path_factory: pytest.TempPathFactory,
    dns_server: DnsServer,
    mx_port: int,
    keys: dict[str, Any],
) -> Iterator[RelayProcess]:
    """A relay that signs for sign.test, ed.test and rotate.test."""
    entries = [
        {"domain": "sign.test", "selector": "s2026", "key": keys["sign"][0]},
        {
            "domain": "ed.test",
            "selector": "e2026",
            "key": keys["ed"][0],
            "algorithm": "ed25519-sha256",
        },
        {"domain": "rotate.test", "selector": "s2025", "key": keys["old"][0]},
        {
            "domain": "rotate.test",
            "selector": "s2026",
            "key": keys["new"][0],
            "algorithm": "ed25519-sha256",
        },
    ]
    relay = RelayProcess(
        tmp_path_factory.mktemp("dkim-relay"),
        {
            "dns": {"nameservers": [dns_server.nameserver]},
            "delivery": {"port": mx_port},
            "dkim": {"keys": entries},
        },
    )
    relay.start()
    yield relay
    relay.stop()


def dnsfunc_for(server: DnsServer) -> Any:
    """dkimpy's TXT lookup, answered by ``server`` (never the system's resolver)."""
    resolver = server.resolver()

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return lookup


def verify_all(data: bytes, server: DnsServer) -> list[bool]:
    """Verify every DKIM-Signature of a message, top to bottom."""
    count = len(re.findall(rb"^DKIM-Signature:", data.split(b"\r\n\r\n", 1)[0], re.MULTILINE))
    checker = dkim.DKIM(data)
    results = []
    for index in range(count):
        try:
            results.append(bool(checker.verify(idx=index, dnsfunc=dnsfunc_for(server))))
        except dkim.DKIMException:  # e.g. "body hash mismatch": a failed verification
            results.append(False)
    return results


def signature_tags(data: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature header (unfolded)."""
    header_block = data.split(b"\r\n\r\n", 1)[0].decode()
    unfolded = re.sub(r"\r\n[ \t]+", " ", header_block)
    found = []
    for line in unfolded.split("\r\n"):
        if line.lower().startswith("dkim-signature:"):
            tags = (t.strip().partition("=") for t in line.split(":", 1)[1].split(";"))
            found.append({k.strip(): v.strip() for k, _, v in tags if k.strip()})
    return found


def send(relay: RelayProcess, sender: str, recipient: str, message: bytes) -> None:
    """One message through the relay with smtplib."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        refused = client.sendmail(sender, [recipient], message)
        assert not refused


def message_from(address: str, subject: str = "signed") -> bytes:
    """A realistic message from ``address``."""
    return (
        f"From: Sender <{address}>\r\nTo: Someone <rcpt@sink.test>\r\nSubject: {subject}\r\n"
        f"Date: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}.{time.time()}@x>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello,\r\n\r\nthis body is covered by the signature.\r\n"
    ).encode()


def relay_once(relay: RelayProcess, sink: RecordingSink, sender: str, message: bytes) -> bytes:
    """Send one message, wait for it at the sink and return what the sink received."""
    send(relay, sender, "rcpt@sink.test", message)
    assert sink.wait_for(1, timeout=15), sink.messages
    relay.wait_queue_empty()
    return sink.messages[0].data


# ----------------------------------------------------------------------- keygen


def test_keygen_writes_a_0600_key_and_a_record_of_255_byte_strings(
    keys: dict[str, Any],
) -> None:
    path, name, strings = keys["sign"]
    assert name == "s2026._domainkey.sign.test"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(strings) >= 2 and all(len(s) <= 255 for s in strings)
    value = "".join(strings)
    assert value.startswith("v=DKIM1; k=rsa; p=")
    assert len(base64.b64decode(value.partition("p=")[2])) == 294  # 2048-bit SubjectPublicKeyInfo
    ed_path, _, ed_strings = keys["ed"]
    assert ed_strings[0].startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_strings[0].partition("p=")[2])) == 32
    assert os.stat(ed_path).st_mode & 0o777 == 0o600


def test_keygen_never_overwrites_a_key(keys: dict[str, Any]) -> None:
    before = keys["sign"][0].read_bytes()
    result = subprocess.run(
        [*HAMTA, "dkim", "keygen", "sign.test", "s2026", "--directory", str(keys["directory"])],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    taken = keys["directory"] / "sign.test.s2026.key"
    assert f"{taken} exists; a published key is never overwritten" in result.stderr
    assert keys["sign"][0].read_bytes() == before
    assert not list(keys["directory"].glob(".*")), "a temporary file was left behind"


# ---------------------------------------------------------------------- signing


@pytest.mark.parametrize(
    ("domain", "selector", "algorithm"),
    [("sign.test", "s2026", "rsa-sha256"), ("ed.test", "e2026", "ed25519-sha256")],
)
def test_relayed_mail_verifies_against_the_published_key(
    dkim_relay: RelayProcess,
    sink: RecordingSink,
    txt_dns: TxtDnsServer,
    domain: str,
    selector: str,
    algorithm: str,
) -> None:
    data = relay_once(dkim_relay, sink, f"bounces@{domain}", message_from(f"news@{domain}"))
    assert verify_all(data, txt_dns) == [True]
    (tags,) = signature_tags(data)
    assert (tags["d"], tags["s"], tags["a"]) == (domain, selector, algorithm)
    signed = [h.strip().lower() for h in tags["h"].split(":")]
    for header in ("from", "to", "subject", "date", "message-id", "mime-version", "content-type"):
        assert header in signed, signed
    assert signed.count("from") == 2  # From oversigned: a second From: breaks the signature
    assert "received" not in signed
    # Signed before spooling: the signatures sit above the relay's own Received: header.
    assert data.index(b"DKIM-Signature:") < data.index(b"Received:")


def test_rotation_signs_with_both_selectors_and_both_verify(
    dkim_relay: RelayProcess, sink: RecordingSink, txt_dns: TxtDnsServer
) -> None:
    data = relay_once(dkim_relay, sink, "a@rotate.test", message_from("a@rotate.test", "rotate"))
    assert verify_all(data, txt_dns) == [True, True]
    assert sorted(t["s"] for t in signature_tags(data)) == ["s2025", "s2026"]


def test_tampered_body_fails_verification(
    dkim_relay: RelayProcess, sink: RecordingSink, txt_dns: TxtDnsServer
) -> None:
    data = relay_once(dkim_relay, sink, "a@sign.test", message_from("a@sign.test", "tamper"))
    assert verify_all(data, txt_dns) == [True]
    tampered = data.replace(b"covered by the signature", b"covered by the signaturf")
    assert tampered != data
    assert verify_all(tampered, txt_dns) == [False]
    resubjected = data.replace(b"Subject: tamper", b"Subject: tamperd")
    assert verify_all(resubjected, txt_dns) == [False]


def test_from_domain_decides_not_the_envelope(
    dkim_relay: RelayProcess, sink: RecordingSink, txt_dns: TxtDnsServer
) -> None:
    data = relay_once(dkim_relay, sink, "bounces@sign.test", message_from("x@ed.test", "from"))
    assert [t["d"] for t in signature_tags(data)] == ["ed.test"]
    assert verify_all(data, txt_dns) == [True]


def test_envelope_sender_domain_when_there_is_no_from(
    dkim_relay: RelayProcess, sink: RecordingSink, txt_dns: TxtDnsServer
) -> None:
    message = b"To: rcpt@sink.test\r\nSubject: no from\r\n\r\nbody\r\n"
    data = relay_once(dkim_relay, sink, "bounces@sign.test", message)
    assert [t["d"] for t in signature_tags(data)] == ["sign.test"]
    assert verify_all(data, txt_dns) == [True]


def test_mail_of_a_domain_without_a_key_passes_unsigned(
    dkim_relay: RelayProcess, sink: RecordingSink
) -> None:
    data = relay_once(dkim_relay, sink, "a@nokey.test", message_from("a@nokey.test", "unsigned"))
    assert b"DKIM-Signature" not in data
    assert data.endswith(b"this body is covered by the signature.\r\n")


# ---------------------------------------------------------------- configuration


def check_config(
    tmp_path: Path, key: Path, algorithm: str = "rsa-sha256"
) -> subprocess.CompletedProcess[str]:
    """``hamta config check`` of a config with one DKIM key."""
    config = tmp_path / "hamta.toml"
    config.write_text(
        f'[[dkim.keys]]\ndomain = "sign.test"\nselector = "s1"\nkey = "{key}"\n'
        f'algorithm = "{algorithm}"\n'
    )
    return subprocess.run(
        [*HAMTA, "config", "check", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_malformed_or_mismatched_keys_are_config_errors(
    tmp_path: Path, keys: dict[str, Any]
) -> None:
    missing = check_config(tmp_path, tmp_path / "absent.key")
    assert missing.returncode == 2
    assert "dkim.keys.0: cannot read DKIM key" in missing.stderr
    assert "No such file or directory" in missing.stderr
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    malformed = check_config(tmp_path, garbage)
    assert malformed.returncode == 2
    assert "not a usable PEM private key" in malformed.stderr
    wrong = check_config(tmp_path, keys["ed"][0], "rsa-sha256")
    assert wrong.returncode == 2
    assert "an Ed25519 key, but algorithm is rsa-sha256" in wrong.stderr
    assert check_config(tmp_path, keys["sign"][0]).returncode == 0


def test_a_key_readable_by_others_gets_a_warning(
    make_relay: RelayFactory, keys: dict[str, Any], tmp_path: Path
) -> None:
    loose = tmp_path / "loose.key"
    loose.write_bytes(keys["sign"][0].read_bytes())
    loose.chmod(0o644)
    relay = make_relay(
        {"dkim": {"keys": [{"domain": "sign.test", "selector": "s2026", "key": loose}]}}
    )
    (event,) = relay.wait_events("DkimKeyPermissions")
    assert "accessible by group or others (mode 0644)" in event["warning"]
    (loaded,) = relay.wait_events("DkimKeysLoaded")
    assert loaded["keys"] == ["s2026._domainkey.sign.test rsa-sha256"]


# --------------------------------------------------- repeated headers; a second verifier


def opendkim_verify(data: bytes, records: Mapping[str, Sequence[str]], work: Path) -> str:
    """OpenDKIM's verdict on ``data`` ("" when it verifies): ``opendkim-testmsg``, a second
    implementation, its key lookups answered by a dnsmasq on port 53 of a loopback address of
    the test's own, named in a resolv.conf bound over /etc/resolv.conf in a mount namespace."""
    address = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    with TxtDnsServer(records, listen=address, port=53):
        resolv = work / "resolv.conf"
        resolv.write_text(f"nameserver {address}\n")
        message = work / "message.eml"
        message.write_bytes(data.replace(b"\r\n", b"\n"))  # it reads local (LF) line ends
        result = subprocess.run(
            [
                "unshare",
                "--mount",
                "sh",
                "-c",
                f"mount --bind {resolv} /etc/resolv.conf && opendkim-testmsg < {message}",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    return (result.stdout + result.stderr).strip() or ("" if result.returncode == 0 else "failed")


def test_a_header_repeated_50000_times_is_signed_a_few_times(
    dkim_relay: RelayProcess,
    sink: RecordingSink,
    txt_dns: TxtDnsServer,
    keys: dict[str, Any],
    tmp_path: Path,
) -> None:
    subjects = b"".join(b"Subject: offer %d\r\n" % n for n in range(50000))
    message = message_from("news@sign.test", "many").replace(b"Subject: many\r\n", subjects)
    data = relay_once(dkim_relay, sink, "news@sign.test", message)
    signature = data[: data.index(b"Received:")]
    assert len(signature) < 2000, len(signature)  # was 515 KB: every Subject: was signed
    (tags,) = signature_tags(data)
    signed = [h.strip().lower() for h in tags["h"].split(":")]
    assert signed.count("subject") == 4  # the last three, and one more (oversigned)
    assert signed.count("from") == 2 and signed.count("to") == 2
    assert verify_all(data, txt_dns) == [True]
    # A Subject: added below the signed ones breaks the signature. (OpenDKIM refuses a message
    # with two Subject: lines outright, as RFC 5322 allows one: dkimpy checks this one.)
    added = data.replace(b"Subject: offer 49999\r\n", b"Subject: offer 49999\r\nSubject: new\r\n")
    assert verify_all(added, txt_dns) == [False]


def test_oversigned_mail_verifies_with_opendkim_too(
    dkim_relay: RelayProcess, sink: RecordingSink, keys: dict[str, Any], tmp_path: Path
) -> None:
    data = relay_once(dkim_relay, sink, "news@sign.test", message_from("news@sign.test", "odk"))
    (tags,) = signature_tags(data)
    signed = [h.strip().lower() for h in tags["h"].split(":")]
    assert signed.count("subject") == signed.count("to") == signed.count("from") == 2
    _, name, strings = keys["sign"]
    assert opendkim_verify(data, {name: strings}, tmp_path) == ""
    tampered = data.replace(b"covered by the signature", b"covered by the signaturE")
    verdict = opendkim_verify(tampered, {name: strings}, tmp_path)
    assert "signature" in verdict.lower()
