"""``node.workers = N``: relay processes sharing the SMTP port, each owning one spool shard.

Every test runs real ``hamta serve`` processes. Mail is sent over many separate connections, so
that the kernel's SO_REUSEPORT hashing (on the client's source port) hands some to every worker;
with 20 or more connections the chance that one worker gets none is below one in a million.
Workers are found by the ``WorkerStarted`` events worker 0 logs, shards by ``hamta/workers.py``'s
own naming, and listening sockets by ``/proc/net/tcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import smtplib
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hamta.control_client import ControlError, send_command
from hamta.spool import Spool, load_state
from hamta.workers import control_path, shard_path
from tests.conftest import MX_HOST, RelayFactory
from tests.support import RecordingSink
from tests.support.relay import HAMTA, RelayProcess
from tests.test_crash import History, sender

RETRY = {"first_delay": "200ms", "max_delay": "1s", "jitter": 0.0}


def workers(count: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Configuration overrides for a node of ``count`` workers and quick retries."""
    return {"node": {"workers": count}, "retry": RETRY, **sections}


# ------------------------------------------------------------------ helpers


def send_spread(
    port: int, connections: int, domain: str = "sink.test", local: str = "user"
) -> list[str]:
    """Send one message on each of ``connections`` new connections; return the queue ids."""
    qids = []
    for n in range(connections):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            client.mail("a@origin.test")
            client.rcpt(f"{local}{n}@{domain}")
            code, reply = client.data(f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode())
            assert code == 250, reply
            qids.append(reply.decode().rsplit(" ", 1)[-1])
    return qids


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port``."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == "0A")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (external processes have no event to wait on) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        time.sleep(0.03)


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def worker_pids(relay: RelayProcess) -> dict[int, int]:
    """The latest pid of each worker 1..N-1, from worker 0's ``WorkerStarted`` events."""
    return {int(e["worker"]): int(e["worker_pid"]) for e in relay.events("WorkerStarted")}


def by_worker(relay: RelayProcess, event: str) -> Counter[int]:
    """How many ``event`` events each worker logged."""
    return Counter(int(e["worker"]) for e in relay.events(event))


def shard_depths(relay: RelayProcess) -> list[int]:
    """Messages in each worker's shard, as the node's ``/api/queue`` reports them."""
    return [int(w["depth"]) for w in relay.queue()["workers"]]


def offline_depths(root: Path, count: int) -> list[int]:
    """Messages in each shard, read from the journals of a spool no relay holds."""
    return [load_state(shard_path(root, k)).stats.messages for k in range(count)]


def waiting(summary: dict[str, Any], domain: str) -> int:
    """Recipients of ``domain`` ready or deferred in a queue summary."""
    row = summary["domains"].get(domain, {})
    return int(row.get("ready", 0)) + int(row.get("deferred", 0))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A Prometheus exposition as ``{(sample name, sorted labels): value}``."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def ask_worker(relay: RelayProcess, worker: int, request: str = "status") -> dict[str, Any]:
    """One command on a single worker's own control socket."""
    return send_command(control_path(relay.control, worker), {"command": request}, timeout=30)


def answers(socket: Path) -> bool:
    """Whether a relay answers ``status`` on the control socket ``socket``."""
    try:
        send_command(socket, {"command": "status"}, timeout=5)
    except ControlError:
        return False
    return True


@pytest.fixture
def node(make_relay: RelayFactory) -> Iterator[RelayFactory]:
    """``make_relay``, and at the end no worker of any relay it made is left running."""
    relays: list[RelayProcess] = []

    def factory(*args: Any, **kwargs: Any) -> RelayProcess:
        relay = make_relay(*args, **kwargs)
        relays.append(relay)
        return relay

    yield factory
    for relay in relays:
        relay.stop()  # worker 0 stops its workers; the kernel stops them if it was killed
        for pid in {int(e["worker_pid"]) for e in relay.events("WorkerStarted")}:
            with contextlib.suppress(TimeoutError):
                wait_until(functools.partial(gone, pid), 10, f"worker {pid} still running")
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                # Only a worker of ours: the pid may have been reused since.
                if not gone(pid) and b"--worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


# -------------------------------------------------------------------- tests


