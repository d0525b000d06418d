"""The relay gives up root before it parses a client byte (hamta/privileges.py, hamta/listeners.py).

Real ``hamta serve`` processes started as root (the tests run as root) with ``[node] user`` set
to a system user each test creates with useradd and removes: the kernel's view of the process
(/proc/PID/status) must show that user and no capability, and mail must still flow through a
privileged port. The relay runs on /usr/bin/python3.11 with the shared virtualenv's packages on
its path, because the virtualenv's own interpreter lives under /root, which no unprivileged
user may enter (a production install lives under /opt/hamta).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest

from cluster.zookeeper import ZooKeeperEnsemble
from hamta import privileges
from hamta.workers import control_path
from tests.conftest import MX_HOST
from tests.support import RecordingSink
from tests.support.agents import AgentNode, message_ids, wait_for
from tests.support.relay import HAMTA, RelayProcess
from tests.support.tls import make_self_signed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

SYSTEM_PYTHON = Path("/usr/bin/python3.11")
TREE = Path(__file__).resolve().parent.parent
# Where the shared virtualenv's packages are (aiosmtpd is one of them).
SITE_PACKAGES = Path(aiosmtpd.__file__).resolve().parent.parent
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dictionary."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def dead(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def privileged_port(host: str) -> int:
    """A port below 1024 that nothing listens on at ``host``."""
    for port in range(700, 1024):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free privileged port")


def refused(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is refused (nothing listens)."""
    with socket.socket() as client:
        client.settimeout(5)
        return client.connect_ex((host, port)) != 0


def send(port: int, tag: str) -> str:
    """One message to sink.test through the relay; its queue id."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.mail("a@origin.test")
        client.rcpt("user@sink.test")
        code, reply = client.data(f"Subject: {tag}\r\nMessage-ID: <{tag}@t>\r\n\r\nhi\r\n".encode())
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]


@pytest.fixture
def system_user() -> Iterator[pwd.struct_passwd]:
    """A system user (and its group) of its own for the test, removed afterwards."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run the relay as another user")
    name = f"hamtat{os.getpid() % 100000}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def workdir(system_user: pwd.struct_passwd) -> Iterator[Path]:
    """A directory as hamta serve makes /run/hamta/relay: root's, writable by the user's group.

    (pytest's are root's, mode 0700, all the way up.) Root's, so that the agent, root without
    CAP_DAC_READ_SEARCH under its unit, may reach the control socket in it.
    """
    path = Path(tempfile.mkdtemp(prefix="hamta-priv-"))
    os.chown(path, 0, system_user.pw_gid)
    path.chmod(0o770)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unprivileged_relay(
    workdir: Path,
    user: str,
    mx_port: int,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    standby: bool = False,
    wrapper: tuple[str, ...] = (),
    python: Path = SYSTEM_PYTHON,
) -> RelayProcess:
    """A relay started as root on a privileged port, configured to run as ``user``; through
    ``wrapper`` (setpriv and its options) if given."""
    port = privileged_port("127.0.0.1")
    sections: dict[str, dict[str, Any]] = {
        "node": {"user": user},
        "smtp": {"listen": [f"127.0.0.1:{port}"]},
        "delivery": {"port": mx_port, "routes": {"sink.test": f"[{MX_HOST}]:{mx_port}"}},
    }
    for section, keys in (overrides or {}).items():
        sections.setdefault(section, {}).update(keys)
    relay = RelayProcess(
        workdir,
        sections,
        standby=standby,
        command=[*wrapper, str(python), "-m", "hamtactl"],
        env={**os.environ, "PYTHONPATH": f"{TREE}:{SITE_PACKAGES}"},
    )
    relay.port = port
    return relay


def refused_at_start(relay: RelayProcess) -> None:
    """Start ``relay`` and expect it to exit 1 before it serves."""
    relay.start(wait_ready=False)
    assert relay.proc is not None
    try:
        assert relay.proc.wait(timeout=60) == 1
    finally:
        relay.stop()  # one that started after all must not outlive the test


