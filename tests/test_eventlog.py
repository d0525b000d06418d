"""The event log writes a line for every event, even one carrying bytes no UTF-8 can hold."""

from __future__ import annotations

import json
from pathlib import Path

from hamta import eventlog


def test_an_event_with_undecodable_client_bytes_is_written_escaped(tmp_path: Path) -> None:
    # How aiosmtpd hands over a command holding an invalid UTF-8 byte: a surrogate escape.
    sender = b"j\xe9@client.test".decode("utf-8", "surrogateescape")
    log = tmp_path / "events.log"
    stream = eventlog.configure("info", log)
    try:
        eventlog.get_logger(node="n").info("Reception", sender=sender, rcpts=[sender])
    finally:
        stream.close()
    line = json.loads(log.read_bytes().splitlines()[-1])
    assert line["event"] == "Reception"
    assert line["sender"] == "j\\udce9@client.test"
    assert line["rcpts"] == ["j\\udce9@client.test"]