def test_workers_share_the_port_and_deliver_every_message_once(
    node: RelayFactory, sink: RecordingSink
) -> None:
    relay = node(workers(2))
    assert listeners(relay.port) == 2
    qids = send_spread(relay.port, 40)
    assert sink.wait_for(40, timeout=20)
    relay.wait_queue_empty()

    assert len(set(qids)) == 40
    delivered = Counter(e["queue_id"] for e in relay.events("Delivery"))
    assert delivered == Counter(qids), "every message delivered exactly once"
    assert sorted(m.rcpt_tos for m in sink.messages) == sorted(
        (f"user{n}@sink.test",) for n in range(40)
    )
    received = by_worker(relay, "Reception")
    assert received[0] > 0 and received[1] > 0, f"the kernel gave one worker nothing: {received}"
    assert sum(received.values()) == 40
    # Each shard is a spool of its own, locked by the worker that owns it.
    assert relay.queue()["spool"] == str(relay.spool)
    for k, pid in ((0, relay.pid), (1, worker_pids(relay)[1])):
        shard = shard_path(relay.spool, k)
        assert (shard / "VERSION").is_file() and (shard / "journal").is_dir()
        assert (shard / "lock").read_text().strip() == str(pid)
    assert not (relay.spool / "shard-1" / "shard-1").exists()
    assert relay.terminate() == 0
    assert offline_depths(relay.spool, 2) == [0, 0]


def test_node_views_add_up_every_worker(node: RelayFactory) -> None:
    # deadmx.test's MX never answers: everything stays queued, spread over both shards, and
    # after one refusal each waits long enough for the figures to hold still.
    relay = node(workers(2, retry={"first_delay": "60s", "max_delay": "60s", "jitter": 0.0}))
    send_spread(relay.port, 24, domain="deadmx.test")
    # A recipient whose MX is being tried is in neither column: wait for every refusal.
    wait_until(lambda: waiting(relay.queue(), "deadmx.test") == 24, 10, "mail still being tried")
    summary = relay.queue()
    assert (summary["state"], summary["ready"], summary["depth"]) == ("active", True, 24)
    depths = shard_depths(relay)
    assert len(depths) == 2 and min(depths) > 0 and sum(depths) == 24
    assert summary["received_total"] == 24
    assert summary["recipients_ready"] + summary["recipients_deferred"] == 24
    assert relay.get("/health/ready")[0] == 200

    result = relay.cli("relay", "status", "--socket", str(relay.control))
    assert result.returncode == 0, result.stderr
    over_socket = json.loads(result.stdout)
    assert over_socket["depth"] == 24
    assert [w["state"] for w in over_socket["workers"]] == ["active", "active"]
    online = relay.cli("queue", "--config", str(relay.config_path), "--json")
    assert json.loads(online.stdout)["depth"] == 24, online.stderr

    status_code, body = relay.get("/metrics")
    assert status_code == 200
    node_metrics = samples(body.decode())
    own = [samples(ask_worker(relay, k, "metrics")["text"]) for k in range(2)]
    received = ("hamta_messages_received_total", ())
    assert node_metrics[received] == 24
    assert own[0][received] > 0 and own[1][received] > 0
    assert own[0][received] + own[1][received] == 24
    assert node_metrics[("hamta_queue_messages", ())] == 24
    assert node_metrics[("hamta_ready", ())] == 1
    # The node's exposition names its families as one relay's does.
    assert "# TYPE hamta_messages_received_total counter" in body.decode()

    # One worker out of service makes the whole node not ready.
    assert ask_worker(relay, 1, "deactivate")["state"] == "standby"
    assert relay.get("/health/ready")[0] == 503
    summary = relay.queue()
    assert summary["ready"] is False
    assert [w["state"] for w in summary["workers"]] == ["active", "standby"]
    assert samples(relay.get("/metrics")[1].decode())[("hamta_ready", ())] == 0
    # Activated on its own, a worker takes its shard of the configured spool.
    activation = ask_worker(relay, 1, "activate")
    assert activation["spool"] == str(shard_path(relay.spool, 1))
    assert activation["recovered_messages"] == depths[1]
    assert relay.get("/health/ready")[0] == 200
    assert relay.queue()["depth"] == 24

    # Offline, `hamta queue` reads every shard.
    assert relay.terminate() == 0
    assert offline_depths(relay.spool, 2) == depths
    offline = relay.cli("queue", "--config", str(relay.config_path))
    assert offline.returncode == 0, offline.stderr
    assert "state: offline   messages queued: 24" in offline.stdout
    assert "deadmx.test" in offline.stdout


