"""Who may use the agent's HTTP API: open reads from ``[api] read_networks``, a bearer token
or a client certificate for everything else.

The token is read once at the agent's start from a file that only its owner may read (mode
0600 or narrower): a token any local user can read is no secret, so a wider mode is refused
rather than trusted. A client certificate counts only when the TLS handshake verified it
against ``api.client_ca`` (the server asks for one, and a certificate the CA did not sign ends
the handshake), so its mere presence here is the proof.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path


class ApiAuthError(Exception):
    """The API's credentials cannot be loaded; the message names the file and the fix."""


def load_token(path: Path) -> str:
    """The bearer token in ``path``: its first line, the file owner-only."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ApiAuthError(f"api.token_file {path}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ApiAuthError(
            f"api.token_file {path}: mode {stat.S_IMODE(mode):04o} lets others read the token; "
            f"chmod 600 {path}"
        )
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise ApiAuthError(
            f"api.token_file {path}: the token must be at least 16 characters "
            "(e.g. openssl rand -hex 32)"
        )
    return token


class Verdict(enum.Enum):
    """What a request may do."""

    ALLOWED = "allowed"
    UNAUTHENTICATED = "unauthenticated"  # 401: no credentials where they are needed
    FORBIDDEN = "forbidden"  # 403: wrong credentials


@dataclass(frozen=True, slots=True)
class Caller:
    """What a request brings: its address, its Authorization header, a verified certificate."""

    address: str
    authorization: str | None
    certificate: bool


@dataclass(frozen=True, slots=True)
class Access:
    """The API's access rule."""

    read_networks: Sequence[IPv4Network | IPv6Network]
    token: str | None  # None: no token is accepted
    client_certificates: bool  # verified client certificates authorize changes

    def _in_read_networks(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", maxsplit=1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.read_networks)

    def judge(self, caller: Caller, *, changes: bool) -> tuple[Verdict, str]:
        """Whether ``caller`` may read (``changes`` False) or change; and why not."""
        if caller.certificate and self.client_certificates:
            return Verdict.ALLOWED, "client certificate"
        header = caller.authorization
        if header is not None:
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not presented.strip():
                return Verdict.FORBIDDEN, "not a bearer token"
            if self.token is None:
                return Verdict.FORBIDDEN, "no token is configured (api.token_file)"
            if hmac.compare_digest(presented.strip().encode(), self.token.encode()):
                return Verdict.ALLOWED, "token"
            return Verdict.FORBIDDEN, "wrong token"
        if not changes and self._in_read_networks(caller.address):
            return Verdict.ALLOWED, "read network"
        if changes:
            return Verdict.UNAUTHENTICATED, "a change needs a bearer token or a client certificate"
        return Verdict.UNAUTHENTICATED, "not in api.read_networks, and no token"
