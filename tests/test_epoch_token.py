"""The fencing token on the spool, and a relay that a newer term supersedes."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import stat
import time
from pathlib import Path

import pytest

from hamta.epoch_token import TOKEN_FILE, EpochGuard, TokenError, read_token, write_token
from tests.conftest import MX_HOST, RelayFactory
from tests.support import RecordingSink
from tests.support.relay import RelayProcess

# ------------------------------------------------------------------ the token file


def test_token_round_trip_and_never_back_in_time(tmp_path: Path) -> None:
    assert read_token(tmp_path / TOKEN_FILE) is None
    path = write_token(tmp_path, 7)
    assert path == tmp_path / TOKEN_FILE
    assert read_token(path) == 7
    assert path.stat().st_size == 4096  # one block, rewritten in place
    inode = path.stat().st_ino
    write_token(tmp_path, 7)  # the same term again: fine
    write_token(tmp_path, 9)
    assert read_token(path) == 9
    assert path.stat().st_ino == inode
    with pytest.raises(TokenError, match="carries epoch 9, newer than ours \\(8\\)"):
        write_token(tmp_path, 8)
    assert read_token(path) == 9
    assert path.read_text().split() == ["9"]  # still readable by a person


def test_the_token_is_readable_by_the_relay_user_whatever_the_writers_umask(
    tmp_path: Path,
) -> None:
    # The agent runs with UMask=0027 (its unit); the relay runs as a user of its own.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / TOKEN_FILE).write_bytes(b"1\n")
    (earlier / TOKEN_FILE).chmod(0o640)  # written by a release before this one
    previous = os.umask(0o027)
    try:
        fresh = write_token(tmp_path, 1)
        rewritten = write_token(earlier, 2)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    assert stat.S_IMODE(rewritten.stat().st_mode) == 0o644
    assert read_token(rewritten) == 2


def test_a_garbled_token_is_an_error_not_an_epoch(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text("seven\n")
    with pytest.raises(TokenError, match="not a fencing token"):
        read_token(path)
    with pytest.raises(TokenError):
        write_token(tmp_path, 3)


def test_guard_is_sticky_and_reports_once(tmp_path: Path) -> None:
    write_token(tmp_path, 4)
    reports: list[str] = []
    guard = EpochGuard(tmp_path / TOKEN_FILE, 4, reports.append, max_age=0)
    guard.verify()
    assert guard.check() is None
    write_token(tmp_path, 5)
    reason = guard.check()
    assert reason is not None and "epoch 5" in reason and "epoch 4" in reason
    # Even if the newer term's token went away again, a superseded relay stays superseded.
    (tmp_path / TOKEN_FILE).unlink()
    assert guard.check() == reason
    assert reports == [reason]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "is gone"), ("junk", "cannot read the fencing token"), ("1", "belongs to epoch 1")],
)
def test_a_missing_or_unreadable_token_fences(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    write_token(tmp_path, 2)
    guard = EpochGuard(tmp_path / TOKEN_FILE, 2, max_age=0)
    guard.verify()
    path = tmp_path / TOKEN_FILE
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    assert expected in (guard.check() or "")


def test_the_token_is_read_again_once_the_last_read_is_older_than_max_age(
    tmp_path: Path,
) -> None:
    now = [100.0]
    write_token(tmp_path, 8)
    guard = EpochGuard(tmp_path / TOKEN_FILE, 8, max_age=0.02, clock=lambda: now[0])
    guard.verify()
    reads = guard.reads
    write_token(tmp_path, 9)
    now[0] += 0.01
    assert guard.check() is None  # read 10 ms ago: trusted (one direct read per 20 ms at most)
    assert guard.reads == reads
    now[0] += 5.0  # a process stopped for seconds: the boot-time clock went on
    assert "epoch 9" in (guard.check() or "")
    assert guard.reads == reads + 1


def test_verify_refuses_another_term(tmp_path: Path) -> None:
    write_token(tmp_path, 6)
    with pytest.raises(TokenError, match="epoch 6"):
        EpochGuard(tmp_path / TOKEN_FILE, 5).verify()
    with pytest.raises(TokenError, match="belongs to epoch 6; this relay serves epoch 7"):
        EpochGuard(tmp_path / TOKEN_FILE, 7).verify()


# ------------------------------------------------------------------ a superseded relay


def _activate(relay: RelayProcess, epoch: int, token: Path) -> dict[str, object]:
    result = relay.cli(
        "relay",
        "activate",
        "--spool",
        str(relay.spool),
        "--socket",
        str(relay.control),
        "--epoch",
        str(epoch),
        "--token",
        str(token),
    )
    assert result.returncode == 0, result.stderr
    reply: dict[str, object] = json.loads(result.stdout)
    return reply


def _files(spool: Path) -> dict[str, tuple[int, int]]:
    """Every file of the spool with its size and modification time (ns)."""
    return {
        str(p.relative_to(spool)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in spool.rglob("*")
        if p.is_file() and p.name != "lock"
    }


def _send(port: int, rcpt: str) -> tuple[int, bytes]:
    """The reply that ended a one-message transaction (a refusal at any stage, or DATA's)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            for reply in (client.mail("a@origin.test"), client.rcpt(rcpt)):
                if reply[0] != 250:
                    return reply
            return client.data(b"Subject: t\r\n\r\nbody\r\n")
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        return exc.smtp_code, error if isinstance(error, bytes) else error.encode()


def test_a_superseded_relay_stops_writing_accepting_and_delivering(
    make_relay: RelayFactory, mx_port: int, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    token = write_token(storage, 3)
    relay = make_relay(standby=True)
    refused = relay.cli(
        "relay", "activate", "--socket", str(relay.control), "--epoch", "2", "--token", str(token)
    )
    assert refused.returncode == 1 and "not activated" in refused.stderr
    with RecordingSink(host=MX_HOST, port=mx_port, slow_seconds=1.5) as sink:
        _activate(relay, 3, token)
        assert _send(relay.port, "one@sink.test")[0] == 250
        assert sink.wait_for(1, timeout=10)
        # A delivery whose RCPT the MX is still answering when the next term takes over must
        # not send its DATA.
        assert _send(relay.port, "slow@sink.test")[0] == 250
        deadline = time.monotonic() + 10
        while relay.queue()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert relay.queue()["in_flight"] == 1
        write_token(storage, 4)
        fenced = relay.wait_events("RelayFenced", timeout=10)
        assert "epoch 4" in fenced[0]["reason"]
        before = _files(relay.spool)
        code, reply = _send(relay.port, "two@sink.test")
        assert (code, reply[:5]) == (421, b"4.3.2")
        time.sleep(2.0)  # past the slow MX's answer: long enough for a DATA to have gone out
        assert sink.count == 1
        assert _files(relay.spool) == before  # not one byte written after the fence
        assert relay.get("/health/ready")[0] == 503
        status = relay.cli("relay", "status", "--socket", str(relay.control))
        summary = json.loads(status.stdout)
        assert summary["epoch"] == 3 and "epoch 4" in summary["fenced"]
        assert relay.cli("relay", "deactivate", "--socket", str(relay.control)).returncode == 0
        # The message it could not deliver is still queued, for the term that owns it now.
        activation = _activate(relay, 4, token)
        assert activation["recovered_messages"] == 1
        assert sink.wait_for(2, timeout=15)
        assert sink.messages[1].rcpt_tos == ("slow@sink.test",)


def test_a_superseded_relay_acknowledges_nothing_more(
    make_relay: RelayFactory, sink: RecordingSink, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    token = write_token(storage, 11)
    relay = make_relay(standby=True)
    _activate(relay, 11, token)
    assert _send(relay.port, "one@sink.test")[0] == 250
    assert sink.wait_for(1, timeout=10)
    before = _files(relay.spool)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the delivery's Done record is on disk
        time.sleep(0.2)
        before, settled = _files(relay.spool), before
        if before == settled and relay.queue()["depth"] == 0:
            break
    # Nothing is under way: the first to notice the newer term is the next write to the spool.
    write_token(storage, 12)
    time.sleep(0.05)  # past the guard's 20 ms between direct reads of the token
    code, reply = _send(relay.port, "two@sink.test")
    assert (code, reply[:5]) == (421, b"4.3.2")
    assert relay.wait_events("NotAcknowledged")[0]["error"].startswith("the spool belongs to")
    assert relay.wait_events("RelayFenced")
    assert _files(relay.spool) == before
    assert _send(relay.port, "three@sink.test")[0] == 421  # refused at MAIL from now on
    assert sink.count == 1


def test_every_worker_checks_the_token(
    make_relay: RelayFactory, sink: RecordingSink, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    token = write_token(storage, 20)
    relay = make_relay({"node": {"workers": 2}}, standby=True)
    _activate(relay, 20, token)
    assert all(_send(relay.port, f"u{n}@sink.test")[0] == 250 for n in range(6))
    assert sink.wait_for(6, timeout=15)
    write_token(storage, 21)
    time.sleep(0.05)  # past the guards' 20 ms between direct reads of the token
    # The kernel spreads connections over the workers; each must refuse on its own.
    assert [_send(relay.port, f"v{n}@sink.test")[0] for n in range(8)] == [421] * 8
    assert relay.get("/health/ready")[0] == 503
    time.sleep(0.5)
    assert sink.count == 6


def test_a_relay_frozen_past_the_takeover_writes_and_delivers_nothing_when_it_wakes(
    make_relay: RelayFactory, mx_port: int, tmp_path: Path
) -> None:
    """SIGSTOP with a client in DATA and a delivery waiting on its MX; the next term's epoch
    lands on the spool meanwhile (as the peer's EPOCH step writes it); then SIGCONT."""
    storage = tmp_path / "storage"
    token = write_token(storage, 30)
    relay = make_relay(standby=True)
    assert relay.proc is not None
    with RecordingSink(host=MX_HOST, port=mx_port, slow_seconds=1.0) as sink:
        _activate(relay, 30, token)
        assert _send(relay.port, "slow@sink.test")[0] == 250  # its delivery waits on RCPT
        deadline = time.monotonic() + 10
        while relay.queue()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
            client.ehlo()
            assert client.mail("a@origin.test")[0] == 250
            assert client.rcpt("late@sink.test")[0] == 250
            relay.proc.send_signal(signal.SIGSTOP)
            try:
                # The relay's kernel still takes the bytes; the relay reads them after waking.
                client.putcmd("data")
                before = _files(relay.spool)
                write_token(storage, 31)
                time.sleep(1.5)  # frozen past the MX's answer to its RCPT
            finally:
                relay.proc.send_signal(signal.SIGCONT)
            code, _ = client.getreply()
            if code == 354:
                client.send(b"Subject: late\r\n\r\nwritten after the takeover?\r\n.\r\n")
                code, _ = client.getreply()
        assert code == 421
        time.sleep(1.5)
        assert sink.count == 0  # the delivery waiting on RCPT never sent its DATA
        assert _files(relay.spool) == before
        assert relay.wait_events("RelayFenced")