def test_warm_standby_activates_every_worker(node: RelayFactory, sink: RecordingSink) -> None:
    relay = node(workers(2), standby=True, start=False)
    relay.start(wait_ready=False)
    # As the cluster agent does: activate as soon as the control socket answers.
    wait_until(functools.partial(answers, relay.control), 20, "no control socket")
    assert len(relay.events("WorkerStarted")) == 1, "worker 0 answered before its workers"
    assert relay.get("/health/ready")[0] == 503
    assert listeners(relay.port) == 0
    assert [w["state"] for w in relay.queue()["workers"]] == ["standby", "standby"]

    result = relay.cli("relay", "activate", "--socket", str(relay.control))
    assert result.returncode == 0, result.stderr
    activation = json.loads(result.stdout)
    assert activation["spool"] == str(relay.spool)
    assert activation["recovered_messages"] == 0
    assert listeners(relay.port) == 2
    assert relay.get("/health/ready")[0] == 200
    send_spread(relay.port, 20)
    assert sink.wait_for(20, timeout=20)
    received = by_worker(relay, "Reception")
    assert received[0] > 0 and received[1] > 0, received

    result = relay.cli("relay", "deactivate", "--socket", str(relay.control))
    assert result.returncode == 0, result.stderr
    assert listeners(relay.port) == 0
    assert relay.get("/health/ready")[0] == 503
    assert [w["state"] for w in relay.queue()["workers"]] == ["standby", "standby"]
    assert relay.terminate() == 0
    assert sink.count == 20


def test_a_killed_worker_is_restarted_on_its_shard(node: RelayFactory, mx_port: int) -> None:
    # No MX answers yet: the mail waits in both shards while worker 1 is killed.
    relay = node(workers(2))
    qids = send_spread(relay.port, 24)
    depths = shard_depths(relay)
    assert depths[1] > 0, depths
    victim = worker_pids(relay)[1]
    os.kill(victim, signal.SIGKILL)

    relay.wait_events("WorkerReactivated")
    assert [e["code"] for e in relay.events("WorkerExited")] == [-signal.SIGKILL]
    assert worker_pids(relay)[1] != victim
    recovered = [e for e in relay.events("QueueRecovered") if e["worker"] == 1]
    assert [e["messages"] for e in recovered] == [0, depths[1]]
    assert recovered[-1]["spool"] == str(shard_path(relay.spool, 1))
    assert listeners(relay.port) == 2
    assert relay.get("/health/ready")[0] == 200
    assert relay.queue()["depth"] == 24

    with RecordingSink(host=MX_HOST, port=mx_port) as late:
        assert late.wait_for(24, timeout=20)
        relay.wait_queue_empty()
        assert late.count == 24
    delivered = relay.events("Delivery")
    assert Counter(e["queue_id"] for e in delivered) == Counter(set(qids))
    assert Counter(int(e["worker"]) for e in delivered)[1] == depths[1]


def test_a_worker_whose_parent_is_gone_before_it_arms_its_death_signal_exits(
    node: RelayFactory, tmp_path: Path
) -> None:
    relay = node(workers(2), start=False)
    serve = [*HAMTA, "serve", "--config", str(relay.config_path), "--worker", "1"]
    # Started by a shell that exits at once, as a worker 0 killed during the worker's imports:
    # the worker is an orphan before it asks the kernel to signal its parent's death.
    stderr = tmp_path / "orphan.stderr"
    script = 'exec 2>"$1"; shift; "$@" --parent-pid $$ >/dev/null & echo $!'
    shell = subprocess.run(
        ["sh", "-c", script, "sh", str(stderr), *serve], check=True, capture_output=True
    )
    orphan = int(shell.stdout)
    try:
        wait_until(lambda: gone(orphan), 10, "the orphaned worker lives on")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    assert stderr.read_text() == ""  # gone by its own SIGTERM, not by a usage error
    # Told of a parent that is not its own (init, not this test): it goes by SIGTERM at once.
    stated = subprocess.run(
        [*serve, "--parent-pid", "1"], check=False, capture_output=True, timeout=10
    )
    assert stated.returncode == -signal.SIGTERM, stated.stderr


