"""DKIM signing at reception: per-domain keys, one signature per selector, before spooling.

A message is signed once, when it is accepted, so the spooled bytes carry their signatures and a
relay that takes over after a failover delivers them as they are. The signing domain is the
domain of the From: header (the one DMARC aligns with), else the envelope sender's; mail from a
domain without a key passes unsigned. A domain with two keys (a selector rotation) gets two
DKIM-Signature headers, so receivers verify either while the DNS of the new selector spreads.

The header is built by ``hamta.dkim_header`` (canonicalization, hashes, tags: dkimpy's
``dkim.sign`` spent a third of the signing time in Python around the RSA operation), and the
private-key operation is OpenSSL's, through ``cryptography``, on the key object loaded once
here (it releases the GIL: about 0.7 ms for RSA-2048, against dkimpy's pure-Python 10 ms).
dkimpy and opendkim verify the result in tests/test_dkim.py. Signing runs in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from hamta.dkim_header import signature_header
from hamta.durable_files import create_new

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
ALGORITHMS: tuple[Algorithm, ...] = ("rsa-sha256", "ed25519-sha256")
# RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048.
MIN_RSA_BITS = 1024
DEFAULT_RSA_BITS = 2048
# A TXT record is a list of character-strings of at most 255 bytes each (RFC 1035 3.3.14).
TXT_STRING_MAX = 255
# How many occurrences of one header name are signed (then one more entry, oversigning).
MAX_SIGNED_REPEATS = 3
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


class DkimKeyError(ValueError):
    """A signing key that cannot be used: missing, unreadable, malformed or of the wrong kind."""


# ------------------------------------------------------------------------ keys


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One loaded key: who signs with it and what DNS must publish for it."""

    domain: str
    selector: str
    algorithm: Algorithm
    path: Path
    #: The public key as the p= tag wants it (base64).
    public_key: str
    #: The loaded private key, parsed once (OpenSSL's object), that signs the digests.
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = field(repr=False, compare=False)

    def sign_digest(self, digest: bytes) -> bytes:
        """The b= bytes for the SHA-256 digest of the header data (RFC 6376 3.7, RFC 8463)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.private.sign(digest)

    @property
    def dns_name(self) -> str:
        """Where the key's TXT record lives."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt_value(self) -> str:
        """The TXT record's text: ``v=DKIM1; k=rsa; p=...``."""
        return txt_value(self.algorithm, self.public_key)


def txt_value(algorithm: Algorithm, public_key: str) -> str:
    """The DKIM key record (RFC 6376 3.6.1; k=ed25519 from RFC 8463)."""
    kind = "rsa" if algorithm == "rsa-sha256" else "ed25519"
    return f"v=DKIM1; k={kind}; p={public_key}"


def txt_strings(value: str) -> list[str]:
    """A TXT value cut into character-strings of at most 255 bytes (the record is ASCII)."""
    return [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]


def dns_record_line(key_name: str, value: str) -> str:
    """A zone-file line: ``NAME IN TXT "..." "..."``, one string per 255 bytes."""
    strings = " ".join(f'"{s}"' for s in txt_strings(value))
    return f"{key_name} IN TXT {strings}"


