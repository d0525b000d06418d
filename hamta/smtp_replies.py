"""The replies of hamta's SMTP reception and the checks of bytes they answer: RFC 3463 enhanced
status codes (ENHANCEDSTATUSCODES is advertised, so aiosmtpd's own replies get them too, in
``hamta.smtp.HamtaSMTP.push``)."""

from __future__ import annotations

import re

_STATUS = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)

# Enhanced codes for aiosmtpd's own replies, by basic code (RFC 3463, RFC 5248).
_DEFAULT_ENHANCED = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.1.5", "421": "4.3.2", "450": "4.2.0", "451": "4.3.0",
    "452": "4.3.1", "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "550": "5.7.1", "552": "5.3.4", "553": "5.1.3",
    "554": "5.0.0", "555": "5.5.4",
}  # fmt: skip
# aiosmtpd texts that deserve a clearer word.
_REWORDED = {
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
}

REPLY_OK = "250 2.0.0 Ok"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
REPLY_SMUGGLING = (
    "550 5.5.2 Message refused: bare CR or LF in message data "
    "(only CRLF line ends are allowed; SMTP smuggling protection)"
)
REPLY_NUL = "550 5.6.0 Message refused: NUL character in message data"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_HELO = "501 5.5.4 Bad HELO/EHLO host name"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address without SMTPUTF8 on MAIL (RFC 6531 3.4)"
REPLY_TLS_ACTIVE = "503 5.5.1 TLS is already active"
REPLY_NO_AUTH = "502 5.5.1 Authentication is not available"
REPLY_SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
REPLY_SPOOL_ERROR = "451 4.3.0 Local error in processing, try again later"
REPLY_LOCAL_ERROR = REPLY_SPOOL_ERROR  # any unexpected error: the same words, no details
REPLY_SUPERSEDED = "421 4.3.2 This node is no longer the active one, try again later"
# Sessions the relay ends itself, by limit (hamta.admission); never between DATA and its reply.
REPLY_CUT = {
    "idle": "421 4.4.2 Idle timeout exceeded, closing connection",
    "session_time": "421 4.4.2 Session time limit exceeded, closing connection",
    "data_rate": "421 4.4.2 Data transfer too slow, closing connection",
}
REPLY_INTAKE_ALONE = "452 4.5.3 Reports (feedback, bounces) are taken one recipient per transaction"


def has_bare_line_end(data: bytes) -> bool:
    """True when ``data`` holds a CR not followed by LF, or an LF not preceded by CR."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def has_control_character(address: str) -> bool:
    """True when an address holds a control character (CR, LF, NUL and the like)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in address)


def with_enhanced_code(reply: str) -> str:
    """Add the enhanced status code to a 2xx/4xx/5xx reply line that lacks one."""
    reworded = _REWORDED.get(reply)
    if reworded is not None:
        return reworded
    match = _STATUS.match(reply)
    if match is None or _ENHANCED.match(match.group(4)):
        return reply
    code = match.group(1) + match.group(2)
    enhanced = _DEFAULT_ENHANCED.get(code, f"{match.group(1)}.0.0")
    return f"{code}{match.group(3)}{enhanced} {match.group(4)}"


def message_id_of(body: bytes) -> str:
    """The Message-ID header of a message, or an empty string."""
    end = body.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(body, 0, end if end >= 0 else len(body))
    return match.group(1).decode("utf-8", errors="replace").strip() if match else ""