def assert_unprivileged(pid: int, user: pwd.struct_passwd) -> None:
    fields = status(pid)
    assert fields["Uid"].split() == [str(user.pw_uid)] * 4, fields["Uid"]
    assert fields["Gid"].split() == [str(user.pw_gid)] * 4, fields["Gid"]
    assert fields["Groups"] == "", fields["Groups"]
    assert {name: int(fields[name], 16) for name in CAP_SETS} == dict.fromkeys(CAP_SETS, 0)
    assert fields["NoNewPrivs"] == "1"


def test_relay_started_as_root_serves_mail_as_its_user_with_no_capability(
    workdir: Path, system_user: pwd.struct_passwd, sink: RecordingSink, mx_port: int
) -> None:
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port)
    with relay:
        assert relay.port < 1024  # bound before the drop: no capability is needed to serve it
        assert_unprivileged(relay.pid, system_user)
        send(relay.port, "dropped")
        assert sink.wait_for(1, timeout=30), sink.messages
        relay.wait_queue_empty()
        # The control socket was bound before the drop and stays root's: the agent, root
        # without CAP_DAC_OVERRIDE under its unit, still drives the relay through it.
        assert relay.control.stat().st_uid == 0
        done = subprocess.run(
            [
                "setpriv",
                "--bounding-set",
                "-dac_override,-dac_read_search",
                *HAMTA,
                "relay",
                "status",
                "--socket",
                str(relay.control),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        (dropped,) = relay.events("PrivilegesDropped")
        assert dropped["user"] == system_user.pw_name
        assert dropped["started_as_uid"] == 0 and dropped["bounding_set"] == "cleared"
    # What the relay wrote is its user's: the spool it was handed and everything in it.
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [relay.spool, *relay.spool.rglob("*")]}
    assert owners == {(system_user.pw_uid, system_user.pw_gid)}


def test_a_standby_listens_only_while_active_and_again_after_a_deactivation(
    workdir: Path, system_user: pwd.struct_passwd, sink: RecordingSink, mx_port: int
) -> None:
    # 192.0.2.80 (TEST-NET-1) is on no interface, as the virtual IP is not on a standby node:
    # IP_FREEBIND binds it all the same, before the drop; nothing is ever sent to it.
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, standby=True)
    vip = f"192.0.2.80:{relay.port}"
    relay.config_path.write_text(
        relay.config_path.read_text().replace(
            f'listen = ["127.0.0.1:{relay.port}"]', f'listen = ["127.0.0.1:{relay.port}", "{vip}"]'
        )
    )
    config = str(relay.config_path)
    with relay:
        assert_unprivileged(relay.pid, system_user)
        assert refused("127.0.0.1", relay.port)  # bound, not listening: a standby takes nothing
        for round_ in range(2):  # the second activation listens again with no privilege
            done = relay.cli("relay", "activate", "--config", config, "--spool", str(relay.spool))
            assert done.returncode == 0, done.stderr
            relay.wait_ready()
            send(relay.port, f"round{round_}")
            relay.wait_queue_empty()
            done = relay.cli("relay", "deactivate", "--config", config)
            assert done.returncode == 0, done.stderr
            assert refused("127.0.0.1", relay.port)
        assert sink.wait_for(2, timeout=30), sink.messages
        assert not relay.events("ActivationFailed")


def test_workers_run_unprivileged_and_a_restarted_worker_listens_again(
    workdir: Path, system_user: pwd.struct_passwd, sink: RecordingSink, mx_port: int
) -> None:
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, {"node": {"workers": 2}})
    with relay:
        (started,) = relay.wait_events("WorkerStarted")
        worker = int(started["worker_pid"])
        assert_unprivileged(relay.pid, system_user)
        assert_unprivileged(worker, system_user)
        os.kill(worker, 9)
        # Worker 0 stops the dead worker's socket listening and hands it to the new worker:
        # every connection is served meanwhile (none queued where nobody accepts).
        restarted = relay.wait_events("WorkerStarted", count=2, timeout=30)[-1]
        relay.wait_events("WorkerReactivated", timeout=30)
        assert_unprivileged(int(restarted["worker_pid"]), system_user)
        for n in range(20):
            send(relay.port, f"w{n}")
        assert sink.wait_for(20, timeout=60), len(sink.messages)
        socket_path = control_path(relay.control, 1)
        assert socket_path.stat().st_uid == system_user.pw_uid


