"""What the relay consumes instead of relaying: the mail sent to its own report addresses.

``hamta.complaints`` (ARF feedback reports) and ``hamta.bounce_intake`` (DSNs of mail relayed
earlier) each claim an address; the reception handler gives them the mail to it, alone in its
transaction, and answers with what they say (250 only once they made it durable).
"""

from __future__ import annotations

from typing import Protocol


class Intake(Protocol):
    """A consumer of the mail sent to addresses it claims."""

    def accepts(self, address: str) -> bool:
        """Is mail to ``address`` this intake's?"""
        ...

    async def consume(self, data: bytes, qid: str, client: str, recipient: str) -> str:
        """Read and record one message sent to ``recipient``; the SMTP reply to give."""
        ...