def test_killing_worker_0_stops_the_node_and_a_restart_recovers_every_shard(
    node: RelayFactory, mx_port: int
) -> None:
    relay = node(workers(3))
    others = worker_pids(relay)
    assert sorted(others) == [1, 2]
    # No MX answers until the restart. Mail on many connections fills every shard; then a few
    # senders, each on one connection at a time, keep going while worker 0 is killed.
    history = History()
    for n, qid in enumerate(send_spread(relay.port, 30)):
        history.acked[f"user{n}"] = qid
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender, args=(relay.port, f"s{i}", history, stop), daemon=True)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(history.acked) >= 60, 20, "too little mail accepted")
        relay.kill()
        # The kernel signals the other workers, which stop as on SIGTERM.
        wait_until(lambda: all(gone(pid) for pid in others.values()), 15, "workers outlived 0")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    exited = by_worker(relay, "RelayExited")
    assert exited[1] == 1 and exited[2] == 1 and exited[0] == 0

    offline = relay.cli("queue", "--config", str(relay.config_path), "--json")
    assert offline.returncode == 0, offline.stderr
    queued = json.loads(offline.stdout)
    assert queued["state"] == "offline"
    depths = offline_depths(relay.spool, 3)
    assert queued["depth"] == sum(depths) >= len(history.acked)
    assert min(depths) > 0, depths

    before = len(relay.events("QueueRecovered"))
    relay.start()
    recovered = relay.events("QueueRecovered")[before:]
    assert sorted((e["worker"], e["messages"]) for e in recovered) == list(enumerate(depths))
    with RecordingSink(host=MX_HOST, port=mx_port) as late:
        relay.wait_queue_empty(timeout=30)
        delivered = Counter(m.rcpt_tos[0].partition("@")[0] for m in late.messages)
    lost = set(history.acked) - set(delivered)
    assert not lost, f"{len(lost)} acknowledged messages lost: {sorted(lost)[:10]}"
    assert set(delivered) <= set(history.acked) | history.unknown
    assert max(delivered.values()) == 1, "a message was delivered twice"


def test_a_node_restarted_at_once_is_not_robbed_by_workers_still_stopping(
    node: RelayFactory, mx_port: int
) -> None:
    # A slow MX keeps worker 1 in its graceful stop after worker 0 is killed, while the node is
    # started again warm, as an agent restarts its relay.
    with RecordingSink(host=MX_HOST, port=mx_port, slow_seconds=30) as slow:
        # A graceful stop ends by node.stop_timeout at the latest: long enough to outlast the
        # node's restart on a slow machine.
        relay = node({"node": {"workers": 2, "stop_timeout": "15s"}, "retry": RETRY})
        old = worker_pids(relay)[1]
        send_spread(relay.port, 20, local="slow")
        wait_until(lambda: ask_worker(relay, 1)["in_flight"] > 0, 10, "worker 1 delivers nothing")
        relay.kill()
        relay.standby = True
        relay.start(wait_ready=False)
        wait_until(functools.partial(answers, relay.control), 20, "no control socket")
        assert not gone(old), "worker 1 stopped too soon for the test to mean anything"
        # The worker the node started answers at its path, not the old one still stopping.
        assert ask_worker(relay, 1)["pid"] == worker_pids(relay)[1] != old
        # Its shard is still locked: activation fails cleanly and the node stays warm.
        early = relay.cli("relay", "activate", "--socket", str(relay.control))
        assert early.returncode == 1
        assert "in use by pid" in early.stderr
        assert [w["state"] for w in relay.queue()["workers"]] == ["standby", "standby"]
        slow.stop()  # the slow delivery fails, and the old worker 1 finishes stopping
        wait_until(functools.partial(gone, old), 10, "old worker 1 still stopping")

    result = relay.cli("relay", "activate", "--socket", str(relay.control))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recovered_messages"] == 20
    assert listeners(relay.port) == 2
    assert relay.queue()["depth"] == 20
    assert relay.terminate() == 0


