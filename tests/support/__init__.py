"""Real-component test fixtures for hamta: no mocks, every server is a real one on loopback.

- :class:`DnsServer`: dnsmasq serving only the given MX/A/AAAA/null-MX records.
- :class:`RecordingSink`: an aiosmtpd MX that records each delivered message exactly.
- :class:`PostfixSmtpSink`: Postfix's smtp-sink, a fast counting MX for benchmarks.
- :func:`make_self_signed`: a certificate and key for STARTTLS.
- :func:`free_port`: an unused port, also a "dead MX" when nothing is started on it.
"""

from .dns import DnsServer, DnsServerError
from .ports import free_port
from .sink import Delivered, RecordingSink
from .smtp_sink import PostfixSmtpSink
from .tls import make_self_signed

__all__ = [
    "Delivered",
    "DnsServer",
    "DnsServerError",
    "PostfixSmtpSink",
    "RecordingSink",
    "free_port",
    "make_self_signed",
]
