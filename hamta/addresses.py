"""PURE: what a client may name in HELO/EHLO and in MAIL FROM / RCPT TO (RFC 5321, RFC 6531).

Everything here takes the text aiosmtpd decoded from a command line (UTF-8, with invalid bytes as
surrogate escapes) and either returns it, checked, or raises :class:`InputError` (or its
:class:`NeedsSmtpUtf8Error`), whose text says why in words fit for a reply. Nothing else is raised
(``tests/test_addresses.py`` checks that with hypothesis), and nothing accepted holds a control
character, a line end or an invalid UTF-8 byte, so an accepted value can go into a header.

How lenient:

- HELO/EHLO: a host name or an IPv4/IPv6 address literal (RFC 5321 4.1.1.1, 4.1.3). Labels may
  hold underscores and start or end with a hyphen (Windows and appliance host names do; Postfix
  takes them too), a single trailing dot is allowed, and a bare one-label name (``localhost``) is
  accepted. Spaces, other punctuation, non-ASCII (EHLO comes before SMTPUTF8 is negotiated:
  the A-label form is expected) and general address literals are refused.
- Paths: angle brackets are required (RFC 5321 4.1.2: no bare ``a@b``), a source route is
  dropped (RFC 5321 4.1.1.3, C.), the local part is a dot-atom or a quoted string, the domain
  LDH labels or an address literal. RFC 5321 4.5.3.1 lengths: local part 64 octets, domain 255,
  label 63, path 256 (brackets included). Non-ASCII (RFC 6531) only when MAIL said SMTPUTF8.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_LABEL = 63
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# RFC 6531 3.3: atext also takes UTF-8 beyond ASCII (controls are refused before).
_ATOM = re.compile(rf"(?:{_ATEXT}|[^\x00-\x7f])+")
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# The forms nearly every client sends, each checked by one regex (a few microseconds).
_PLAIN_MAILBOX = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LDH}(?:\.{_LDH})*")
_PLAIN_HELO = re.compile(r"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")
_HELO_LABEL = re.compile(r"[A-Za-z0-9_-]+")
# qtextSMTP (%d32-33 / %d35-91 / %d93-126) and quoted-pairSMTP (backslash, %d32-126).
_QUOTED = re.compile(r'"(?:[ !#-\[\]-~]|\\[ -~]|[^\x00-\x7f])*"')
# The path nearly every client sends: <dot-atom@ldh.domain>, then parameters or nothing.
_SIMPLE_PATH = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(?=[ ]|$)"
)
_SOURCE_ROUTE = re.compile(r"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*:")


class InputError(ValueError):
    """A client's HELO name or address is refused; the text says why."""


class NeedsSmtpUtf8Error(InputError):
    """A UTF-8 address in a transaction whose MAIL did not carry SMTPUTF8 (RFC 6531 3.4)."""


def _check_characters(text: str, what: str) -> None:
    """Refuse invalid UTF-8, control characters, format characters and line separators."""
    if text.isascii():
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise InputError(f"control character in {what}")
        return
    for char in text:
        if char.isascii():
            if ord(char) < 32 or ord(char) == 127:
                raise InputError(f"control character in {what}")
            continue
        category = unicodedata.category(char)
        if category == "Cs":  # aiosmtpd's surrogate escape of a byte that is not UTF-8
            raise InputError(f"{what} is not valid UTF-8")
        # C1 controls (NEL is a line end to some readers), format characters, separators.
        if category[0] in "CZ":
            raise InputError(f"control or separator character U+{ord(char):04X} in {what}")


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def check_helo(name: str) -> str:
    """The HELO/EHLO argument, if it is a host name or an address literal; else InputError."""
    if _PLAIN_HELO.fullmatch(name) and len(name.removesuffix(".")) <= MAX_DOMAIN:
        return name
    _check_characters(name, "host name")
    if not name.isascii():
        raise InputError("non-ASCII host name (send its A-label form)")
    if name.startswith("["):
        if not name.endswith("]") or not _is_ip_literal(name[1:-1]):
            raise InputError("not a valid address literal")
        return name
    domain = name[:-1] if name.endswith(".") else name
    if not domain or len(domain) > MAX_DOMAIN:
        raise InputError(f"host name empty or over {MAX_DOMAIN} characters")
    for label in domain.split("."):
        if len(label) > MAX_LABEL or not _HELO_LABEL.fullmatch(label):
            raise InputError("not a host name (letters, digits, hyphens, underscores, dots)")
    return name