def test_fewer_workers_than_shards_holding_mail_is_refused(
    node: RelayFactory, mx_port: int
) -> None:
    first = node(workers(3))
    send_spread(first.port, 30)
    depths = shard_depths(first)
    assert depths[2] > 0, depths
    assert first.terminate() == 0

    for count, stray in ((2, "shard-2"), (1, "shard-1, shard-2")):
        fewer = node(workers(count, spool={"path": first.spool}), start=False)
        fewer.start(wait_ready=False)
        assert fewer.proc is not None
        assert fewer.proc.wait(timeout=15) == 1
        assert f"node.workers = {count}: {stray};" in fewer.stderr()
        assert fewer.events("ActivationFailed")
    assert offline_depths(first.spool, 3) == depths, "a refused start touched the spool"

    # As the message says: with enough workers the shards drain, then fewer workers may run.
    with RecordingSink(host=MX_HOST, port=mx_port) as late:
        first.start()
        assert late.wait_for(30, timeout=20)
        first.wait_queue_empty()
        assert first.terminate() == 0
    single = node(workers(1, spool={"path": first.spool}))
    assert single.queue()["depth"] == 0
    assert single.terminate() == 0


def test_the_default_worker_count_adopts_the_shards_of_a_larger_node(
    node: RelayFactory, mx_port: int
) -> None:
    # A spool from a node with more CPUs (a failover to a smaller one): shards 0..3 hold mail,
    # and a relay whose node.workers is unset, pinned to two CPUs, runs two workers. It must
    # not refuse the takeover: workers without SMTP sockets deliver shards 2 and 3.
    relay = node(start=False, prelude="import os; os.sched_setaffinity(0, {0, 1})")
    text = relay.config_path.read_text()
    assert "workers = 1\n" in text
    relay.config_path.write_text(text.replace("workers = 1\n", ""))

    async def strand() -> None:
        for k in range(4):
            shard = Spool(shard_path(relay.spool, k))
            shard.open()
            await shard.recover()
            body = f"Subject: left {k}\r\n\r\nbehind\r\n".encode()
            await shard.append(body, "a@origin.test", [f"left{k}@sink.test"])
            await shard.close()

    asyncio.run(strand())
    with RecordingSink(host=MX_HOST, port=mx_port) as late:
        relay.start(timeout=90)  # worker 0, then the adopting ones, start on a busy machine
        adopted = relay.events("StrayShardsAdopted")
        assert [e["shards"] for e in adopted] == [["shard-2", "shard-3"]]
        assert [w["worker"] for w in relay.queue()["workers"]] == [0, 1, 2, 3]
        assert listeners(relay.port) == 2, "an adopted shard took new mail"
        assert late.wait_for(4, timeout=20)
        relay.wait_queue_empty()
        assert sorted(m.rcpt_tos[0] for m in late.messages) == [
            f"left{k}@sink.test" for k in range(4)
        ]
    assert relay.terminate() == 0
    assert offline_depths(relay.spool, 4) == [0, 0, 0, 0]
    # Drained, the shards strand nothing: the next start runs the two workers alone.
    relay.start(timeout=90)
    assert [w["worker"] for w in relay.queue()["workers"]] == [0, 1]
    assert relay.terminate() == 0


def test_an_explicit_worker_count_that_strands_a_shard_is_refused(node: RelayFactory) -> None:
    # Set on purpose, the count is the operator's: the relay refuses and loses nothing.
    relay = node(start=False)

    async def strand() -> None:
        shard = Spool(shard_path(relay.spool, 1))
        shard.open()
        await shard.recover()
        await shard.append(b"Subject: left\r\n\r\nbehind\r\n", "a@origin.test", ["u@sink.test"])
        await shard.close()

    asyncio.run(strand())
    relay.start(wait_ready=False)
    assert relay.proc is not None and relay.proc.wait(timeout=30) == 1
    assert "node.workers = 1: shard-1;" in relay.stderr()
    assert "node.workers is not set" not in relay.stderr()
    assert load_state(shard_path(relay.spool, 1)).stats.messages == 1, "the refusal lost mail"
