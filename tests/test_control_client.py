"""The control socket's one client against a fake relay: replies, silence, nobody there."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hamta.control_client import ControlError, request, send_command

Answer = Callable[[dict[str, object]], bytes | None]


@pytest.fixture
def fake_relay(tmp_path: Path) -> Iterator[Callable[[Answer], Path]]:
    """A unix socket answering each connection's request with ``answer`` (None: silence)."""
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    threads: list[threading.Thread] = []

    def serve(answer: Answer) -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            with connection:
                line = connection.makefile("rb").readline()
                reply = answer(json.loads(line))
                if reply is None:
                    time.sleep(0.5)
                    continue
                connection.sendall(reply)

    def start(answer: Answer) -> Path:
        thread = threading.Thread(target=serve, args=(answer,), daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for thread in threads:
        thread.join(5)


def test_a_reply_of_megabytes_is_read_whole(fake_relay: Callable[[Answer], Path]) -> None:
    # A suppression list or a worker's metrics: far over asyncio's 64 KiB line limit.
    text = "x" * (3 << 20)
    path = fake_relay(
        lambda asked: json.dumps({"ok": True, "text": text, **asked}).encode() + b"\n"
    )
    reply = asyncio.run(request(path, {"command": "metrics"}, 5))
    assert (reply["command"], len(reply["text"])) == ("metrics", len(text))
    assert send_command(path, {"command": "domains"}, 5)["command"] == "domains"


def test_a_refusal_is_the_relays_own_words(fake_relay: Callable[[Answer], Path]) -> None:
    path = fake_relay(lambda _: b'{"ok": false, "error": "relay is fenced: epoch 9"}\n')
    with pytest.raises(ControlError, match=r"^relay is fenced: epoch 9$"):
        send_command(path, {"command": "activate"}, 5)


def test_a_silent_relay_is_a_timeout_of_the_whole_exchange(
    fake_relay: Callable[[Answer], Path],
) -> None:
    path = fake_relay(lambda _: None)
    started = time.monotonic()
    with pytest.raises(ControlError, match=r"^deactivate: no reply within 0.2s$"):
        asyncio.run(request(path, {"command": "deactivate"}, 0.2))
    assert time.monotonic() - started < 0.9


def test_nobody_there(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"^no relay control socket at "):
        send_command(tmp_path / "absent.sock", {"command": "status"}, 1)
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(stale))  # a relay that died without removing its socket
    with pytest.raises(ControlError, match=r"^no relay listens on "):
        send_command(stale, {"command": "status"}, 1)
