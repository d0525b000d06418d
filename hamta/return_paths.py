"""Signed return paths: the envelope sender of relayed mail names, and vouches for, its recipient.

Anyone can mail the bounces address a DSN saying that some address does not exist; read as is,
it would suppress whoever it names. So, in the spirit of BATV, mail whose envelope sender is the
bounces address (or a ``local+tag`` form of it, the VERP senders used before) leaves with a
return path of its own per recipient::

    bounces+<day>.<mac>.<recipient local part>=<recipient domain>@hamta.example

``day`` is the day of sending (days since the epoch, UTC) and ``mac`` an HMAC-SHA256 (first 16
hex digits) of the day and the recipient, keyed by a secret of 32 random bytes in
``bounce-secret`` at the root of the spool (created 0600 on first use; it moves with the spool,
so the node that takes over verifies what the other signed). A DSN to such an address is about
mail this relay sent to that recipient, within ``[suppression] bounce_address_days``; a DSN to
any other form proves nothing and changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hamta.durable_files import create_once
from hamta.suppression import normalize

SECRET_FILE = "bounce-secret"
_MAC_DIGITS = 16
_DAY = 86400


@dataclass(frozen=True, slots=True)
class Verified:
    """A signed return path that verified: the recipient it was made for."""

    recipient: str
    day: int


class ReturnPaths:
    """Makes and checks the signed forms of the bounces address."""

    def __init__(
        self, address: str, secret: bytes, max_age_days: int, wall_clock: Callable[[], float]
    ) -> None:
        self.local, _, self.domain = normalize(address).rpartition("@")
        self._secret = secret
        self.max_age_days = max_age_days
        self._wall = wall_clock

    @classmethod
    def on_spool(
        cls, root: Path, address: str, max_age_days: int, wall_clock: Callable[[], float]
    ) -> ReturnPaths:
        """With the spool's secret (created on first use; OSError if it cannot be)."""
        secret = create_once(root, SECRET_FILE, os.urandom(32))
        if len(secret) < 16:
            raise OSError(f"{root / SECRET_FILE}: a secret of {len(secret)} bytes is too short")
        return cls(address, secret, max_age_days, wall_clock)

    def is_bounces_sender(self, sender: str) -> bool:
        """Is ``sender`` the bounces address or a ``local+tag`` form of it (to be signed)?"""
        local, _, domain = normalize(sender).rpartition("@")
        return domain == self.domain and (local == self.local or local.startswith(self.local + "+"))

    def _mac(self, day: int, recipient: str) -> str:
        text = f"{day}:{normalize(recipient)}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()[:_MAC_DIGITS]

    def sign(self, recipient: str) -> str:
        """The return path for mail to ``recipient`` sent now."""
        day = int(self._wall() // _DAY)
        local, _, domain = normalize(recipient).rpartition("@")
        return f"{self.local}+{day}.{self._mac(day, recipient)}.{local}={domain}@{self.domain}"

    def verify(self, address: str) -> Verified | str:
        """What a signed return path vouches for, or why ``address`` vouches for nothing."""
        local, _, domain = normalize(address).rpartition("@")
        tag = local.removeprefix(self.local + "+")
        if domain != self.domain or tag == local:
            return "not signed"
        day_text, _, rest = tag.partition(".")
        mac, _, encoded = rest.partition(".")
        recipient_local, _, recipient_domain = encoded.rpartition("=")
        if not day_text.isdigit() or not recipient_local or not recipient_domain:
            return "not signed"
        day = int(day_text)
        recipient = f"{recipient_local}@{recipient_domain}"
        if not hmac.compare_digest(mac, self._mac(day, recipient)):
            return "bad signature"
        age = int(self._wall() // _DAY) - day
        # A day ahead is a peer's clock a little ahead over midnight.
        if age > self.max_age_days or age < -1:
            return f"signed {age} days ago, kept {self.max_age_days}"
        return Verified(recipient, day)
