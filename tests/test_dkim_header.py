"""hamta.dkim_header against dkimpy: the same canonical forms, and signatures dkimpy verifies.

The relay-level tests (tests/test_dkim.py) send real mail through ``hamta serve`` and verify it
with dkimpy and opendkim; these check the header builder itself over many generated messages,
in process, with the keys answered from a dict instead of DNS.
"""

from __future__ import annotations

from pathlib import Path

import dkim
import pytest
from dkim.canonicalization import Relaxed
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hamta import dkim_header
from hamta.config import DKIM_DEFAULT_HEADERS
from hamta.dkim_signing import DkimSigner, SigningKey, generate_key

# Lines of SMTP mail as hamta accepts them: no bare CR or LF, no NUL; runs of WSP likely.
LINE = st.text(alphabet=st.sampled_from("ab .\t-:=é"), max_size=30).map(
    lambda text: text.encode("utf-8")
)
BODY = st.lists(LINE, max_size=12).map(b"\r\n".join) | st.lists(LINE, max_size=12).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines)
)


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> list[SigningKey]:
    directory: Path = tmp_path_factory.mktemp("dkim-header-keys")
    return [
        generate_key(directory, "sign.test", "s1", "rsa-sha256", bits=1024),
        generate_key(directory, "sign.test", "e1", "ed25519-sha256"),
    ]


@settings(max_examples=400)
@given(BODY)
@example(b"")
@example(b"\r\n\r\n")
@example(b"text \t \r\n\r\n \r\n")
@example(b"a\r\n\r\n\r")
@example(b"tail without line end \t")
def test_the_relaxed_body_is_dkimpys(body: bytes) -> None:
    assert dkim_header.relaxed_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=400)
@given(st.lists(LINE, min_size=1, max_size=4))
def test_a_relaxed_header_field_is_dkimpys(lines: list[bytes]) -> None:
    # A folded value: the first line after the colon, the others continuation lines.
    value = b"\r\n\t".join(lines) + b"\r\n"
    ((name, expected),) = Relaxed.canonicalize_headers([(b"X-Test", value)])
    assert dkim_header.relaxed_header(b"X-Test", value[:-2]) == name + b":" + expected


HEADERS = st.lists(
    st.tuples(
        st.sampled_from([b"From", b"to", b"Subject", b"SUBJECT", b"Date", b"X-Other"]),
        st.lists(LINE, min_size=1, max_size=3),
    ),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(HEADERS, BODY)
@example([(b"From", [b" a@sign.test"])], b"")
def test_what_it_signs_dkimpy_verifies(
    signing_keys: list[SigningKey], fields: list[tuple[bytes, list[bytes]]], body: bytes
) -> None:
    head = b"".join(name + b":" + b"\r\n\t".join(lines) + b"\r\n" for name, lines in fields)
    message = head + b"\r\n" + body
    signer = DkimSigner(signing_keys, DKIM_DEFAULT_HEADERS, clock=lambda: 1_796_000_000.0)
    signed = signer.sign(message, signing_keys) + message
    records = {f"{k.dns_name}.".encode(): k.txt_value.encode() for k in signing_keys}
    checker = dkim.DKIM(signed)
    for index in range(2):
        assert checker.verify(idx=index, dnsfunc=lambda name, timeout=5: records.get(name))
    # And a change to a signed header or to the body is seen.
    tampered = signed.replace(b"\r\n\r\n", b"\r\n\r\nadded\r\n", 1)
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        dkim.DKIM(tampered).verify(dnsfunc=lambda name, timeout=5: records.get(name))


def test_header_lines_are_folded_and_t_is_the_clock(signing_keys: list[SigningKey]) -> None:
    subjects = b"".join(b"Subject: %d\r\n" % n for n in range(3))
    message = b"From: a@sign.test\r\nTo: b@x.test\r\n" + subjects + b"\r\nbody\r\n"
    signer = DkimSigner(signing_keys[:1], DKIM_DEFAULT_HEADERS, clock=lambda: 1_796_000_000.9)
    header = signer.sign(message, signing_keys[:1])
    assert header.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert b"\tt=1796000000; h=" in header
    assert header.endswith(b"\r\n") and header.count(b"\r\n") > 3
    assert max(len(line) for line in header.split(b"\r\n")) <= 78


def test_a_header_that_is_not_one_is_refused() -> None:
    with pytest.raises(dkim_header.DkimFormatError):
        dkim_header.split_message(b"From: a@b\r\nno colon here\r\n\r\nbody\r\n")
    with pytest.raises(dkim_header.DkimFormatError):
        dkim_header.split_message(b" folded first\r\nFrom: a@b\r\n\r\n")
    assert dkim_header.split_message(b"\r\nonly a body\r\n") == ([], b"only a body\r\n")
    assert dkim_header.split_message(b"From: a@b\r\n") == ([(b"From", b" a@b")], b"")