def _public_key_text(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        der = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(der).decode("ascii")


def _load_private_key(data: bytes, path: Path) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimKeyError(f"{path}: not a usable PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise DkimKeyError(f"{path}: a {type(key).__name__}, not an RSA or Ed25519 key")
        return key
    # dkimpy's dknewkey writes an Ed25519 key as the base64 of its 32-byte seed.
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise DkimKeyError(
            f"{path}: neither a PEM private key nor a base64 Ed25519 seed of 32 bytes"
        )
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def load_signing_key(path: Path, domain: str, selector: str, algorithm: Algorithm) -> SigningKey:
    """Read and check one key; :class:`DkimKeyError` says what is wrong with it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror}") from None
    key = _load_private_key(data, path)
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{path}: an Ed25519 key, but algorithm is rsa-sha256")
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"{path}: RSA key of {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS} "
                "(RFC 8301)"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{path}: an RSA key, but algorithm is ed25519-sha256")
    return SigningKey(
        domain=domain.lower().rstrip("."),
        selector=selector,
        algorithm=algorithm,
        path=path,
        public_key=_public_key_text(key),
        private=key,
    )


def key_file_warning(path: Path) -> str | None:
    """Why a key file's permissions are too open (group or others may read it), or None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); use 0600"
    return None


def generate_key(
    directory: Path, domain: str, selector: str, algorithm: Algorithm, bits: int = DEFAULT_RSA_BITS
) -> SigningKey:
    """Write a new private key (mode 0600, never over an existing file) and return it loaded."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    domain = domain.lower().rstrip(".")
    # Never over an existing file: a key that is already published must not be replaced.
    path = create_new(directory, f"{domain}.{selector}.key", pem)
    return load_signing_key(path, domain, selector, algorithm)


# --------------------------------------------------------------------- signing


def _header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message[: end + 2] if end >= 0 else message


def from_domain(message: bytes) -> str | None:
    """The domain of the From: header's first address, lower-cased, or None."""
    block = _header_block(message)
    match = re.search(rb"^from[ \t]*:(.*(?:\r\n[ \t].*)*)", block, re.IGNORECASE | re.MULTILINE)
    if match is None:
        return None
    value = match.group(1).replace(b"\r\n", b"").decode("utf-8", errors="replace")
    for _, address in getaddresses([value]):
        domain = address.rpartition("@")[2].strip().lower().rstrip(".")
        if "@" in address and domain:
            return domain
    return None


class DkimSigner:
    """The configured keys by domain, and the signing of one message with all of a domain's."""

    def __init__(
        self,
        keys: Iterable[SigningKey],
        headers: Iterable[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock  # t=, the signing time
        self.by_domain: dict[str, list[SigningKey]] = {}
        for key in keys:
            self.by_domain.setdefault(key.domain, []).append(key)
        self.headers = frozenset(h.lower() for h in headers)

    def keys_for(self, message: bytes, sender: str) -> list[SigningKey]:
        """The keys that sign this message: those of its From: domain, else its sender's."""
        domain = from_domain(message)
        if domain is None:
            domain = sender.rpartition("@")[2].lower().rstrip(".") if "@" in sender else ""
        return self.by_domain.get(domain, [])

    def include_headers(self, message: bytes) -> list[bytes]:
        """The h= list: each configured header present, as often as it occurs plus once more.

        Headers that are absent are not listed (a relay on the way may add e.g. List-Id). A
        present one is listed once more than it occurs (oversigning), so that no other of that
        name can be added to a signed message without breaking the signature (RFC 6376 8.15);
        but at most MAX_SIGNED_REPEATS times and once more: every entry names one occurrence,
        and a message with 50,000 Subject: lines made a 515 KB DKIM-Signature when each was.
        """
        counts: dict[bytes, int] = {}
        for name in _HEADER_NAME.findall(_header_block(message)):
            lowered = name.lower()
            if lowered.decode("ascii", errors="replace") in self.headers:
                counts[lowered] = counts.get(lowered, 0) + 1
        counts.setdefault(b"from", 0)
        return [
            name
            for name, count in counts.items()
            for _ in range(min(count, MAX_SIGNED_REPEATS) + 1)
        ]

    def sign(self, message: bytes, keys: list[SigningKey]) -> bytes:
        """The DKIM-Signature headers to prepend, one per key (CPU-bound: call in a thread)."""
        include = self.include_headers(message)
        now = int(self.clock())
        return b"".join(
            signature_header(
                message,
                domain=key.domain.encode("ascii"),
                selector=key.selector.encode("ascii"),
                algorithm=key.algorithm.encode("ascii"),
                names=include,
                timestamp=now,
                sign=key.sign_digest,
            )
            for key in keys
        )


def load_signer(
    keys: Iterable[tuple[str, str, Path, Algorithm]], headers: Iterable[str]
) -> tuple[DkimSigner, list[str]]:
    """A signer for ``(domain, selector, path, algorithm)`` keys, and warnings about their files."""
    loaded = []
    warnings = []
    for domain, selector, path, algorithm in keys:
        loaded.append(load_signing_key(path, domain, selector, algorithm))
        warning = key_file_warning(path)
        if warning is not None:
            warnings.append(warning)
    return DkimSigner(loaded, headers), warnings
