"""Supervision: the relay never stops silently, and a stop always ends the process in time.

A bad record fails its own message (451) and nothing else; a long-lived task that dies turns the
relay unready and ends the process with a non-zero code; SIGTERM ends the process within
``node.stop_timeout`` even when a task is stuck. Faults that no input can cause any more (a bug
in a loop task, a disk that hangs) are injected into a real ``hamta serve`` process with
:class:`RelayProcess`'s ``prelude``: the rest of the relay is the real one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import structlog.testing

from hamta import eventlog
from hamta.config import Config
from hamta.dsn import FailedRecipient
from hamta.dsn_batch import FailedBatch
from hamta.listeners import bind
from hamta.relay import Relay
from tests.conftest import RelayFactory
from tests.support import RecordingSink
from tests.support.ports import free_port
from tests.support.relay import RelayProcess
from tests.support.smtpwire import SmtpWire

STOP_TIMEOUT = 3.0
MESSAGE = b"From: a@client.test\r\nSubject: supervision\r\n\r\nbody\r\n.\r\n"


def send_ok(relay: RelayProcess, sender: str = "a@client.test") -> str:
    """One ordinary message over a fresh connection; its 250 reply."""
    with SmtpWire(relay.host, relay.port, timeout=10) as wire:
        assert wire.command("EHLO client.test").code == 250
        assert wire.command(f"MAIL FROM:<{sender}>").code == 250
        assert wire.command("RCPT TO:<r@sink.test>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(MESSAGE)
        reply = wire.read_reply()
        assert reply.code == 250, reply
        return reply.text


@pytest.mark.parametrize("byte", [b"\xe9", b"\x85"])
def test_a_sender_that_is_not_utf8_fails_alone(
    make_relay: RelayFactory, sink: RecordingSink, byte: bytes
) -> None:
    relay = make_relay({"node": {"stop_timeout": f"{STOP_TIMEOUT}s"}})
    with SmtpWire(relay.host, relay.port, timeout=5) as wire:
        assert wire.command("EHLO client.test").code == 250
        mail = wire.command(b"MAIL FROM:<j" + byte + b"@client.test>")
        if mail.code == 250:  # refused at MAIL (501) once addresses are checked: fine too
            assert wire.command("RCPT TO:<r@sink.test>").code == 250
            assert wire.command("DATA").code == 354
            wire.send(MESSAGE)
            reply = wire.read_reply()  # once, no reply ever came
            assert reply.text.startswith("451 4.3.0"), reply
        else:
            assert mail.code == 501, mail
    # Every other client is served as before, and the relay says it is ready because it is.
    assert "queued as" in send_ok(relay)
    assert relay.get("/health/ready")[0] == 200
    assert sink.wait_for(1, timeout=15)
    started = time.monotonic()
    assert relay.terminate(timeout=STOP_TIMEOUT + 5) == 0
    assert time.monotonic() - started < STOP_TIMEOUT
    assert not relay.events("TaskFailed")


def test_a_dead_task_stops_the_relay_with_a_non_zero_code(make_relay: RelayFactory) -> None:
    fault = (
        "import asyncio, hamta.queue\n"
        "async def broken(self):\n"
        "    await asyncio.sleep(1.0)\n"
        "    raise RuntimeError('injected timer fault')\n"
        "hamta.queue.MailQueue.run_timer = broken\n"
    )
    relay = make_relay({"node": {"stop_timeout": f"{STOP_TIMEOUT}s"}}, prelude=fault)
    assert relay.proc is not None
    code = relay.proc.wait(timeout=1.0 + STOP_TIMEOUT + 5)
    assert code == 1
    [failed] = relay.events("TaskFailed")
    assert failed["level"] == "error"
    assert failed["task"] == "queue timer"
    assert failed["error"] == "RuntimeError: injected timer fault"
    assert relay.events("RelayExited")[-1]["code"] == 1


def test_a_dead_worker_watcher_stops_the_node(make_relay: RelayFactory) -> None:
    # Worker 0 watches its workers to restart them; a watcher dying of a bug would leave a
    # worker dead for good, its shard's mail undelivered.
    fault = (
        "import asyncio, hamta.workers\n"
        "async def broken(self, worker, process):\n"
        "    await asyncio.sleep(1.0)\n"
        "    raise RuntimeError('injected watcher fault')\n"
        "hamta.workers.WorkerPool._watch = broken\n"
    )
    relay = make_relay({"node": {"workers": 2, "stop_timeout": f"{STOP_TIMEOUT}s"}}, prelude=fault)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=1.0 + STOP_TIMEOUT + 5) == 1
    [failed] = relay.events("TaskFailed")
    assert failed["task"] == "worker 1 watcher" and failed["worker"] == 0
    assert failed["error"] == "RuntimeError: injected watcher fault"


def test_sigterm_ends_a_relay_whose_disk_hangs(make_relay: RelayFactory) -> None:
    # The spool's I/O thread never comes back: DATA gets no answer, and a graceful stop would
    # wait for the spool forever. The stop deadline ends the process all the same.
    fault = (
        "import threading, hamta.spool\n"
        "hamta.spool.Spool._write_batch = lambda self, batch: threading.Event().wait()\n"
    )
    relay = make_relay({"node": {"stop_timeout": f"{STOP_TIMEOUT}s"}}, prelude=fault)
    wire = SmtpWire(relay.host, relay.port, timeout=10)
    try:
        assert wire.command("EHLO client.test").code == 250
        assert wire.command("MAIL FROM:<a@client.test>").code == 250
        assert wire.command("RCPT TO:<r@sink.test>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(MESSAGE)
        relay.wait_events("RelayStarted")
        time.sleep(0.3)  # the message reaches the spool's (hung) writer
        started = time.monotonic()
        try:
            code = relay.terminate(timeout=STOP_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the relay still ran {STOP_TIMEOUT + 5} s after SIGTERM")
        elapsed = time.monotonic() - started
    finally:
        wire.close()
    assert code == 1
    assert elapsed < STOP_TIMEOUT + 0.5, elapsed
    assert relay.events("StopDeadlineExceeded")


def test_a_failed_task_turns_the_relay_unready_at_once(tmp_path: Path) -> None:
    config = Config.model_validate(
        {
            "node": {"hostname": "relay.hamta.test"},
            "smtp": {"listen": [f"127.0.0.1:{free_port('127.0.0.1')}"]},
            "spool": {"path": str(tmp_path / "spool")},
            "control": {"socket": str(tmp_path / "relay.sock")},
        }
    )
    reasons: list[str] = []

    async def main() -> None:
        relay = Relay(
            config, listeners=bind(config.smtp.listen, reuse_port=False), on_fatal=reasons.append
        )
        await relay.activate()
        assert relay.ready

        async def broken() -> None:
            raise ValueError("boom")

        await asyncio.gather(
            relay.supervisor.spawn("broken loop", broken()), return_exceptions=True
        )
        assert not relay.ready
        assert relay.supervisor.failure == "broken loop: ValueError: boom"
        # A task cancelled by its owner is an expected end, not a failure.
        quiet = relay.supervisor.spawn("quiet loop", asyncio.sleep(60))
        quiet.cancel()
        await asyncio.gather(quiet, return_exceptions=True)
        await relay.deactivate(1.0)

    asyncio.run(main())
    assert reasons == ["broken loop: ValueError: boom"]


def test_an_internal_error_answers_451_without_its_text(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    send_ok(relay)  # acknowledged before the fault: delivered all the same
    assert sink.wait_for(1, timeout=15)
    relay.wait_queue_empty()
    shutil.rmtree(relay.spool / "data")  # an operator's slip, or a volume gone
    with SmtpWire(relay.host, relay.port, timeout=5) as wire:
        assert wire.command("EHLO client.test").code == 250
        assert wire.command("MAIL FROM:<a@client.test>").code == 250
        assert wire.command("RCPT TO:<r@sink.test>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(MESSAGE)
        reply = wire.read_reply()
        assert reply.text == "451 4.3.0 Local error in processing, try again later", reply
        assert "Error" not in reply.text and "/" not in reply.text
        assert wire.command("QUIT").code == 221
    [event] = relay.wait_events("SessionError")
    assert event["level"] == "error"
    assert event["session"]
    assert event["error"].startswith("FileNotFoundError")
    assert "spool/data" in event["traceback"]
    assert sink.count == 1


def test_a_dsn_that_cannot_be_built_fails_its_message_alone(tmp_path: Path) -> None:
    # A bounce task is supervised: one message's DSN failing must not stop the relay (which,
    # restarted, would find the same message and stop again).
    config = Config.model_validate(
        {
            "node": {"hostname": "relay.hamta.test"},
            "smtp": {"listen": [f"127.0.0.1:{free_port('127.0.0.1')}"]},
            "spool": {"path": str(tmp_path / "spool")},
            "control": {"socket": str(tmp_path / "relay.sock")},
        }
    )
    reasons: list[str] = []

    async def main() -> None:
        relay = Relay(
            config, listeners=bind(config.smtp.listen, reuse_port=False), on_fatal=reasons.append
        )
        await relay.activate()
        spool, engine = relay.spool, relay._active.engine if relay._active else None
        assert spool is not None and engine is not None
        message = await spool.append(b"Subject: x\r\n\r\nbody\r\n", "a@client.test", ["r@x.test"])
        # A recipient no DSN can name (such envelopes are refused at append since, and an
        # envelope in memory is its msgpack bytes, which cannot hold one: a failure report of a
        # bug could still name one).
        report = FailedRecipient("r\udce9@x.test", "5.1.1", "550 5.1.1 no such user", "mx.x.test")
        batch = FailedBatch(message, [report], [("x.test", [0], 1)], expired=False)
        await asyncio.wait_for(engine._send_dsn(batch), 5)
        assert message.rec.qid not in spool.live  # finished, its DSN logged as not sent
        assert relay.ready
        await relay.deactivate(1.0)

    with structlog.testing.capture_logs() as logs:
        asyncio.run(main())
    assert reasons == []
    [failed] = [e for e in logs if e["event"] == "DsnNotBuilt"]
    assert failed["log_level"] == "error" and "UnicodeEncodeError" in failed["error"]


def test_an_event_holding_bytes_that_are_not_utf8_is_logged_escaped(tmp_path: Path) -> None:
    # Once a log call raised on a lone surrogate, which inside a supervised task would stop the
    # relay: the line is written with the character escaped instead.
    log = tmp_path / "events.log"
    eventlog.configure("info", log)
    eventlog.get_logger(node="n").error("DsnNotBuilt", recipients=["r\udce9@x.test"], n=1)
    [line] = [json.loads(raw) for raw in log.read_bytes().splitlines()]
    assert line["recipients"] == ["r\\udce9@x.test"] and line["n"] == 1


def test_a_message_whose_client_vanished_while_it_was_synced_is_delivered(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    # The session is cancelled when its connection is lost, even while its message is being
    # synced: the message became durable, yet nothing queued it, and it waited in the spool
    # for the next restart (bench/fuzz.py: 11 messages stuck after 30 minutes). A slow disk
    # (each batch 1 s) makes the window wide enough to drop the connection in.
    slow = (
        "import time, hamta.spool\n"
        "write = hamta.spool.Spool._write_batch\n"
        "def slow(self, batch):\n"
        "    time.sleep(1.0)\n"
        "    write(self, batch)\n"
        "hamta.spool.Spool._write_batch = slow\n"
    )
    relay = make_relay(prelude=slow)
    wire = SmtpWire(relay.host, relay.port, timeout=10)
    assert wire.command("EHLO client.test").code == 250
    assert wire.command("MAIL FROM:<a@client.test>").code == 250
    assert wire.command("RCPT TO:<gone@sink.test>").code == 250
    assert wire.command("DATA").code == 354
    wire.send(b"Subject: the client is gone\r\n\r\nbody\r\n.\r\n")
    time.sleep(0.3)  # the end of data is read, the batch under way (a second, by the prelude)
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wire.close()  # RST: the relay sees the connection lost during the sync
    assert sink.wait_for(1, timeout=20), relay.queue()
    assert b"the client is gone" in sink.messages[0].data
