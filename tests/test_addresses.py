"""Property tests of hamta.addresses: HELO names, MAIL/RCPT paths and header values.

For any text a client can send (aiosmtpd hands over command arguments as UTF-8 with invalid bytes
as surrogate escapes, so surrogates are in the alphabet), the checks either refuse with
``InputError`` or return a value within RFC 5321's limits that holds no control character, no
line end, no NUL and nothing that is not valid UTF-8. What the real relay answers is in
``tests/test_client_input.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hamta.addresses import (
    MAX_DOMAIN,
    MAX_LABEL,
    MAX_LOCAL_PART,
    MAX_PATH,
    InputError,
    NeedsSmtpUtf8Error,
    check_helo,
    check_mailbox,
    header_safe,
    split_path,
)

# Any code point, surrogates included (an invalid UTF-8 byte, as aiosmtpd decodes it).
ANY_CHAR = st.characters(codec=None, categories=None, exclude_categories=())
# Characters that make up addresses and host names, and those that break them, so that the
# generated text often comes close to being accepted.
NEAR_CHARS = st.sampled_from(
    [*'abcxyzABC019-_.@<>[]:,"\\ +=!#~', *"\r\n\x00\t\x7f\x85\u2028\udce9éñ日"]
)
NEAR = st.lists(NEAR_CHARS | st.sampled_from(["IPv6:", "xn--", "d" * 63]), max_size=60).map("".join)
WILD = st.text(ANY_CHAR, max_size=300) | NEAR
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)
ATOM = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}", fullmatch=True)
LOCAL = st.lists(ATOM, min_size=1, max_size=4).map(".".join)
DOMAIN = st.lists(LABEL, min_size=1, max_size=5).map(".".join)


def clean(text: str) -> bool:
    """No control character, no line end, no NUL, no invalid UTF-8 (surrogate)."""
    text.encode("utf-8")  # raises on a surrogate
    return not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text) and "\u2028" not in text


def labels_within_limits(domain: str) -> bool:
    if domain.startswith("["):
        return True
    ascii_labels = [
        label if label.isascii() else label.encode("idna").decode() for label in domain.split(".")
    ]
    return all(0 < len(label) <= MAX_LABEL for label in ascii_labels) and (
        len(".".join(ascii_labels)) <= MAX_DOMAIN
    )


@settings(max_examples=600)
@given(WILD)
@example("client.test\rX-Injected-Via-EHLO: yes\rBcc: boss@sink.test")
@example("client.test\r\x00.\r")
@example("cl\udcffient.test")
@example("a" * 64 + ".test")
@example("[IPv6:::1]")
def test_helo_check_refuses_or_returns_a_clean_host_name(name: str) -> None:
    try:
        checked = check_helo(name)
    except InputError:
        return
    assert checked == name
    assert clean(checked) and checked.isascii() and " " not in checked
    assert len(checked.removesuffix(".")) <= MAX_DOMAIN
    assert checked.startswith("[") or all(
        0 < len(label) <= MAX_LABEL for label in checked.removesuffix(".").split(".")
    )


@settings(max_examples=600)
@given(WILD, st.booleans())
@example("<a@x..test>", False)
@example("<" + "l" * 300 + "@sink.test>", False)
@example("<a b@sink.test>", False)
@example("a@sink.test", False)
@example("<j\udce9@client.test>", True)
@example("<jörg@sink.test>", False)
@example('<"a>b"@x.test> SIZE=1', False)
@example("<@hop.test:a@b.test> SMTPUTF8", True)
def test_path_checks_refuse_or_return_a_mailbox_within_rfc_limits(
    argument: str, utf8: bool
) -> None:
    try:
        mailbox, _ = split_path(argument)
        checked = check_mailbox(mailbox, utf8=utf8)
    except NeedsSmtpUtf8Error:
        assert not utf8
        return
    except InputError:
        return
    assert checked == mailbox and argument.startswith("<")
    assert clean(checked)
    local, _, domain = checked.rpartition("@")
    assert local and len(local.encode()) <= MAX_LOCAL_PART
    assert len(domain.encode()) <= MAX_DOMAIN and labels_within_limits(domain)
    assert len(checked.encode()) + 2 <= MAX_PATH
    assert utf8 or checked.isascii()


@given(LOCAL, DOMAIN, st.sampled_from(["", " SIZE=100", " SMTPUTF8 BODY=8BITMIME"]))
def test_every_plain_address_within_the_limits_is_taken_as_it_is(
    local: str, domain: str, parameters: str
) -> None:
    address = f"{local}@{domain}"
    assert split_path(f"<{address}>{parameters}") == (address, parameters.strip())
    path_fits = len(address) + 2 <= MAX_PATH and len(local) <= MAX_LOCAL_PART
    if path_fits:
        assert check_mailbox(address, utf8=False) == address
    else:
        with pytest.raises(InputError):
            check_mailbox(address, utf8=False)


@given(WILD)
@example("a\r\nBcc: x\x00\udce9\x85\u2028")
def test_header_safe_values_cannot_end_or_start_a_header_line(text: str) -> None:
    safe = header_safe(text)
    assert safe.isprintable() and clean(safe)
    if text.isprintable():
        assert safe == text


def test_null_path_and_limits_at_the_edge() -> None:
    assert split_path("<> SIZE=10") == ("", "SIZE=10")
    assert check_mailbox("l" * 64 + "@x.test", utf8=False)
    with pytest.raises(InputError, match="local part over 64"):
        check_mailbox("l" * 65 + "@x.test", utf8=False)
    assert check_mailbox("a@" + "d" * 63 + ".test", utf8=False)
    with pytest.raises(InputError, match="over 63"):
        check_mailbox("a@" + "d" * 64 + ".test", utf8=False)
    with pytest.raises(NeedsSmtpUtf8Error):
        check_mailbox("jörg@x.test", utf8=False)
    assert check_mailbox("jörg@bücher.test", utf8=True)
