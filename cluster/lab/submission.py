"""The lab's submission: a certificate, a password file and a probe account, shared by the pair.

Both relays listen for submission on 587 (STARTTLS) and 465 (implicit TLS) with the same
password file in the lab's directory, so the account works whichever node is active. The probe
account is ``lab@client.lab.test`` (the lab client's own sender) with a random password, written
to ``<lab dir>/submission-account.json`` for people and tools (``hamta lab send --submission``).
Made once per lab directory and kept: a new ``lab up`` finds them.
"""

from __future__ import annotations

import datetime
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hamta.auth_backends import hash_password, write_password_file
from hamta.durable_files import write_durably

SUBMISSION_PORT: Final = 587
SUBMISSIONS_PORT: Final = 465
ACCOUNT_FILE: Final = "submission-account.json"
PROBE_USER: Final = "lab@client.lab.test"
BACKEND: Final = "lab"


@dataclass(frozen=True, slots=True)
class SubmissionFiles:
    """Where the lab's submission material lives."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "submission" / "relay.crt"

    @property
    def key(self) -> Path:
        return self.directory / "submission" / "relay.key"

    @property
    def users(self) -> Path:
        return self.directory / "submission" / "users"

    @property
    def account(self) -> Path:
        return self.directory / ACCOUNT_FILE

    def ensure(self, hostnames: list[str]) -> None:
        """Create what is missing: certificate (for ``hostnames``), password file, account."""
        if not (self.cert.exists() and self.key.exists()):
            cert, key = self_signed(hostnames)
            write_durably(self.key.parent, self.key.name, key)
            write_durably(self.cert.parent, self.cert.name, cert)
        if not (self.account.exists() and self.users.exists()):
            password = secrets.token_urlsafe(12)
            write_password_file(self.users, {PROBE_USER: hash_password(password)})
            account = {"user": PROBE_USER, "password": password}
            write_durably(self.directory, ACCOUNT_FILE, json.dumps(account).encode() + b"\n")

    def read_account(self) -> dict[str, str]:
        """The probe account: ``{"user": ..., "password": ...}``."""
        data: dict[str, str] = json.loads(self.account.read_text())
        return data

    def relay_sections(self, smtp_port: int) -> dict[str, dict[str, Any]]:
        """The relay configuration's additions: listeners on 25, 587, 465 and the backend."""
        return {
            "smtp": {
                "listeners": [
                    {"listen": f"0.0.0.0:{smtp_port}", "role": "smtp"},
                    {
                        "listen": f"0.0.0.0:{SUBMISSION_PORT}",
                        "role": "submission",
                        "auth": BACKEND,
                    },
                    {
                        "listen": f"0.0.0.0:{SUBMISSIONS_PORT}",
                        "role": "submissions",
                        "auth": BACKEND,
                    },
                ],
                "tls_cert": self.cert,
                "tls_key": self.key,
            },
            "auth": {
                # A newcomer's wrong password shows 535 a few times before a lockout shows 454.
                "failure_delay": "500ms",
                "max_failures_per_client": 5,
                "lockout": "2m",
                "backends": {BACKEND: {"type": "password_file", "path": self.users}},
            },
        }


def self_signed(hostnames: list[str]) -> tuple[bytes, bytes]:
    """A self-signed P-256 certificate for ``hostnames`` (a year) and its key, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host) for host in hostnames]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