def _is_ip_literal(inner: str) -> bool:
    """IPv4-address-literal or IPv6-address-literal (RFC 5321 4.1.3)."""
    text, ipv6 = (inner[5:], True) if inner[:5].upper() == "IPV6:" else (inner, False)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == (6 if ipv6 else 4)


def split_path(argument: str) -> tuple[str, str]:
    """``<mailbox> [parameters]`` → (mailbox, parameters); ``<>`` gives an empty mailbox.

    Only the brackets, a source route and quoting are looked at here; :func:`check_mailbox`
    checks the mailbox itself.
    """
    match = _SIMPLE_PATH.match(argument)
    if match is not None:
        return match.group(1), argument[match.end() :].strip()
    if not argument.startswith("<"):
        raise InputError("the address must be in angle brackets")
    inner = argument[1:]
    route = _SOURCE_ROUTE.match(inner)
    if route is not None:  # RFC 5321 4.1.1.3: accepted, and ignored
        inner = inner[route.end() :]
    end = _end_of_mailbox(inner)
    if end < 0:
        raise InputError("no closing angle bracket")
    rest = inner[end + 1 :]
    if rest and not rest.startswith(" "):
        raise InputError("parameters must follow the address after a space")
    return inner[:end], rest.strip()


def _end_of_mailbox(inner: str) -> int:
    """The index of the ``>`` closing the mailbox (quoted strings may hold one), or -1."""
    quoted = escaped = False
    for index, char in enumerate(inner):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def check_mailbox(address: str, *, utf8: bool) -> str:
    """``local-part@domain`` within RFC 5321's syntax and lengths; else InputError.

    ``utf8``: the transaction's MAIL carried SMTPUTF8, so RFC 6531's UTF-8 is allowed.
    """
    if (
        _PLAIN_MAILBOX.fullmatch(address)
        and address.find("@") <= MAX_LOCAL_PART  # the only "@": atext has none
        and len(address) + 2 <= MAX_PATH  # so the domain is within MAX_DOMAIN too
    ):
        return address
    _check_characters(address, "address")
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise InputError("no local-part@domain")
    if _octets(local) > MAX_LOCAL_PART:
        raise InputError(f"local part over {MAX_LOCAL_PART} octets")
    if not (_QUOTED.fullmatch(local) or all(_ATOM.fullmatch(atom) for atom in local.split("."))):
        raise InputError("local part is neither a dot-atom nor a quoted string")
    _check_domain(domain)
    if _octets(address) + 2 > MAX_PATH:
        raise InputError(f"path over {MAX_PATH} octets")
    if not address.isascii() and not utf8:
        raise NeedsSmtpUtf8Error("non-ASCII address needs SMTPUTF8 (RFC 6531)")
    return address


def _check_domain(domain: str) -> str:
    """A mail domain: LDH labels (or U-labels that have an A-label form) or an address literal."""
    if domain.startswith("["):
        if not domain.endswith("]") or not _is_ip_literal(domain[1:-1]):
            raise InputError("not a valid address literal")
        return domain
    if _octets(domain) > MAX_DOMAIN:
        raise InputError(f"domain over {MAX_DOMAIN} octets")
    ascii_form = []
    for each in domain.split("."):
        if not each:
            raise InputError("empty label in the domain")
        label = each
        if not each.isascii():
            try:  # the A-label, within the limits too (RFC 5890); stdlib IDNA raises UnicodeError
                label = each.encode("idna").decode("ascii")
            except UnicodeError:
                raise InputError("a label of the domain has no valid A-label form") from None
        if len(label) > MAX_LABEL:
            raise InputError(f"a label of the domain is over {MAX_LABEL} octets")
        if not _LDH_LABEL.fullmatch(label):
            raise InputError("the domain is not made of letters, digits, hyphens and dots")
        ascii_form.append(label)
    if len(".".join(ascii_form)) > MAX_DOMAIN:
        raise InputError(f"domain over {MAX_DOMAIN} octets in its A-label form")
    return domain


def header_safe(text: str) -> str:
    """``text`` with every control, separator or invalid-UTF-8 character as ``\\xNN``/``\\uNNNN``.

    For the values of the relay's own header lines: what was checked passes unchanged, and a
    value that somehow was not can never end a header line or start another.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)