def test_root_without_a_user_to_become_refuses_to_start(tmp_path: Path) -> None:
    with contextlib.suppress(KeyError):
        pwd.getpwnam("hamta")
        pytest.skip("this host has a user hamta: a relay started as root would become it")
    relay = RelayProcess(tmp_path, {"node": {"hostname": "relay.hamta.test"}})
    relay.config_path.write_text(relay.config_path.read_text().replace('user = "root"\n', ""))
    started = time.monotonic()
    done = subprocess.run(
        [*HAMTA, "serve", "--config", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1, done
    assert "started as root and [node] user is not set" in done.stderr
    assert "useradd --system hamta" in done.stderr
    assert time.monotonic() - started < 30
    assert not relay.spool.exists() and not relay.control.exists()
    assert refused("127.0.0.1", relay.port)


def test_the_agent_gives_the_spool_to_the_relay_user_whose_relay_runs_unprivileged(
    workdir: Path,
    system_user: pwd.struct_passwd,
    zookeeper: ZooKeeperEnsemble,
    sink: RecordingSink,
    mx_port: int,
) -> None:
    shared = workdir / "shared"
    old = shared / "spool" / "quarantine" / "old-report.eml"
    old.parent.mkdir(parents=True)
    old.write_text("a spool from before the relay ran as its own user\n")  # root's
    port = privileged_port("127.0.0.31")
    relay_config = workdir / "node1" / "relay.toml"
    node = AgentNode(
        workdir,
        "node1",
        host="127.0.0.31",
        smtp_port=port,
        zookeeper=zookeeper.hosts,
        shared_spool=shared,
        credentials=None,
        relay={
            "node": {"user": system_user.pw_name},
            "delivery": {"port": mx_port, "routes": {"sink.test": f"[{MX_HOST}]:{mx_port}"}},
        },
        agent={
            "cluster": f"privileges{os.getpid()}",
            "relay_command": [
                "env",
                f"PYTHONPATH={TREE}:{SITE_PACKAGES}",
                str(SYSTEM_PYTHON),
                "-m",
                "hamtactl",
                "serve",
                "--standby",
                "--config",
                str(relay_config),
            ],
        },
    )
    # The relay makes its control socket there once it runs as its user.
    os.chown(node.workdir, 0, system_user.pw_gid)
    node.workdir.chmod(0o770)
    node.start()
    try:
        wait_for(lambda: node.role() == "active", 60, "the node active")
        (relay,) = node.relay_pids()
        assert_unprivileged(relay, system_user)
        acked = node.send(2, tag="agent-")
        wait_for(lambda: message_ids(sink) >= set(acked), 30, "deliveries")
        tree = [shared / "spool", *(shared / "spool").rglob("*")]
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in tree}
        assert owners == {(system_user.pw_uid, system_user.pw_gid)}
        assert old.read_text().startswith("a spool from before")
        promotion = next(d for d in node.events("StepDone") if d.get("step") == "storage")
        assert f"given to {system_user.pw_name}" in promotion["detail"], promotion
    finally:
        node.stop()


def test_an_unknown_user_is_a_clear_error_at_start(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path, {"node": {"user": "no-such-hamta-user"}})
    done = subprocess.run(
        [*HAMTA, "serve", "--config", str(relay.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1, done
    assert done.stderr == "hamta: no such user 'no-such-hamta-user'\n"
    (failed,) = relay.events("StartFailed")
    assert failed["error"] == "no such user 'no-such-hamta-user'"
    assert not relay.spool.exists() and not relay.control.exists()


def test_dkim_keys_readable_by_root_alone_still_sign_once_the_relay_is_unprivileged(
    workdir: Path, system_user: pwd.struct_passwd, sink: RecordingSink, mx_port: int
) -> None:
    done = subprocess.run(
        [*HAMTA, "dkim", "keygen", "sign.test", "s1", "--directory", str(workdir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    key = workdir / "sign.test.s1.key"
    assert key.stat().st_uid == 0 and key.stat().st_mode & 0o777 == 0o600
    dkim = {"keys": [{"domain": "sign.test", "selector": "s1", "key": key}]}
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, {"dkim": dkim})
    with relay, smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert_unprivileged(relay.pid, system_user)
        client.sendmail(
            "a@sign.test",
            ["user@sink.test"],
            b"From: a@sign.test\r\nTo: user@sink.test\r\nSubject: signed\r\n\r\nhi\r\n",
        )
        assert sink.wait_for(1, timeout=30), sink.messages
    (message,) = sink.messages
    assert b"DKIM-Signature:" in message.data and b"d=sign.test" in message.data


def test_a_tls_key_the_relay_user_cannot_read_stops_the_start_not_a_takeover(
    workdir: Path, system_user: pwd.struct_passwd, mx_port: int
) -> None:
    cert, key = make_self_signed(workdir, "relay.hamta.test")
    key.chmod(0o600)  # root's alone
    smtp = {"tls_cert": cert, "tls_key": key}
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, {"smtp": smtp}, standby=True)
    refused_at_start(relay)
    expected = f"as user {system_user.pw_name}: cannot load smtp.tls_cert {cert}"
    assert expected in relay.stderr() and "Permission denied" in relay.stderr()
    (failed,) = relay.events("StartFailed")
    assert expected in failed["error"]
    # Given to the relay's group, as the role does, the same key serves.
    os.chown(key, 0, system_user.pw_gid)
    key.chmod(0o640)
    with relay:
        done = relay.cli(
            "relay", "activate", "--config", str(relay.config_path), "--spool", str(relay.spool)
        )
        assert done.returncode == 0, done.stderr
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.starttls()
            assert client.noop()[0] == 250


# The agent unit's capability bounding set (ansible/roles/hamta/templates): root without
# CAP_DAC_OVERRIDE, as the relay it starts is before the drop.
AGENT_UNIT_CAPABILITIES = (
    "-all,+net_admin,+net_raw,+sys_admin,+net_bind_service,+kill,+setuid,+setgid,+setpcap,"
    "+chown,+sys_nice"
)


def test_a_relay_started_again_under_its_units_capabilities_opens_its_log_and_its_sockets(
    workdir: Path, system_user: pwd.struct_passwd, sink: RecordingSink, mx_port: int
) -> None:
    # What the Vagrant cluster's guests showed: under the unit, root cannot open a log file of
    # the relay user's own (every start after the first failed), and the directory systemd
    # made for the control sockets (RuntimeDirectory=) was root's 0750 whatever ExecStartPre
    # had done. The relay now makes both itself, before the drop.
    log = workdir / "log" / "relay.log"
    log.parent.mkdir()
    log.write_text("")  # as an earlier release left it: the user's own, 0640
    os.chown(log, system_user.pw_uid, system_user.pw_gid)
    log.chmod(0o640)
    sockets = workdir / "run" / "relay"  # missing: made root:group 0770
    overrides: dict[str, dict[str, Any]] = {
        "node": {"workers": 2},
        "log": {"file": log},
        "control": {"socket": sockets / "relay.sock"},
    }
    unit = ("setpriv", "--bounding-set", AGENT_UNIT_CAPABILITIES)
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, overrides, wrapper=unit)
    for round_ in range(2):  # the second start finds what the first one left
        with relay:
            assert_unprivileged(relay.pid, system_user)
            send(relay.port, f"restart{round_}")
            assert sink.wait_for(round_ + 1, timeout=30), sink.messages
            relay.wait_queue_empty()
            assert control_path(relay.control, 1).stat().st_uid == system_user.pw_uid
    assert (log.stat().st_uid, log.stat().st_gid) == (0, system_user.pw_gid)
    assert log.stat().st_mode & 0o777 == 0o660
    assert (sockets.stat().st_uid, sockets.stat().st_gid) == (0, system_user.pw_gid)
    assert sockets.stat().st_mode & 0o777 == 0o770
    assert len(relay.events("RelayStarted")) >= 2 and not relay.events("StartFailed")


def test_a_control_directory_the_relay_user_cannot_use_is_a_clear_error_at_start(
    workdir: Path, system_user: pwd.struct_passwd, mx_port: int
) -> None:
    sockets = workdir / "relay"
    sockets.mkdir(mode=0o750)  # root's, as systemd's RuntimeDirectory= leaves it
    sockets.chmod(0o750)
    overrides = {"control": {"socket": sockets / "relay.sock"}}
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, overrides, standby=True)
    refused_at_start(relay)
    expected = f"as user {system_user.pw_name}: cannot reach {sockets} (root:root 0750)"
    assert expected in relay.stderr(), relay.stderr()
    (failed,) = relay.events("StartFailed")
    assert failed["error"].startswith(expected)


def test_a_link_where_the_log_goes_is_not_followed(
    tmp_path: Path, system_user: pwd.struct_passwd
) -> None:
    # A relay user able to plant a link where the log goes must not get root to hand it the
    # file behind it (the configuration, say) at the next start.
    target = tmp_path / "relay.toml"
    target.write_text("[node]\n")
    target.chmod(0o640)
    link = tmp_path / "relay.log"
    link.symlink_to(target)
    identity = privileges.resolve(system_user.pw_name, None)
    with pytest.raises(privileges.PrivilegeError, match=r"relay\.log"):
        privileges.give_log_file(link, identity)
    assert (target.stat().st_uid, target.stat().st_gid) == (0, 0)
    assert target.stat().st_mode & 0o777 == 0o640
    hard = tmp_path / "hard.log"
    os.link(target, hard)  # a second name of the same file: not handed over either
    with pytest.raises(privileges.PrivilegeError, match="one link"):
        privileges.give_log_file(hard, identity)
    assert target.stat().st_mode & 0o777 == 0o640
    plain = tmp_path / "log" / "plain.log"
    privileges.give_log_file(plain, identity)
    assert (plain.stat().st_uid, plain.stat().st_gid, plain.stat().st_mode & 0o777) == (
        0,
        system_user.pw_gid,
        0o660,
    )


def test_a_python_installation_the_relay_user_cannot_read_is_a_clear_error_at_start(
    workdir: Path, system_user: pwd.struct_passwd, mx_port: int
) -> None:
    # The virtualenv's interpreter lives under /root (mode 0700): a relay run by it finds, once
    # it is the user, a module it imports lazily missing. Said so, not as a traceback.
    installed = [Path(sys.base_prefix), Path(sys.prefix), SITE_PACKAGES]
    if not any(p.stat().st_mode & 0o001 == 0 for i in installed for p in [i, *i.parents]):
        pytest.skip(f"{installed} are readable by every user here")
    relay = unprivileged_relay(
        workdir, system_user.pw_name, mx_port, standby=True, python=Path(sys.executable)
    )
    refused_at_start(relay)
    assert "Traceback" not in relay.stderr(), relay.stderr()
    expected = f"as user {system_user.pw_name}: No module named"
    assert relay.stderr().startswith(f"hamta: {expected}"), relay.stderr()
    assert "readable by that user? It must be" in relay.stderr()
    (failed,) = relay.events("StartFailed")
    assert failed["error"].startswith(expected)


def test_an_unprivileged_relay_still_dies_with_the_process_that_started_it(
    workdir: Path, system_user: pwd.struct_passwd, mx_port: int
) -> None:
    # As the agent starts it (cluster/relayproc.py), without the agent's watchdog, which would
    # kill it anyway: the kernel clears the parent-death signal when the uid changes.
    relay = unprivileged_relay(workdir, system_user.pw_name, mx_port, standby=True)
    serve = [
        "setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        *relay.command,
        "serve",
        "--standby",
        "--config",
        str(relay.config_path),
    ]
    starter = "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); p.wait()"  # noqa: E501
    parent = subprocess.Popen(
        [sys.executable, "-c", starter, *serve], stdout=subprocess.PIPE, env=relay.env
    )
    assert parent.stdout is not None
    pid = int(parent.stdout.readline())
    try:
        relay.wait_ready(live_only=True)
        assert_unprivileged(pid, system_user)
        parent.kill()
        parent.wait(timeout=10)
        wait_for(functools.partial(dead, pid), 10, "the relay gone with its parent")
        assert relay.events("PrivilegesDropped")[0]["parent_death_signal"] == signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
