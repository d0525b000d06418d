"""Configuration: the TOML model, ``hamta config check`` and how ``hamta serve`` refuses to start.

The parser is tested in-process (it is a pure function); the command line is run as real
``python -m hamtactl`` processes, the ``config check`` ones all at once to keep the suite fast.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from hamta.config import ConfigError, load_config, parse_config, parse_hostport
from hamta.spool import Spool
from hamta.workers import shard_path
from tests.support import free_port
from tests.support.relay import HAMTA, RelayProcess, render_toml

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"10m"', 10 * 1024 * 1024),
        ('"512k"', 512 * 1024),
        ('"10MB"', 10 * 1024 * 1024),
        ('"10 MiB"', 10 * 1024 * 1024),
        ('"1g"', 1024**3),
        ('"2048"', 2048),
        ("4096", 4096),
    ],
)
def test_sizes(text: str, expected: int) -> None:
    config = parse_config(f"[smtp]\nmax_message_size = {text}\n")
    assert config.smtp.max_message_size == expected


@pytest.mark.parametrize("text", ['"1.5m"', '"ten"', '"-1k"', '"10t"', "0", "-5"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  smtp\.max_message_size: "):
        parse_config(f"[smtp]\nmax_message_size = {text}\n")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ('"5d"', 5 * 86400.0),
        ('"300ms"', 0.3),
        ('"2h"', 7200.0),
        ('"5m"', 300.0),
        ('"1.5s"', 1.5),
        ('"90"', 90.0),
        ("30", 30.0),
        ("0.25", 0.25),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    config = parse_config(f"[retry]\nfirst_delay = {text}\nmax_queue_lifetime = {text}\n")
    assert config.retry.first_delay == pytest.approx(seconds)
    assert config.retry.max_queue_lifetime == pytest.approx(seconds)


@pytest.mark.parametrize("text", ['"soon"', '"5 weeks"', '"-1s"', '"0s"', "0", "-3", '"1h30m"'])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  retry\.first_delay: "):
        parse_config(f"[retry]\nfirst_delay = {text}\n")


def test_defaults() -> None:
    for config in (parse_config(""), load_config(None)):
        assert config.smtp.listen == ["127.0.0.1:2525"]
        assert config.spool.path == Path("./var/spool")
        assert config.admin.listen == "127.0.0.1:8025"
        assert config.smtp.relay_networks == [
            IPv4Network("127.0.0.0/8"),
            IPv6Network("::1/128"),
        ]
        assert config.smtp.max_line_length == 998
        assert config.smtp.max_message_size == 25 * 1024 * 1024
        assert config.smtp.tls_cert is None and config.smtp.tls_key is None
        assert config.delivery.port == 25
        assert config.delivery.starttls == "opportunistic"


def test_workers_follow_the_cpus_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    # Users run the defaults: one relay process per CPU the process may run on (its affinity,
    # not the machine's count), at most 64; a set value is kept.
    for cpus, expected in ((set(range(3)), 3), ({5}, 1), (set(range(100)), 64)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cpus=cpus: cpus)
        assert parse_config("").node.workers == expected
    assert parse_config("[node]\nworkers = 2").node.workers == 2
    with pytest.raises(ConfigError, match="workers"):
        parse_config("[node]\nworkers = 0")


def test_workers_default_under_a_cpu_affinity_of_one() -> None:
    # A real process pinned to one CPU (taskset, a cgroup's cpuset) gets one worker.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from hamta.config import parse_config; print(parse_config('').node.workers)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "1"


def test_config_is_immutable() -> None:
    config = parse_config("")
    with pytest.raises(ValueError, match="frozen"):
        setattr(config.smtp, "max_recipients", 5)  # noqa: B010 - mypy would refuse the assignment


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("mx.example.test:2525", None, ("mx.example.test", 2525)),
        ("127.0.0.1:25", None, ("127.0.0.1", 25)),
        ("[::1]:2525", None, ("::1", 2525)),
        ("[mx.example.test]:26", None, ("mx.example.test", 26)),
        ("[mx.example.test]", 25, ("mx.example.test", 25)),
        ("mx.example.test", 53, ("mx.example.test", 53)),
        (" 10.0.0.1:65535 ", None, ("10.0.0.1", 65535)),
    ],
)
def test_parse_hostport(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default) == expected


@pytest.mark.parametrize(
    "text",
    [
        "mx.example.test",
        "mx.example.test:0",
        "mx.example.test:65536",
        ":25",
        "[::1",
        "[x]y:25",
        "[]:25",
        "mx.example.test:port",
        "host:-1",
    ],
)
def test_parse_hostport_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_every_error_is_reported_at_once() -> None:
    text = (
        '[smtp]\nlisen = ["127.0.0.1:25"]\nmax_recipients = "many"\n'
        '[delivery]\nport = 70000\n[retry]\nfirst_delay = "soon"\n[bogus]\nx = 1\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "several.toml")
    lines = str(caught.value).splitlines()
    assert lines[0] == "several.toml: invalid configuration"
    reported = {line.strip().split(":")[0] for line in lines[1:]}
    assert reported == {
        "smtp.lisen",
        "smtp.max_recipients",
        "delivery.port",
        "retry.first_delay",
        "bogus",
    }


def test_boolean_is_not_a_number() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.max_recipients: "):
        parse_config("[smtp]\nmax_recipients = true\n")


def test_bad_network_reported_as_section_key_reason() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config('[smtp]\nrelay_networks = ["10.0.0.0/33"]\n', "net.toml")
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("  smtp.relay_networks.0: "), lines
    assert "lax-or-strict" not in lines[0]


@pytest.mark.parametrize(
    "network",
    [
        "0.0.0.0/0",
        "::/0",
        "128.0.0.0/1",
        "64.0.0.0/7",
        "2000::/3",
        "::ffff:0:0/96",
        "::ffff:0.0.0.0/100",
        "64:ff9b::/96",
        "2002::/16",
        "0.0.0.0/4",
    ],
)
def test_an_open_relay_is_refused_naming_the_key(network: str) -> None:
    text = f'[smtp]\nrelay_networks = ["127.0.0.0/8", "{network}"]\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "open.toml")
    message = str(caught.value)
    assert "relay_networks" in message and "open relay" in message, message
    assert "smtp.allow_open_relay = true" in message, message
    opened = parse_config(text + "allow_open_relay = true\n")
    assert str(opened.smtp.relay_networks[1]) == str(
        IPv4Network(network) if ":" not in network else IPv6Network(network)
    )


@pytest.mark.parametrize(
    "network",
    [
        "10.0.0.0/8",
        "fc00::/7",
        "fd00::/8",
        "fe80::/10",
        "2001:db8::/32",
        "8.0.0.0/8",
        "::ffff:10.0.0.0/104",
        "2002:c000:0204::/48",
        "::1/128",
    ],
)
def test_private_and_narrow_networks_are_not_an_open_relay(network: str) -> None:
    parse_config(f'[smtp]\nrelay_networks = ["{network}"]\n')


# ------------------------------------------------------------ config check

GOOD = render_toml(
    {
        "node": {"hostname": "relay.example.test"},
        "smtp": {
            "listen": ["127.0.0.1:2525", "[::1]:2525"],
            "max_message_size": "10m",
            "relay_networks": ["127.0.0.0/8", "10.1.0.0/16", "fd00::/8"],
        },
        "spool": {"path": "/var/spool/hamta"},
        "delivery": {"routes": {"example.test": "[10.1.2.3]:2525"}},
        "retry": {"first_delay": "30s", "max_queue_lifetime": "5d"},
    }
)

# name: (file content, or None for no file; what stderr must say besides the path)
BAD: dict[str, tuple[bytes | None, list[str]]] = {
    "unknown-key": (b'[smtp]\nlisen = ["127.0.0.1:2525"]\n', ["smtp.lisen: unknown key"]),
    "wrong-type": (b'[smtp]\nmax_recipients = "many"\n', ["smtp.max_recipients: ", "integer"]),
    "out-of-range": (b"[delivery]\nport = 70000\n", ["delivery.port: ", "65536"]),
    "bad-duration": (
        b'[retry]\nfirst_delay = "soon"\n',
        ["retry.first_delay: ", "not a duration: 'soon'"],
    ),
    "bad-network": (
        b'[smtp]\nrelay_networks = ["127.0.0.0/8", "10.0.0.0/33"]\n',
        ["smtp.relay_networks.1", "not an IP network"],
    ),
    "open-relay": (
        b'[smtp]\nrelay_networks = ["0.0.0.0/0"]\n',
        ["smtp: relay_networks: 0.0.0.0/0", "open relay", "smtp.allow_open_relay = true"],
    ),
    "bad-route": (
        b'[delivery.routes]\n"example.test" = "mx.example.test:25"\n',
        ["delivery.routes: ", "'[host]:port'", "mx.example.test:25"],
    ),
    "tls-cert-without-key": (
        b'[smtp]\ntls_cert = "/etc/hamta/tls.crt"\n',
        ["smtp: ", "tls_cert and tls_key go together"],
    ),
    "invalid-toml": (b'[smtp\nlisten = "x"\n', ["not valid TOML"]),
    "missing-file": (None, ["cannot read", "No such file or directory"]),
    "not-utf8": (b'[node]\nhostname = "r\xe9lais.example.test"\n', ["not UTF-8"]),
    "several": (
        b'[smtp]\nlisen = 1\nmax_recipients = "many"\n[delivery]\nport = 70000\n'
        b'[retry]\nfirst_delay = "soon"\n',
        [
            "smtp.lisen: unknown key",
            "smtp.max_recipients: ",
            "delivery.port: ",
            "retry.first_delay: ",
        ],
    ),
}

MISSING_CERT = render_toml(
    {"smtp": {"tls_cert": "/nonexistent/hamta.crt", "tls_key": "/nonexistent/hamta.key"}}
)


@dataclass(frozen=True, slots=True)
class CheckRun:
    path: Path
    returncode: int
    stdout: str
    stderr: str


async def strand(path: Path) -> None:
    """A spool at ``path`` holding one message."""
    shard = Spool(path)
    shard.open()
    await shard.recover()
    await shard.append(b"Subject: left\r\n\r\nbehind\r\n", "a@origin.test", ["u@sink.test"])
    await shard.close()


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CheckRun]:
    """``hamta config check`` on every file below, run as processes side by side."""
    directory = tmp_path_factory.mktemp("config-check")
    files: dict[str, Path] = {}
    for name, (content, _) in BAD.items():
        files[name] = directory / f"{name}.toml"
        if content is not None:
            files[name].write_bytes(content)
    files["good"] = directory / "good.toml"
    files["good"].write_text(GOOD)
    files["missing-cert"] = directory / "missing-cert.toml"
    files["missing-cert"].write_text(MISSING_CERT)
    # A spool whose shard-1 holds mail: one worker set on purpose would strand it, the
    # default adopts it at activation (hamta/workers.py).
    spool = directory / "stranding-spool"
    asyncio.run(strand(shard_path(spool, 1)))
    for name, workers in (("stranding", {"workers": 1}), ("stranding-default", {})):
        files[name] = directory / f"{name}.toml"
        files[name].write_text(render_toml({"node": workers, "spool": {"path": spool}}))
    procs = {
        name: subprocess.Popen(
            [*HAMTA, "config", "check", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=directory,
        )
        for name, path in files.items()
    }
    runs: dict[str, CheckRun] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        runs[name] = CheckRun(files[name], proc.returncode, stdout, stderr)
    return runs


def test_check_accepts_good_file(checks: dict[str, CheckRun]) -> None:
    run = checks["good"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        f"{run.path}: ok (SMTP on 127.0.0.1:2525, [::1]:2525, spool /var/spool/hamta)"
    )
    assert run.stderr == ""


@pytest.mark.parametrize("name", BAD.keys())
def test_check_rejects_bad_file(checks: dict[str, CheckRun], name: str) -> None:
    run = checks[name]
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stdout == ""
    assert run.stderr.startswith(f"hamta: {run.path}: "), run.stderr
    assert "Traceback" not in run.stderr
    for expected in BAD[name][1]:
        assert expected in run.stderr, run.stderr


def test_check_rejects_a_worker_count_that_strands_a_shard(checks: dict[str, CheckRun]) -> None:
    run = checks["stranding"]
    assert run.returncode == 2, run.stdout
    assert run.stderr.startswith(f"hamta: {run.path}: node.workers: "), run.stderr
    assert "has shards no worker owns with node.workers = 1: shard-1;" in run.stderr
    # The default follows the CPUs and adopts such shards at activation: nothing to say.
    default = checks["stranding-default"]
    assert default.returncode == 0, default.stderr


def test_check_rejects_missing_certificate(checks: dict[str, CheckRun]) -> None:
    run = checks["missing-cert"]
    assert run.returncode == 2, run.stdout
    assert "smtp.tls_cert" in run.stderr


# -------------------------------------------------------------------- serve


def serve_config(directory: Path, **extra: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """A serve configuration whose every path is under ``directory``; returns (file, sections)."""
    sections: dict[str, dict[str, Any]] = {
        "node": {"hostname": "relay.hamta.test", "stop_timeout": "2s", "user": "root"},
        "smtp": {"listen": [f"127.0.0.1:{free_port()}"]},
        "spool": {"path": directory / "spool"},
        "admin": {"listen": f"127.0.0.1:{free_port()}"},
        "control": {"socket": directory / "run" / "relay.sock"},
        "log": {"file": directory / "log" / "hamta.log"},
    }
    for section, keys in extra.items():
        sections.setdefault(section, {}).update(keys)
    path = directory / "hamta.toml"
    path.write_text(render_toml(sections))
    return path, sections


def port_of(listen: str) -> int:
    return parse_hostport(listen)[1]


def is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"smtp": {"lisen": ["127.0.0.1:2525"]}}, "smtp.lisen: unknown key"),
        ({"smtp": {"tls_key": "/etc/hamta/tls.key"}}, "tls_cert and tls_key go together"),
        ({"retry": {"first_delay": "soon"}}, "retry.first_delay: "),
    ],
    ids=["unknown-key", "tls-key-alone", "bad-duration"],
)
def test_serve_refuses_broken_config_before_starting(
    tmp_path: Path, extra: dict[str, dict[str, Any]], reason: str
) -> None:
    path, sections = serve_config(tmp_path, **extra)
    # A cap for a relay that would start anyway, not a goal: under the parallel suite on a
    # loaded machine an interpreter alone took over 15 s to start. That it refused before
    # starting anything is what the files and ports below show.
    result = subprocess.run(
        [*HAMTA, "serve", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"hamta: {path}: invalid configuration\n"), result.stderr
    assert reason in result.stderr
    # Nothing was started: no spool, no control socket, no event log, nothing under ./var.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hamta.toml"]
    assert not is_listening(port_of(sections["smtp"]["listen"][0]))
    assert not is_listening(port_of(sections["admin"]["listen"]))


@dataclass(frozen=True, slots=True)
class PortTaken:
    relay: RelayProcess
    returncode: int
    stderr: str
    #: Whether the test's own listener still got a connection after the relay gave up.
    listener_still_works: bool


def still_accepts(listener: socket.socket, port: int) -> bool:
    listener.settimeout(5)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = listener.accept()
            accepted.close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def port_taken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortTaken]:
    """A relay started on an SMTP port that another listener holds, run until it gives up."""
    relay = RelayProcess(tmp_path_factory.mktemp("port-taken"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", relay.port))
        listener.listen(8)
        relay.start(wait_ready=False)
        assert relay.proc is not None
        returncode = relay.proc.wait(timeout=30)
        works = still_accepts(listener, relay.port)
    yield PortTaken(relay, returncode, relay.stderr(), listener_still_works=works)
    relay.stop()


def test_serve_exits_when_smtp_port_is_taken(port_taken: PortTaken) -> None:
    relay = port_taken.relay
    assert port_taken.returncode != 0
    assert f"hamta: cannot listen on 127.0.0.1:{relay.port}: " in port_taken.stderr
    assert "already in use" in port_taken.stderr
    assert "Traceback" not in port_taken.stderr
    assert port_taken.listener_still_works
    # Nothing is left behind: no control socket, and the admin port is free again.
    assert not relay.control.exists()
    assert not is_listening(relay.admin_port)
    # Found at start, while binding (hamta.listeners), before anything else was started.
    failed = relay.events("StartFailed")
    assert len(failed) == 1 and f"127.0.0.1:{relay.port}" in failed[0]["error"]
    assert relay.events("RelayActive") == []


def test_exit_event_reports_exit_code(port_taken: PortTaken) -> None:
    (exited,) = port_taken.relay.events("RelayExited")
    assert exited["code"] == port_taken.returncode


def test_serve_with_unloadable_certificate_fails_cleanly(tmp_path: Path) -> None:
    path, _ = serve_config(
        tmp_path,
        smtp={"tls_cert": tmp_path / "missing.crt", "tls_key": tmp_path / "missing.key"},
    )
    result = subprocess.run(
        [*HAMTA, "serve", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("hamta: ") and "missing.crt" in result.stderr
    # Refused before anything was set up, like any other configuration error.
    assert not (tmp_path / "spool").exists()
